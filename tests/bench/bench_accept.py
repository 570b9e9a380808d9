"""Inbound accept rate: messages/s into the spool with fsync on, 20 concurrent clients.

Runs the real daemon (``python -m relay run``) as a subprocess on a temporary
spool, so the figures include the SMTP dialogue, the checks, the Received
header, the spool's fsync + rename + directory fsync, and the 250. Bounded:
at most ``COUNT`` messages or ``LIMIT`` seconds per body size.

Then it measures what the in-memory index costs per queued message when the
spool is recovered at start (the daemon's placeholder scheduler keeps only
ids and due times; a full Envelope is also measured for comparison).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
import tracemalloc
from pathlib import Path

import aiosmtplib

from relay import app
from relay.delivery import Deliverer
from relay.dns import DnsResolver
from relay.metrics import Metrics
from relay.queue import Scheduler
from relay.spool import Spool
from tests.support.inbound import inbound_toml
from tests.support.procs import RelayProcess, free_port

CLIENTS = 20
SIZES = {"1 KiB": 1024, "100 KiB": 100 * 1024}
COUNT = {"1 KiB": 1000, "100 KiB": 300}
LIMIT = 30.0  # seconds per size


def message(size: int) -> bytes:
    head = b"From: bench@example.org\r\nTo: user@example.com\r\nSubject: bench\r\n\r\n"
    line = b"x" * 78 + b"\r\n"
    body = line * max(1, (size - len(head)) // len(line))
    return head + body


async def client(port: int, data: bytes, budget: list[int], stop: float, lat: list[float]) -> None:
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30)
    await smtp.connect()
    try:
        while budget[0] > 0 and time.monotonic() < stop:
            budget[0] -= 1
            started = time.monotonic()
            await smtp.sendmail("bench@example.org", ["user@example.com"], data)
            lat.append(time.monotonic() - started)
    finally:
        await smtp.quit()


async def run_size(port: int, label: str) -> None:
    data = message(SIZES[label])
    budget = [COUNT[label]]
    latencies: list[float] = []
    started = time.monotonic()
    stop = started + LIMIT
    await asyncio.gather(*(client(port, data, budget, stop, latencies) for _ in range(CLIENTS)))
    elapsed = time.monotonic() - started
    n = len(latencies)
    q = statistics.quantiles(latencies, n=100) if n > 1 else [0.0] * 99
    print(
        f"accept {label:>7}: {n} messages in {elapsed:.2f}s = {n / elapsed:.0f} msg/s, "
        f"{n * len(data) / elapsed / 1e6:.1f} MB/s; latency p50 {q[49] * 1000:.1f} ms, "
        f"p99 {q[98] * 1000:.1f} ms ({CLIENTS} clients, fsync on)",
        flush=True,
    )


def index_cost(spool_dir: Path) -> None:
    spool = Spool(spool_dir)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    metrics = Metrics()
    deliverer = Deliverer(app.default_config, DnsResolver(), metrics)
    # The real scheduler's index; it is never run, so nothing is delivered.
    scheduler = Scheduler(app.default_config, spool, deliverer, metrics)
    count = 0
    for envelope in spool.load_all():
        scheduler.add(envelope)
        count += 1
    placeholder = tracemalloc.get_traced_memory()[0] - before
    envelopes = list(spool.load_all())
    full = tracemalloc.get_traced_memory()[0] - before - placeholder
    tracemalloc.stop()
    if count:
        print(
            f"index: {count} queued messages; scheduler index {placeholder / count:.0f} B/message; "
            f"full Envelope objects {full / len(envelopes):.0f} B/message",
            flush=True,
        )


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        port = free_port()
        config = root / "relay.toml"
        text = inbound_toml(
            root / "spool",
            max_message_size=10_000_000,
            max_recipients=10,
            listen=[f"127.0.0.1:{port}"],
        )
        config.write_text(text)
        relay = RelayProcess(config, cwd=root).start(wait_for="event=started")
        try:
            for label in SIZES:
                asyncio.run(run_size(port, label))
        finally:
            relay.stop()
        index_cost(root / "spool")


if __name__ == "__main__":
    main()
