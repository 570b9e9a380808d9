"""The command reader of an inbound session: strict about line endings (RFC 5321 section 2.3.8).

relay.inbound swaps the class of the StreamReader aiosmtpd creates for
each session to :class:`CrlfCommandReader`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

#: The private members of asyncio this module reaches into;
#: tests/unit/test_private_members.py checks that each still exists.
PRIVATE_MEMBERS = (
    # Written: CrlfCommandReader.unread puts bytes back into the buffer.
    ("asyncio.streams", "StreamReader._buffer"),
)


class CrlfCommandReader(asyncio.StreamReader):
    """aiosmtpd's stream reader, refusing command lines that end in a bare LF.

    aiosmtpd reads commands up to LF (``readuntil()``) and DATA lines up to
    CRLF. RFC 5321 section 2.3.8 says lines end in CRLF only; a command
    ending in a bare LF is turned into an empty line, which aiosmtpd
    answers with its syntax error (relay.inbound maps it to 500 5.5.2), so the
    command is refused rather than executed. DATA lines (read up to CRLF)
    are returned untouched, and each one calls ``on_data_line``.
    """

    #: Called after each DATA line is read (the session's idle timer).
    on_data_line: Callable[[], None] | None = None
    #: Called after each command line is read (the session is busy).
    on_command: Callable[[], None] | None = None
    #: Set when the session said 421: commands already buffered (pipelined)
    #: must not run, so every later read ends the session's task.
    closed = False

    async def readuntil(self, separator: bytes = b"\n") -> bytes:  # type: ignore[override]
        if self.closed:
            raise asyncio.CancelledError
        line = await super().readuntil(separator)
        # A bare CR just before the CRLF ("DATA\r\r\n") would vanish in
        # aiosmtpd's rstrip and the command would run: refuse it like a bare
        # LF. A CR inside an argument is left to the argument checks (501).
        if separator == b"\n" and self.on_command is not None:
            self.on_command()
        if separator == b"\n" and (not line.endswith(b"\r\n") or line.endswith(b"\r\r\n")):
            return b"\n"
        if separator == b"\r\n" and self.on_data_line is not None:
            self.on_data_line()
        return line

    async def read(self, n: int = -1) -> bytes:
        if self.closed:
            raise asyncio.CancelledError
        return await super().read(n)

    def unread(self, data: bytes) -> None:
        """Put back what a block read took past the end of DATA (pipelined commands)."""
        self._buffer[0:0] = data  # type: ignore[attr-defined]
