"""One of two 50/50 primaries wedged: how long 200 messages take, and what the wedged host sees.

The wedged host accepts TCP and never sends a greeting; the other primary
is a healthy in-process sink. The relay's own scheduler and deliverer
(in this process, on a spool in a temporary directory, loopback only) send
COUNT messages queued at once, with ``connect_timeout`` TIMEOUT seconds.

Run: python tests/bench/hung_scenario.py [COUNT] [TIMEOUT]
Prints the seconds until every message was delivered and the number of
connections the wedged host took. Bounded: gives up after LIMIT seconds.
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

from relay import config as configmod  # noqa: E402
from relay.delivery import Deliverer  # noqa: E402
from relay.dns import DnsResolver  # noqa: E402
from relay.envelope import Envelope, Recipient  # noqa: E402
from relay.metrics import Metrics  # noqa: E402
from relay.queue import Scheduler  # noqa: E402
from relay.spool import Spool, new_id  # noqa: E402
from tests.support.sink import Sink  # noqa: E402

#: Seconds before the run gives up (the old relay took over two minutes).
LIMIT = 300.0

BODY = b"From: a@sender.test\r\nTo: b@example.com\r\nSubject: hung\r\n\r\nHello.\r\n"


class Wedged:
    """Accepts connections, never greets, counts them."""

    def __init__(self) -> None:
        self.connections = 0
        self._writers: list[asyncio.StreamWriter] = []
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> Wedged:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)

    async def stop(self) -> None:
        for writer in self._writers:
            writer.transport.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


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


async def run(count: int, connect_timeout: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        wedged = await Wedged().start()
        sink = Sink()
        await sink.start()
        spool_dir = Path(tmp) / "spool"
        text = config_text(spool_dir, wedged.port, sink.port, connect_timeout)
        cfg = configmod.parse(tomllib.loads(text), Path(tmp) / "relay.toml", "bench")
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
        runner = asyncio.create_task(scheduler.run())
        try:
            while len(sink.messages) < count and time.monotonic() - start < LIMIT:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - start
        finally:
            await scheduler.stop(1.0)
            runner.cancel()
            await asyncio.gather(runner, return_exceptions=True)
            await deliverer.close()
            await sink.stop()
            await wedged.stop()
            spool.close()
        return {
            "messages": count,
            "delivered": len(sink.messages),
            "seconds": round(elapsed, 2),
            "wedged_connections": wedged.connections,
        }


def main(argv: list[str]) -> int:
    count = int(argv[0]) if argv else 200
    timeout = float(argv[1]) if len(argv) > 1 else 8.0
    result = asyncio.run(run(count, timeout))
    for key, value in result.items():
        print(f"{key}: {value}")
    return 0 if result["delivered"] == count else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
