"""Memory of the scheduler's in-memory index, per queued message.

Run: python tests/bench/bench_queue.py [COUNT]
Prints the bytes tracemalloc attributes to Scheduler.add per message; the
target is well under 1 KiB (only the id and due time are kept).
"""

from __future__ import annotations

import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

# Run from a checkout: import this tree's relay and tests, not an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay.envelope import ClientInfo, Envelope, Recipient  # noqa: E402
from relay.metrics import Metrics  # noqa: E402
from relay.queue import Scheduler  # noqa: E402
from relay.spool import Spool  # noqa: E402
from relay.spoolfiles import new_id  # noqa: E402
from tests.support.queue import FakeDeliverer, make_config  # noqa: E402


def main(count: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        spool = Spool(Path(tmp), fsync=False)
        cfg = make_config(spool.path)
        scheduler = Scheduler(lambda: cfg, spool, FakeDeliverer(), Metrics(), rng=random.Random(1))
        # Realistic envelopes (built outside the measurement; add() must not keep them).
        now = time.time()
        envelopes = [
            Envelope(
                id=new_id(),
                mail_from="someone@sender.example",
                recipients=[Recipient(f"user{i}@example.com") for i in range(5)],
                client=ClientInfo("192.0.2.1", "client.example"),
                next_attempt=now + random.uniform(0, 3600),
            )
            for _ in range(count)
        ]
        ids = [e.id for e in envelopes]  # the ids exist anyway; count them in the cost below
        del ids
        tracemalloc.start()
        before, _ = tracemalloc.get_traced_memory()
        for envelope in envelopes:
            scheduler.add(envelope)
        after, _ = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        del envelopes  # nothing of the envelopes may stay reachable from the scheduler
        per_message = (after - before) / count
        # The id strings are shared with the envelopes here; in the daemon they
        # are owned by the index, so add their size for an honest figure.
        id_size = sys.getsizeof(new_id())
        print(f"messages queued: {count}")
        print(f"index bytes per message (tracemalloc): {per_message:.0f}")
        print(f"plus the queue id string: {id_size} -> about {per_message + id_size:.0f} bytes")


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 100_000)
