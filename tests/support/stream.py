"""Helpers for the large-message tests: big bodies, a scripted DATA reader, a
collecting spill, and a sink that keeps only a digest of what it receives.

Everything talks real SMTP over loopback; nothing in relay is patched.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path
from typing import cast

from relay.commandreader import CrlfCommandReader
from relay.content import MessageCheck, unstuff

HEAD = b"From: a@example.org\r\nTo: user@example.com\r\nSubject: big\r\n\r\n"


def big_body(size: int, seed: int = 1, dots_at: tuple[int, ...] = ()) -> bytes:
    """About ``size`` bytes of CRLF lines of random lengths (some starting
    with dots); plus a line starting with "." at each offset in ``dots_at``
    (the nearest line start at or after it is moved there)."""
    rng = random.Random(seed)
    out = bytearray(HEAD)
    targets = sorted(dots_at)
    while len(out) < size:
        if targets and len(out) + 80 >= targets[0]:
            # Pad the current position up to the target with one line, so
            # the next line starts exactly there.
            gap = targets.pop(0) - len(out)
            if gap >= 2:
                out += b"p" * (gap - 2) + b"\r\n"
            out += b"..dot at a boundary\r\n" if rng.random() < 0.5 else b".one dot\r\n"
            continue
        length = rng.randrange(0, 78)
        start = b"." if rng.random() < 0.1 else b""
        out += start + bytes(rng.choices(b"abcdefghij .", k=length)) + b"\r\n"
    return bytes(out)


def stuff(content: bytes) -> bytes:
    """RFC 5321 section 4.5.2 transparency, as a client sends it."""
    stuffed = content.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if stuffed.startswith(b".") else stuffed


class ScriptedReader(CrlfCommandReader):
    """A DATA reader whose read() returns the given blocks, one per call."""

    def __init__(self, blocks: list[bytes]) -> None:
        super().__init__()
        self.blocks = list(blocks)

    async def read(self, n: int = -1) -> bytes:
        if self.blocks:
            return self.blocks.pop(0)
        return bytes(self._buffer)  # type: ignore[attr-defined]  # what was put back


class CollectingSpill:
    """A Spill that keeps the raw pieces and runs the streaming checks on them."""

    def __init__(self, threshold: int) -> None:
        self.threshold = threshold
        self.pieces: list[bytes] = []
        self.check = MessageCheck()
        self.abandoned = False

    def holding(self, size: int) -> None:
        pass

    async def write(self, raw: bytes) -> None:
        self.pieces.append(raw)
        self.check.feed(unstuff(raw))

    def abandon(self) -> None:
        self.abandoned = True


def tmp_files(spool: Path) -> list[Path]:
    return sorted((spool / "tmp").iterdir())


class DigestSink(asyncio.Protocol):
    """A minimal SMTP server that keeps a SHA-256 of each message's raw
    (still dot-stuffed) DATA and never the message itself: memory tests
    measure the relay, not the sink."""

    def __init__(self, digests: list[tuple[str, int]]) -> None:
        self.digests = digests
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.in_data = False
        self.hash = hashlib.sha256()
        self.size = 0
        self.tail = b""
        self.skip = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Any loop's transport: uvloop's are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(b"220 digest.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            self._data(data)
            return
        self.buffer += data
        while not self.in_data and b"\r\n" in self.buffer:
            line, self.buffer = self.buffer.split(b"\r\n", 1)
            self._command(line.upper())
        if self.in_data and self.buffer:
            rest, self.buffer = self.buffer, b""
            self._data(rest)

    def _command(self, line: bytes) -> None:
        assert self.transport is not None
        if line.startswith(b"EHLO"):
            self.transport.write(b"250-digest.test\r\n250 8BITMIME\r\n")
        elif line == b"DATA":
            self.in_data, self.hash, self.size = True, hashlib.sha256(), 0
            self.tail, self.skip = b"\r\n", 2
            self.transport.write(b"354 go ahead\r\n")
        elif line == b"QUIT":
            self.transport.write(b"221 bye\r\n")
            self.transport.close()
        else:
            self.transport.write(b"250 ok\r\n")

    def _data(self, data: bytes) -> None:
        # self.tail: bytes not hashed yet, the first self.skip of them the
        # CRLF that ended "DATA" (so an empty message ends like any other).
        assert self.transport is not None
        window = self.tail + data
        end = window.find(b"\r\n.\r\n")
        if end < 0:
            cut = max(len(window) - 4, 0)  # a terminator may start in the last 4
            if cut > self.skip:
                self._hash(window[self.skip : cut])
                self.tail, self.skip = window[cut:], 0
            else:
                self.tail = window
            return
        self._hash(window[self.skip : end + 2])
        self.digests.append((self.hash.hexdigest(), self.size))
        self.in_data = False
        self.transport.write(b"250 2.0.0 ok\r\n")
        rest = window[end + 5 :]
        if rest:
            self.data_received(rest)

    def _hash(self, data: bytes) -> None:
        self.hash.update(data)
        self.size += len(data)
