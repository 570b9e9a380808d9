"""One of two 50/50 primaries wedged: how long 200 messages take, and what the wedged host sees.

The wedged host accepts TCP and never sends a greeting; the other primary
is a healthy in-process sink. The relay's own scheduler and deliverer
(in this process, on a spool in a temporary directory, loopback only) send
COUNT messages queued at once, with ``connect_timeout`` TIMEOUT seconds.

Run: python tests/bench/hung_scenario.py [COUNT] [TIMEOUT] [wedged|421|refusing]
Prints the seconds until every message (and 90% of them) was delivered and
the number of connections the sick host took. Bounded: gives up after
LIMIT seconds.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
import tomllib
from pathlib import Path

# Run from a checkout: import this tree's relay and tests, not an installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from relay import configload  # noqa: E402
from relay.delivery import Deliverer  # noqa: E402
from relay.dns import DnsResolver  # noqa: E402
from relay.envelope import Envelope, Recipient  # noqa: E402
from relay.metrics import Metrics  # noqa: E402
from relay.queue import Scheduler  # noqa: E402
from relay.spool import Spool  # noqa: E402
from relay.spoolfiles import new_id  # noqa: E402
from tests.support.hosts import SickHost, closed_port  # noqa: E402
from tests.support.sink import Sink  # noqa: E402

#: Seconds before the run gives up (the old relay took over two minutes).
LIMIT = 300.0

BODY = b"From: a@sender.test\r\nTo: b@example.com\r\nSubject: hung\r\n\r\nHello.\r\n"


def config_text(spool: Path, wedged: int, healthy: int, timeout: float) -> str:
    return f"""
[server]
hostname = "relay.test"
listen = ["127.0.0.1:1"]
domains = ["example.com"]

[queue]
path = "{spool}"

[delivery]
connect_timeout = "{timeout}s"

[[routes]]
name = "Hung"
require_tls = false
require_ca_signed = false
validate_hostname = false
[[routes.primary]]
host = "127.0.0.1"
port = {wedged}
load = 50
[[routes.primary]]
host = "127.0.0.1"
port = {healthy}
load = 50

[[rules]]
recipients = ["*"]
route = "Hung"
"""


async def run(count: int, connect_timeout: float, mode: str) -> dict[str, float | str]:
    with tempfile.TemporaryDirectory() as tmp:
        sick = None if mode == "refusing" else await SickHost(mode).__aenter__()
        sick_port = sick.port if sick is not None else closed_port()
        sink = Sink()
        await sink.start()
        spool_dir = Path(tmp) / "spool"
        text = config_text(spool_dir, sick_port, sink.port, connect_timeout)
        cfg = configload.parse(tomllib.loads(text), Path(tmp) / "relay.toml", "bench")
        spool = Spool(spool_dir, fsync=False)
        spool.open()
        metrics = Metrics()
        deliverer = Deliverer(lambda: cfg, DnsResolver(cfg.dns), metrics)
        scheduler = Scheduler(lambda: cfg, spool, deliverer, metrics)
        now = time.time()
        for _ in range(count):
            envelope = Envelope(
                id=new_id(),
                mail_from="a@sender.test",
                recipients=[Recipient("b@example.com")],
                received_at=now,
                next_attempt=now,
            )
            spool.put(envelope, BODY)
            scheduler.add(envelope)
        start = time.monotonic()
        most = None
        runner = asyncio.create_task(scheduler.run())
        try:
            while len(sink.messages) < count and time.monotonic() - start < LIMIT:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
                if most is None and len(sink.messages) >= count * 0.9:
                    most = time.monotonic() - start
            elapsed = time.monotonic() - start
        finally:
            await scheduler.stop(1.0)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await deliverer.close()
            await sink.stop()
            if sick is not None:
                await sick.__aexit__(None, None, None)
            spool.close()
        return {
            "sick_host": mode,
            "messages": count,
            "delivered": len(sink.messages),
            "seconds": round(elapsed, 2),
            "seconds_to_90_percent": round(most if most is not None else elapsed, 2),
            "sick_host_connections": sick.connections if sick is not None else "n/a (refused)",
        }


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 200
    timeout = float(argv[1]) if len(argv) > 1 else 8.0
    mode = argv[2] if len(argv) > 2 else "wedged"
    result = asyncio.run(run(count, timeout, mode))
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0 if result["delivered"] == count else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
