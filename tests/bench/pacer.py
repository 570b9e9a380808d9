"""An evenly paced SMTP client for the half-rate latency figure (docs/performance.md).

``smtp-source -R N`` sleeps a whole number of seconds between messages, so
its sessions wake together: at a "half rate" of 150 msg/s it delivers
bursts of 100+ messages within 100 ms followed by a second of nothing
(measured from the accept timestamps). The latency of such a run measures
how fast a burst drains, not latency at half rate. This client spreads the
same load evenly: ``sessions`` connections, each sending one message every
``sessions / rate`` seconds, their phases offset so that consecutive
messages are ``1 / rate`` apart. A session that falls behind sends its next
message at once (it never sends two at a time), so the offered rate is an
upper bound and the achieved rate is reported.

Bounded: ``rate * seconds`` messages, and every read times out.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

KIB = 1024
_REPLY_TIMEOUT = 30.0


@dataclass(frozen=True)
class Paced:
    sent: int
    seconds: float

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def message(size: int = KIB) -> bytes:
    """About ``size`` bytes of headers and 76-character lines, dot-terminated."""
    head = b"From: bench@source.test\r\nTo: bench@example.org\r\nSubject: paced\r\n\r\n"
    line = b"x" * 76 + b"\r\n"
    lines = max(1, (size - len(head)) // len(line))
    return head + line * lines + b".\r\n"


async def _reply(reader: asyncio.StreamReader) -> bytes:
    """One whole reply (continuation lines skipped); raises on a 4xx/5xx."""
    while True:
        line = await asyncio.wait_for(reader.readline(), _REPLY_TIMEOUT)
        if not line:
            raise ConnectionError("the MTA closed the connection")
        if line[3:4] != b"-":
            break
    if line[:1] not in (b"2", b"3"):
        raise RuntimeError(f"MTA refused: {line!r}")
    return line


async def _session(port: int, start: float, interval: float, count: int, body: bytes) -> int:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        await _reply(reader)
        writer.write(b"EHLO pacer.source.test\r\n")
        await _reply(reader)
        for i in range(count):
            delay = start + i * interval - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            for command in (
                b"MAIL FROM:<bench@source.test>\r\n",
                b"RCPT TO:<bench@example.org>\r\n",
                b"DATA\r\n",
                body,
            ):
                writer.write(command)
                await _reply(reader)
        writer.write(b"QUIT\r\n")
        await _reply(reader)
    finally:
        writer.close()
    return count


async def _pace(port: int, rate: float, seconds: float, sessions: int, size: int) -> Paced:
    interval = sessions / rate
    per_session = max(1, round(rate * seconds / sessions))
    body = message(size)
    began = time.monotonic()
    start = began + 0.2  # every session connected before the first message
    counts = await asyncio.gather(
        *(
            _session(port, start + s * interval / sessions, interval, per_session, body)
            for s in range(sessions)
        )
    )
    return Paced(sum(counts), time.monotonic() - start)


def pace(
    port: int, rate: float, seconds: float = 10.0, sessions: int = 20, size: int = KIB
) -> Paced:
    """Send ``rate * seconds`` messages to 127.0.0.1:``port`` at an even ``rate``."""
    return asyncio.run(_pace(port, rate, seconds, max(1, min(sessions, int(rate))), size))
