"""Idle connections: what 1 000 of them cost the daemon, and whether mail still flows.

Runs the real daemon (``python -m relay run``) as a subprocess, then:

1. the accept rates with no idle connection: new sessions per second
   (connect, greeting, QUIT) and messages per second (20 clients, 1 KiB,
   fsync on);
2. opens ``IDLE`` connections from 50 loopback addresses (127.0.1.x, 20
   each: the per-address limit), each greeted and then silent, and reads
   the daemon's resident set size (/proc/PID/status VmRSS) before and
   after: the difference per connection is what an idle session costs;
3. the same accept rates with those connections open.

``max_connections`` is raised to 1 100 so that the benchmark's own
clients fit next to the idle ones (at the limit, a new client would take
an idle session's place after ``busy_timeout``: tested in
tests/integration/test_inbound_connections.py, not measured here). Loopback only;
bounded: at most ``COUNT`` messages or ``LIMIT`` seconds per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import tempfile
import time
from pathlib import Path

import aiosmtplib

from tests.support.inbound import inbound_toml
from tests.support.procs import RelayProcess, free_port

IDLE = 1000
CLIENTS = 20
COUNT = 1000  # messages per run
SESSIONS = 1000  # new sessions per run
LIMIT = 20.0  # seconds per run
ROUNDS = 3  # without / with, interleaved
MESSAGE = (
    b"From: bench@example.org\r\nTo: user@example.com\r\nSubject: bench\r\n\r\n"
    + (b"x" * 78 + b"\r\n") * 12
)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


async def open_idle(port: int) -> list[asyncio.StreamWriter]:
    writers = []
    for n in range(IDLE // 20):

        async def one(source: str) -> asyncio.StreamWriter:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, local_addr=(source, 0)
            )
            greeting = await asyncio.wait_for(reader.readline(), 30)
            assert greeting.startswith(b"220"), greeting
            return writer

        writers += await asyncio.gather(*(one(f"127.0.1.{n + 1}") for _ in range(20)))
    return writers


async def session_rate(port: int) -> float:
    """New sessions per second: connect, greeting, QUIT, CLIENTS at a time."""
    budget = [SESSIONS]
    stop = time.monotonic() + LIMIT
    done = [0]

    async def loop() -> None:
        while budget[0] > 0 and time.monotonic() < stop:
            budget[0] -= 1
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            assert (await asyncio.wait_for(reader.readline(), 30)).startswith(b"220")
            writer.write(b"QUIT\r\n")
            await asyncio.wait_for(reader.readline(), 30)
            writer.close()
            done[0] += 1

    started = time.monotonic()
    await asyncio.gather(*(loop() for _ in range(CLIENTS)))
    return done[0] / (time.monotonic() - started)


async def message_rate(port: int) -> float:
    """Messages accepted per second, CLIENTS sessions sending at once."""
    budget = [COUNT]
    stop = time.monotonic() + LIMIT
    done = [0]

    async def client() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, timeout=30)
        await smtp.connect()
        try:
            while budget[0] > 0 and time.monotonic() < stop:
                budget[0] -= 1
                await smtp.sendmail("bench@example.org", ["user@example.com"], MESSAGE)
                done[0] += 1
        finally:
            await smtp.quit()

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return done[0] / (time.monotonic() - started)


async def close_all(writers: list[asyncio.StreamWriter]) -> None:
    for writer in writers:
        writer.close()
    with contextlib.suppress(Exception):
        await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
    await asyncio.sleep(1.0)  # let the daemon see them go


async def run(port: int, pid: int) -> None:
    # Warm-up: imports, spool directories, caches.
    await message_rate(port)
    await session_rate(port)
    figures: dict[str, list[float]] = {"sessions": [], "sessions idle": [], "messages": []}
    figures["messages idle"] = []
    for _ in range(ROUNDS):
        # Interleaved, so that the machine's other load falls on both sides.
        figures["sessions"].append(await session_rate(port))
        figures["messages"].append(await message_rate(port))
        rss_before = rss_kib(pid)
        started = time.monotonic()
        idle = await open_idle(port)
        opened = time.monotonic() - started
        try:
            await asyncio.sleep(1.0)  # let the daemon settle (timers, buffers)
            rss_after = rss_kib(pid)
            figures["sessions idle"].append(await session_rate(port))
            figures["messages idle"].append(await message_rate(port))
        finally:
            await close_all(idle)
        per = (rss_after - rss_before) * 1024 / IDLE
        print(
            f"idle: {IDLE} idle connections opened in {opened:.2f}s; daemon RSS "
            f"{rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB = "
            f"{per / 1024:.1f} KiB/connection",
            flush=True,
        )
    best = {name: max(values) for name, values in figures.items()}
    print(
        f"idle: new sessions/s (best of {ROUNDS}) {best['sessions']:.0f} without, "
        f"{best['sessions idle']:.0f} with {IDLE} idle "
        f"({best['sessions idle'] / best['sessions']:.2f}x)",
        flush=True,
    )
    print(
        f"idle: messages/s (best of {ROUNDS}) {best['messages']:.0f} without, "
        f"{best['messages idle']:.0f} with {IDLE} idle "
        f"({best['messages idle'] / best['messages']:.2f}x; {CLIENTS} clients, 1 KiB, fsync on)",
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
            extra_server="max_connections = 1100",
        )
        config.write_text(text)
        relay = RelayProcess(config, cwd=root).start(wait_for="event=started")
        try:
            asyncio.run(run(port, relay.pid))
        finally:
            relay.stop()


if __name__ == "__main__":
    main()
