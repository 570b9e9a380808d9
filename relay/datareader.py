"""The DATA reader: message content up to CRLF.CRLF, read in blocks, refused
with relay's own replies when too big or a line is too long.

No SMTP library here: it reads from any :class:`DataStream` (inbound.py
hands it the session's stream reader) and hands large content to a
:class:`Spill` as it comes (relay.intake puts it into the spool).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from relay import errors
from relay.content import longest_line
from relay.errors import Reply

#: Bytes asked for per read while receiving DATA.
DATA_BLOCK = 1 << 16
_DATA_END = b"\r\n.\r\n"

#: The metric reason (metrics.REJECT_REASONS) of each refusal read_data makes.
REFUSAL_REASONS: dict[Reply, str] = {
    errors.MESSAGE_TOO_BIG: "too_big",
    errors.LINE_TOO_LONG: "bad_syntax",
}


class DataStream(Protocol):
    """Where :func:`read_data` reads the content from: the session's stream."""

    #: Called once per block read (the session's idle timer), if set.
    on_data_line: Callable[[], None] | None

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes; b"" at end of stream."""

    def unread(self, data: bytes) -> None:
        """Put back what a block read took past the end of DATA (pipelined commands)."""


class Spill(Protocol):
    """Where :func:`read_data` puts the content of a large message as it comes."""

    @property
    def threshold(self) -> int:
        """Unflushed raw content above this many bytes goes to :meth:`write`."""

    def holding(self, size: int) -> None:
        """:func:`read_data` holds ``size`` bytes of content in memory now."""

    async def write(self, raw: bytes) -> None:
        """Take ``raw``: still dot-stuffed, whole lines (starting at a line
        start, ending in CRLF, except the last piece which ends the content)."""

    def abandon(self) -> None:
        """The message is refused (too big, line too long): drop what was written."""


async def read_data(
    reader: DataStream,
    size_limit: int | None,
    line_limit: int,
    spill: Spill | None = None,
) -> tuple[bytes | None, Reply | None]:
    """Read DATA content up to CRLF.CRLF in blocks: (raw content, None), or
    (None, the refusal: 552 5.3.4 too big, 500 5.5.2 a line too long; see
    :data:`REFUSAL_REASONS`), or (None, None) at end of stream. The raw
    content is still dot-stuffed and ends in CRLF (or is empty); bytes
    read past the terminator are put back.

    With ``spill``, once more than ``spill.threshold`` bytes are held the
    complete lines go to ``spill.write`` as they come, and so does the rest
    at the end: the content is then (b"", None) and ``spill`` has it all.
    On a refusal the spill is abandoned; at end of stream the caller
    cleans up. Below the threshold nothing changes (the fast path).

    aiosmtpd reads DATA one line per await, which cost about 8 ms of CPU
    per 100 KiB message (docs/performance.md); this reads up to DATA_BLOCK at once and
    finds the terminator with bytes.find. Limits as aiosmtpd: the size
    counts every line with its CRLF; a line longer than ``line_limit``
    with its CRLF is refused.
    """
    # The CRLF before the terminator may be the one that ended "DATA":
    # start with it so an empty message is found like any other. buf[i] is
    # content byte i - 2 + shift: shift counts the bytes dropped or spilled.
    buf = bytearray(b"\r\n")
    shift = 0
    refusal: Reply | None = None
    spilled = False
    while True:
        start = max(0, len(buf) - len(_DATA_END) + 1)
        block = await reader.read(DATA_BLOCK)
        if not block:
            return None, None
        if reader.on_data_line is not None:
            # Data is flowing: restart the idle timer (per block, not per line).
            reader.on_data_line()
        buf += block
        if spill is not None:
            spill.holding(len(buf))
        end = buf.find(_DATA_END, start)
        if end >= 0:
            break
        if refusal is None and size_limit and shift + len(buf) - 2 > size_limit + len(_DATA_END):
            refusal = errors.MESSAGE_TOO_BIG
        elif refusal is None and spill is not None and len(buf) > spill.threshold:
            flushed, refusal = await _spill_lines(buf, spill, line_limit)
            shift += flushed
            spilled = spilled or flushed > 0
            spill.holding(len(buf))
        if refusal is not None:
            if spilled and spill is not None:
                spill.abandon()
                spilled = False
            # Refused whatever comes next: keep only a tail that may hold
            # the start of the terminator, and read on to the end.
            shift += len(buf) - len(_DATA_END)
            del buf[: -len(_DATA_END)]
    reader.unread(bytes(buf[end + len(_DATA_END) :]))
    if size_limit and shift + end > size_limit:
        refusal = errors.MESSAGE_TOO_BIG
    if refusal is None:
        raw = bytes(memoryview(buf)[2 : end + 2])
        del buf
        if longest_line(raw) + 2 > line_limit:
            refusal = errors.LINE_TOO_LONG
        elif spilled and spill is not None:
            if raw:
                await spill.write(raw)
            return b"", None
        else:
            return raw, None
    if spilled and spill is not None:
        spill.abandon()
    return None, refusal


async def _spill_lines(buf: bytearray, spill: Spill, line_limit: int) -> tuple[int, Reply | None]:
    """Hand buf's complete lines to ``spill``; keep the last CRLF and what
    follows it in ``buf`` (so ``buf`` again starts with a CRLF, as at the
    start: a terminator or a "CRLF ." can never be cut). Returns the bytes
    spilled, and the refusal when a line is too long."""
    last = buf.rfind(b"\r\n")
    if last >= 2:
        raw = bytes(memoryview(buf)[2 : last + 2])
        if longest_line(raw) + 2 > line_limit:
            return 0, errors.LINE_TOO_LONG
        del buf[:last]
        await spill.write(raw)
    else:
        last = 0
    if len(buf) - 1 > line_limit:
        # The line under way is too long already (its last byte may be
        # the CR of its CRLF, hence - 1, not - 2).
        return last, errors.LINE_TOO_LONG
    return last, None
