"""A spooled message body: written in pieces as it arrives, read in pieces when large.

Most bodies are small and handled whole, as bytes; one over
:data:`IN_MEMORY_MAX` is written by a :class:`BodyWriter` and delivered
from a :class:`BodyFile`, so a large message never sits in memory whole.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO

from relay.errors import SpoolError
from relay.spoolfiles import spool_error

#: A body up to this size is held in memory whole: while it is received
#: (inbound) and while it is delivered (the scheduler reads it with one
#: read). A larger one lives in a file and is handled in pieces of about
#: this size, so each concurrent large message costs a few hundred KiB of
#: memory instead of several times its size (docs/performance.md). Most mail is far
#: smaller, and stays on the one-write, one-read path.
IN_MEMORY_MAX = 256 << 10


class BodyWriter:
    """A message body written into ``tmp/`` piece by piece (a large DATA).

    Made by :meth:`relay.spool.Spool.body_writer`. :meth:`write` appends in
    the spool's threads; :meth:`Spool.put_async` with ``body=`` then fsyncs
    it and renames it into ``msg/``. Until then :meth:`discard` removes the
    file (refused message, lost connection); it may be called at any time,
    also while a write is under way, and more than once. A failed write removes the file too.
    """

    def __init__(self, path: Path, pool: Callable[[], Executor]) -> None:
        #: The spool's thread pool (started on first use).
        self._pool = pool
        self.path = path
        self.size = 0
        self._fh: BinaryIO | None = None
        #: Writes submitted to a thread and not finished there yet.
        self._busy = 0
        self._discarded = False
        #: Set by put_async: from then on the spool owns (and cleans up) the file.
        self.placing = False

    async def write(self, data: bytes, prefix: bytes = b"") -> None:
        """Append ``prefix + data`` (not joined in memory). Raises SpoolFull /
        SpoolError, after which the file is gone and the writer is discarded."""
        if self._discarded:
            raise SpoolError(f"cannot spool: {self.path.name} was discarded")
        loop = asyncio.get_running_loop()
        self._busy += 1
        job = self._pool().submit(self._append, prefix, data)
        # The file is closed only once the thread is done with it, even
        # when the awaiting session is cancelled meanwhile.
        job.add_done_callback(lambda _: self._call_soon(loop, self._idle))
        try:
            await asyncio.wrap_future(job)
        except OSError as exc:
            self.discard()
            raise spool_error(exc, f"cannot spool {self.path.name}") from exc
        self.size += len(prefix) + len(data)

    def _append(self, prefix: bytes, data: bytes) -> None:
        if self._fh is None:
            self._fh = open(self.path, "wb")  # noqa: SIM115 - closed by _close
        if prefix:
            self._fh.write(prefix)
        self._fh.write(data)

    @staticmethod
    def _call_soon(loop: asyncio.AbstractEventLoop, func: Callable[[], None]) -> None:
        with suppress(RuntimeError):  # the loop is closed: the process is ending
            loop.call_soon_threadsafe(func)

    def _idle(self) -> None:
        self._busy -= 1
        if self._discarded and not self._busy:
            self._close()

    def _close(self) -> None:
        if self._fh is not None:
            with suppress(OSError):
                self._fh.close()
            self._fh = None

    def discard(self) -> None:
        """Remove the file now (a no-op once :meth:`Spool.put_async` took it)."""
        if self.placing or self._discarded:
            return
        self._discarded = True
        self.path.unlink(missing_ok=True)
        if not self._busy:
            self._close()

    def finish(self, fsync: bool) -> Path:
        """Flush, fsync and close (blocking, in a spool thread); the temp path.
        On error the file is removed and the OSError raised."""
        try:
            if self._fh is None:
                self._fh = open(self.path, "wb")  # noqa: SIM115 - closed below
            self._fh.flush()
            if fsync:
                os.fsync(self._fh.fileno())
            self._fh.close()
            self._fh = None
        except BaseException:
            self._close()
            self.path.unlink(missing_ok=True)
            raise
        return self.path


class BodyFile:
    """A spooled body read in pieces (:data:`IN_MEMORY_MAX` and up), never whole.

    Holds the file open, so a ``relay queue delete`` during delivery does
    not cut the body short. :meth:`read` is a positioned read (pread), so
    concurrent readers (one per route) do not disturb each other. Blocking:
    call it in a thread. Close it when the delivery cycle ends.
    """

    def __init__(self, fd: int, size: int, base: int = 0) -> None:
        self._fd = fd
        self.size = size
        #: Where the body starts in the file (after an envelope line).
        self._base = base
        #: Cached result of a scan for bare CR/LF (delivery's check), or None.
        self.bare_line_ending: bool | None = None

    def read(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes from ``offset`` (fewer only at the end)."""
        parts: list[bytes] = []
        while length > 0:
            part = os.pread(self._fd, length, self._base + offset)
            if not part:
                break
            parts.append(part)
            offset += len(part)
            length -= len(part)
        return b"".join(parts) if len(parts) != 1 else parts[0]

    def head(self, limit: int) -> bytes:
        """The first ``limit`` bytes, cut after their last CRLF when the body
        is longer (whole lines only): enough for the header section."""
        data = self.read(0, limit)
        if self.size > limit:
            data = data[: data.rfind(b"\r\n") + 2]
        return data

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> BodyFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: A spooled body as delivery gets it: in memory, or an open file when large.
Body = bytes | BodyFile


def open_body(path: Path, inline_max: int) -> Body:
    """The body in ``path`` (after a ``.msg``'s envelope line) as bytes, or as
    an open :class:`BodyFile` when over ``inline_max`` bytes. FileNotFoundError
    when there is none."""
    with open(path, "rb") as fh:
        if path.suffix == ".msg":
            fh.readline()  # the envelope line
        base = fh.tell()
        size = os.fstat(fh.fileno()).st_size - base
        if size <= inline_max:
            return fh.read()
        return BodyFile(os.dup(fh.fileno()), size, base)
