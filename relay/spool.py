"""The durable spool: messages and their envelopes on disk, crash-safe.

Layout under ``[queue] path``::

    msg/<id>.msg    a message accepted in memory, as one file: its envelope
                    as accepted on the first line (``#relay-envelope
                    {json}``), then the message bytes, our Received first
    msg/<id>.state  that message's envelope once its state changed (wins
                    over the first line)
    msg/<id>.eml    a large (streamed) message's bytes, and the whole
    msg/<id>.json   layout of relays before one-file messages: two files
    tmp/            files being written; anything here at start-up is junk
    corrupt/        messages whose envelope cannot be read (both files, for a
                    human): never delivered, never deleted by relay
    hold/           messages an operator put on hold (``relay queue hold``),
                    files as in ``msg/``: never tried until released
    control/        requests from ``relay queue`` to the running daemon
                    (relay.control)

A message exists once it has an envelope in ``msg/``: a ``.msg``, or a
``.json`` whose ``.eml`` was renamed into place before it. One file per
message at accept time costs one fsync and one rename (docs/performance.md: the
two-file write was most of the spool threads' work and of the wait before
each 250). The new names are ones an older relay neither reads nor deletes
(it would take a ``.eml`` without ``.json`` for debris): after a rollback
those messages wait, untouched, for the newer relay. A crash at any point
leaves either a complete message or nothing that counts (a body without an
envelope is removed at start-up). Every write is temp file + fsync + rename
+ directory fsync, the sequence that survives kill -9 and power loss on
POSIX file systems.

The plain methods block. The event loop uses their ``*_async`` twins,
which run the file work in the spool's own thread pool, where concurrent
callers share the directory fsync (group commit, :class:`GroupSync`): each
caller still returns only after an fsync of ``msg/`` that started after its
own rename or unlink, so every promise above holds per message, while a
burst of N concurrent writes costs one directory fsync instead of N.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import random
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import suppress
from pathlib import Path
from typing import BinaryIO, TypeVar

from relay.envelope import Envelope
from relay.errors import SpoolError, SpoolFull

_ID_CHARS = "0123456789BCDFGHJKLMNPQRSTVWXZ"

#: Threads for spool file work. fsyncs issued concurrently share journal
#: commits on ext4/xfs, so a few more threads than cores pay off (measured:
#: 8 threads about 2x one thread's fsync rate on the development VM).
SPOOL_THREADS = 8

#: A body up to this size is held in memory whole: while it is received
#: (inbound) and while it is delivered (the scheduler reads it with one
#: read). A larger one lives in a file and is handled in pieces of about
#: this size, so each concurrent large message costs a few hundred KiB of
#: memory instead of several times its size (docs/performance.md). Most mail is far
#: smaller, and stays on the one-write, one-read path.
IN_MEMORY_MAX = 256 << 10

_T = TypeVar("_T")


#: Random bits for queue ids and temp names: unique, not secret (a queue id
#: is printed in every Received header). Seeded from os.urandom; one
#: getrandom() call per id was 2 % of the event loop's time (docs/performance.md).
_RNG = random.Random()


def new_id() -> str:
    """A queue id: sortable by arrival (microseconds), unique by 40 random bits."""
    stamp = time.time_ns() // 1000
    chars = []
    while stamp:
        stamp, digit = divmod(stamp, len(_ID_CHARS))
        chars.append(_ID_CHARS[digit])
    return "".join(reversed(chars)) + f"{_RNG.getrandbits(40):010X}"


def _tmp_suffix() -> str:
    return f"{_RNG.getrandbits(32):08x}"


_MESSAGE_SUFFIXES = (".msg", ".state", ".eml", ".json")
#: Bodies first: a crash in between leaves an envelope whose body is in
#: corrupt/, which the next load quarantines again (never a lone body).
_QUARANTINE_MOVES = (
    (".msg", ".msg"),
    (".eml", ".eml"),
    (".state", ".state"),
    (".json", ".json"),
    (".corrupt", ".json"),
)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _settle(future: asyncio.Future[_T], value: _T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(value)  # type: ignore[arg-type]
    else:
        future.set_exception(error)


def _remove_all(paths: list[str]) -> None:
    for path in paths:
        with suppress(FileNotFoundError):
            os.unlink(path)


def _spool_error(exc: OSError, what: str) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"{what}: {exc}")
    return SpoolError(f"{what}: {exc}")


#: What a GroupSync caller is told: in the fsync thread, then optionally on a loop.
_Done = Callable[[OSError | None], tuple[asyncio.AbstractEventLoop, Callable[[], None]] | None]


class GroupSync:
    """Group commit of one blocking ``sync`` (a directory fsync) for many writers.

    ``submit(done)`` after a rename or unlink: ``done(error)`` is called once
    a ``sync()`` that *started after* the submit has completed, with None, or
    with an OSError if that sync failed (a new one for each caller). The
    syncs run in a thread of their own, back to back while callers keep
    coming: each one covers every caller that arrived while the one before
    it ran, however many, and no caller holds a spool thread while it waits.
    ``done`` runs in that thread, so it must be quick; it may return
    ``(loop, call)``: the calls for one event loop are made there together,
    with one wake-up of that loop for the whole batch.

    The spool's threads submit right after their rename or unlink, so a
    durable write costs the event loop one hand-off to a thread and back.
    (The first asyncio version cost four: on a busy loop each hand-off is a
    turn of the loop, which was 9 ms of the 23 ms before a 250. Waiting in
    the spool's threads instead capped a batch at the pool's 8 threads, and
    waking the loop once per writer from this thread cost 13 %; docs/performance.md.)
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._pending: list[_Done] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        #: How many syncs ran, and how many callers they served (for benchmarks).
        self.syncs = 0
        self.served = 0

    def submit(self, done: _Done) -> None:
        with self._cond:
            self._pending.append(done)
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(
                    target=self._run, name="relay-spool-sync", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        """Serve what is pending, then stop the thread (a later submit starts it again)."""
        with self._cond:
            thread, self._closing = self._thread, True
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    self._thread = None
                    return
                # Everyone here renamed or unlinked before this sync starts;
                # later arrivals wait for the next one.
                batch, self._pending = self._pending, []
            error: OSError | None = None
            try:
                self._sync()
            except BaseException as exc:
                # Any failure fails the callers it serves: nobody may wait
                # forever, and nobody is told a failed sync succeeded.
                error = exc if isinstance(exc, OSError) else OSError(str(exc))
            self.syncs += 1
            self.served += len(batch)
            # One wake-up per event loop for the whole batch, not one per caller.
            wakeups: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
            for done in batch:
                with suppress(Exception):
                    then = done(None if error is None else _fresh_error(error))
                    if then is not None:
                        wakeups.setdefault(then[0], []).append(then[1])
            for loop, calls in wakeups.items():
                with suppress(RuntimeError):
                    loop.call_soon_threadsafe(_call_all, calls)


def _call_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


def _fresh_error(error: OSError) -> OSError:
    """A copy for one caller: one exception raised in many threads would
    collect all their tracebacks (and keep their frames alive)."""
    if error.errno is None:
        return OSError(str(error))
    return OSError(error.errno, error.strerror)


class BodyWriter:
    """A message body written into ``tmp/`` piece by piece (a large DATA).

    :meth:`write` appends in the spool's threads; :meth:`Spool.put_async`
    with ``body=`` then fsyncs it and renames it into ``msg/``. Until then
    :meth:`discard` removes the file (refused message, lost connection);
    it may be called at any time, also while a write is under way, and
    more than once. A failed write removes the file too.
    """

    def __init__(self, spool: Spool, queue_id: str) -> None:
        self._spool = spool
        self.path = spool.tmp_dir / f"{queue_id}.eml.{_tmp_suffix()}"
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
        job = self._spool._pool().submit(self._append, prefix, data)
        # The file is closed only once the thread is done with it, even
        # when the awaiting session is cancelled meanwhile.
        job.add_done_callback(lambda _: self._call_soon(loop, self._idle))
        try:
            await asyncio.wrap_future(job)
        except OSError as exc:
            self.discard()
            raise _spool_error(exc, f"cannot spool {self.path.name}") from exc
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


#: The first line of a ``.msg`` file: the envelope it was accepted with.
ENVELOPE_LINE = b"#relay-envelope "

#: A spooled body as delivery gets it: in memory, or an open file when large.
Body = bytes | BodyFile


class Spool:
    """Stores messages durably; the single owner of the spool directory."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self.msg_dir = path / "msg"
        self.tmp_dir = path / "tmp"
        self.corrupt_dir = path / "corrupt"
        self.hold_dir = path / "hold"
        self._msg = str(self.msg_dir)
        self._tmp = str(self.tmp_dir)
        #: Turn off only in tests that measure something else; 250 means durable.
        self.fsync = fsync
        self._executor: ThreadPoolExecutor | None = None
        #: The directory fsync shared by concurrent ``*_async`` writers.
        self.group = GroupSync(self._sync_msg_dir)

    # --- the event loop's API ---------------------------------------------------

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(SPOOL_THREADS, thread_name_prefix="relay-spool")
        return self._executor

    async def _in_thread(self, func: Callable[..., _T], *args: object) -> _T:
        return await asyncio.get_running_loop().run_in_executor(self._pool(), func, *args)

    def _sync_msg_dir(self) -> None:
        if self.fsync:
            _fsync_dir(self.msg_dir)

    def _durable(
        self,
        change: Callable[[], _T],
        what: str,
        undo: Callable[[_T], None] | None = None,
    ) -> asyncio.Future[_T]:
        """Run ``change`` (a rename or unlink) in a spool thread; the future is
        done once a directory fsync that started after it has completed.

        A falsy result (nothing was there to change) needs no fsync. If the
        fsync fails, ``undo`` gets the result (in the fsync's thread) and the
        future a SpoolError. A future, not a coroutine: the change is under
        way once this returns, whatever happens to the caller (inbound
        shields it), and on a busy loop a task of its own would cost a turn
        of the loop to start and another to finish.
        """
        loop = asyncio.get_running_loop()
        result: asyncio.Future[_T] = loop.create_future()

        def settle(value: _T | None, error: BaseException | None) -> None:
            with suppress(RuntimeError):  # the loop is gone: nobody waits
                loop.call_soon_threadsafe(_settle, result, value, error)

        def committed(
            value: _T, error: OSError | None
        ) -> tuple[asyncio.AbstractEventLoop, Callable[[], None]]:
            if error is None:
                return loop, functools.partial(_settle, result, value, None)
            if undo is not None:
                with suppress(OSError):
                    undo(value)
            return loop, functools.partial(_settle, result, None, _spool_error(error, what))

        def work() -> None:
            try:
                value = change()
            except BaseException as exc:
                settle(None, exc)
                return
            if not value:
                settle(value, None)
                return
            self.group.submit(functools.partial(committed, value))

        self._pool().submit(work)
        return result

    def put_async(
        self,
        envelope: Envelope,
        data: bytes,
        prefix: bytes = b"",
        body: BodyWriter | None = None,
    ) -> asyncio.Future[list[str]]:
        """:meth:`put` for the event loop (await the future): done only once the
        message is durable (fsynced and renamed, then ``msg/`` fsynced), with
        the directory fsync shared by concurrent callers. Same errors as put().
        The stored body is ``prefix + data`` (our Received header first),
        written without joining the two in memory -- or, with ``body``, the
        file that writer holds (``data`` and ``prefix`` unused), which is
        fsynced and renamed in place of writing one; it is removed if the
        message cannot be spooled."""

        def undo(placed: list[str]) -> None:
            # The client gets 451: make the removal durable too, or a crash
            # could bring back a message nobody was promised. Best effort:
            # the client gets the spool error either way.
            _remove_all(placed)
            self._sync_msg_dir()

        place = functools.partial(self._place, envelope, data, prefix, body)
        write = self._durable(place, f"cannot spool {envelope.id}", undo)
        if body is not None:
            # From now on the spool owns (and cleans up) the writer's file.
            body.placing = True
        return write

    async def update_async(self, envelope: Envelope) -> bool:
        """:meth:`update` with the directory fsync shared (group commit)."""
        replace = functools.partial(self._replace_meta, envelope)
        return await self._durable(replace, f"cannot update {envelope.id}")

    async def delete_async(self, queue_id: str) -> bool:
        """:meth:`delete` with the directory fsync shared (group commit).

        The scheduler deletes a delivered message without writing its state
        first, so the delete is the only durable record of the delivery
        until this fsync: without it a power cut could bring the message
        back with its first envelope, every recipient pending again.
        """
        unlink = functools.partial(self._unlink, queue_id)
        return await self._durable(unlink, f"cannot delete {queue_id}")

    async def open_async(self, queue_id: str, inline_max: int) -> tuple[Envelope, Body]:
        """The envelope and body of one message (KeyError / FileNotFoundError
        if gone); a body over ``inline_max`` bytes comes as an open
        :class:`BodyFile` (the caller closes it) instead of bytes."""
        return await self._in_thread(self._open, queue_id, inline_max)

    def _open(self, queue_id: str, inline_max: int) -> tuple[Envelope, Body]:
        envelope = self.load(queue_id)
        return envelope, self.open_body(queue_id, inline_max)

    def open_body(self, queue_id: str, inline_max: int, held: bool = False) -> Body:
        """The body as bytes, or as an open :class:`BodyFile` when over
        ``inline_max`` bytes (``held``: in ``hold/``). FileNotFoundError when there is none."""
        path = self._names(queue_id, self.hold_dir if held else None)[0]
        with open(path, "rb") as fh:
            if path.suffix == ".msg":
                fh.readline()  # the envelope line
            base = fh.tell()
            size = os.fstat(fh.fileno()).st_size - base
            if size <= inline_max:
                return fh.read()
            return BodyFile(os.dup(fh.fileno()), size, base)

    def body_writer(self, queue_id: str) -> BodyWriter:
        """A body file in ``tmp/`` to fill piece by piece, for :meth:`put_async`."""
        return BodyWriter(self, queue_id)

    def close(self) -> None:
        """Stop the spool's threads (after the last *_async call)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.group.close()

    # --- blocking API ------------------------------------------------------------

    def open(self) -> None:
        """Create the directories and clean up what a crash left behind."""
        for directory in (self.path, self.msg_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        self._finish_holds()
        for legacy in self.msg_dir.glob("*.corrupt"):
            # Set aside by an older relay next to its body: move both.
            self.quarantine(legacy.stem)
        for state in self.msg_dir.glob("*.state"):
            if state.with_suffix(".msg").exists():
                continue
            if (self.corrupt_dir / f"{state.stem}.msg").exists():
                self.quarantine(state.stem)  # interrupted between its renames
                continue
            # A delete cut short (the body goes first): nothing is left of it.
            state.unlink(missing_ok=True)
        for body in self.msg_dir.glob("*.eml"):
            if body.with_suffix(".json").exists():
                continue
            if (self.corrupt_dir / f"{body.stem}.json").exists():
                # A quarantine interrupted between its two renames: finish it.
                # That body was accepted; it is never deleted here.
                self.quarantine(body.stem)
                continue
            # Renamed into place but the envelope never followed: the
            # client never got a 250, so nothing was promised.
            body.unlink(missing_ok=True)

    def _finish_holds(self) -> None:
        """A hold or release cut short: the envelope joins its body in ``hold/``.

        Both move bodies and envelopes in that order and the other
        (:meth:`hold`, :meth:`release`), so an envelope in ``msg/`` whose
        body is in ``hold/`` is either; held is the safe way to finish.
        """
        if not self.hold_dir.is_dir():
            return
        for body_suffix, meta_suffix in ((".msg", ".state"), (".eml", ".json")):
            for meta in self.msg_dir.glob(f"*{meta_suffix}"):
                held = self.hold_dir / f"{meta.stem}{body_suffix}"
                if not meta.with_suffix(body_suffix).exists() and held.exists():
                    os.replace(meta, self.hold_dir / meta.name)
        if self.fsync:
            _fsync_dir(self.hold_dir)
            _fsync_dir(self.msg_dir)

    # --- held messages (relay queue hold / release) -----------------------------

    def hold(self, ids: Iterable[str]) -> list[str]:
        """Move messages from ``msg/`` to ``hold/``; the ids moved (those in ``msg/``).

        The caller makes sure nothing else writes them meanwhile: the daemon
        withdrew them from its schedule, or no daemon runs. Bodies move
        first, then (after both directories are fsynced) the envelopes, so a
        crash in between leaves a state :meth:`open` finishes as held.
        """
        return self._move(list(ids), self.msg_dir, self.hold_dir, bodies_first=True)

    def release(self, ids: Iterable[str]) -> list[str]:
        """Move held messages back to ``msg/``; the ids moved. Envelopes first
        (the reverse of :meth:`hold`): a crash in between leaves it held."""
        return self._move(list(ids), self.hold_dir, self.msg_dir, bodies_first=False)

    def _move(self, ids: list[str], source: Path, target: Path, bodies_first: bool) -> list[str]:
        target.mkdir(parents=True, exist_ok=True)
        present = [
            qid for qid in ids if any((source / f"{qid}{sfx}").exists() for sfx in (".msg", ".eml"))
        ]
        groups = [(".msg", ".eml"), (".state", ".json")]
        for suffixes in groups if bodies_first else groups[::-1]:
            for qid in present:
                for suffix in suffixes:
                    with suppress(FileNotFoundError):
                        os.replace(source / f"{qid}{suffix}", target / f"{qid}{suffix}")
            if self.fsync:
                _fsync_dir(target)
                _fsync_dir(source)
        return present

    def held(self) -> list[str]:
        """Ids of the messages on hold."""
        if not self.hold_dir.is_dir():
            return []
        return sorted({p.stem for p in self.hold_dir.iterdir() if p.suffix in _MESSAGE_SUFFIXES})

    def is_held(self, queue_id: str) -> bool:
        return any((self.hold_dir / f"{queue_id}{sfx}").exists() for sfx in (".msg", ".eml"))

    def load_held(self, unreadable: list[str] | None = None) -> Iterator[Envelope]:
        """Every held envelope, oldest first; unreadable ones are skipped (and
        appended to ``unreadable``), never moved."""
        for queue_id in self.held():
            data = self._envelope_bytes(queue_id, self.hold_dir)
            if data is None:
                continue
            try:
                yield Envelope.loads(data)
            except (ValueError, KeyError, TypeError):
                if unreadable is not None:
                    unreadable.append(queue_id)

    def delete_held(self, queue_id: str) -> bool:
        """Remove a held message; False when there was none."""
        existed = False
        for suffix in (".msg", ".eml", ".state", ".json"):  # bodies first
            with suppress(FileNotFoundError):
                (self.hold_dir / f"{queue_id}{suffix}").unlink()
                existed = True
        if existed and self.fsync:
            _fsync_dir(self.hold_dir)
        return existed

    def _write(self, name: str, data: bytes, prefix: bytes = b"") -> str:
        """``prefix + data`` fsynced in a new file in ``tmp/``; its path.

        Paths in the hot spool operations are plain strings: pathlib's
        parsing was a fifth of the spool threads' Python time, which the
        event loop waits for (the GIL; docs/performance.md).
        """
        tmp = f"{self._tmp}/{name}.{_tmp_suffix()}"
        try:
            with open(tmp, "wb") as fh:
                if prefix:
                    fh.write(prefix)
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return tmp

    def put(self, envelope: Envelope, data: bytes) -> None:
        """Store a new message durably; return only once it is on disk.

        Raises SpoolFull (disk full) or SpoolError (anything else); either
        way nothing of the message is left behind.
        """
        placed = self._place(envelope, data)
        try:
            self._sync_msg_dir()
        except OSError as exc:
            _remove_all(placed)
            raise _spool_error(exc, f"cannot spool {envelope.id}") from exc

    def _place(
        self,
        envelope: Envelope,
        data: bytes,
        prefix: bytes = b"",
        writer: BodyWriter | None = None,
    ) -> list[str]:
        """Write the message fsynced and rename it into ``msg/``; the caller
        fsyncs the directory. Leaves nothing behind on error. In memory: one
        file, the envelope line first. With ``writer`` (its file already
        written, and begun before the envelope was known): that file as the
        body, then the ``.json``. Returns the paths placed."""
        envelope.size = len(prefix) + len(data) if writer is None else writer.size
        written: list[str] = []
        try:
            if writer is None:
                name = f"{envelope.id}.msg"
                line = ENVELOPE_LINE + envelope.dumps_line() + b"\n"
                tmp_one = self._write(name, data, line + prefix)
                written.append(tmp_one)
                one = f"{self._msg}/{name}"
                os.replace(tmp_one, one)
                return [one]
            body = f"{self._msg}/{envelope.id}.eml"
            meta = f"{self._msg}/{envelope.id}.json"
            tmp_body = str(writer.finish(self.fsync))
            written.append(tmp_body)
            tmp_meta = self._write(f"{envelope.id}.json", envelope.dumps())
            written.append(tmp_meta)
            os.replace(tmp_body, body)
            written[0] = body
            os.replace(tmp_meta, meta)
            written[1] = meta
        except OSError as exc:
            _remove_all(written)
            raise _spool_error(exc, f"cannot spool {envelope.id}") from exc
        return written

    def update(self, envelope: Envelope) -> bool:
        """Persist a changed envelope (recipient states, next attempt) atomically.

        Only an existing message is updated: False (and nothing written)
        when its envelope or body is gone, e.g. ``relay queue delete`` ran
        during the attempt. Raises SpoolFull / SpoolError when the write fails.
        """
        if not self._replace_meta(envelope):
            return False
        try:
            self._sync_msg_dir()
        except OSError as exc:
            raise _spool_error(exc, f"cannot update {envelope.id}") from exc
        return True

    def update_many(self, envelopes: Iterable[Envelope]) -> list[str]:
        """:meth:`update` for many, one directory fsync in all; the ids updated."""
        updated = [e.id for e in envelopes if self._replace_meta(e)]
        if updated:
            try:
                self._sync_msg_dir()
            except OSError as exc:
                raise _spool_error(exc, "cannot update the spool") from exc
        return updated

    def _replace_meta(self, envelope: Envelope) -> bool:
        """Rename a new envelope over the old one (no directory fsync): False if gone."""
        body, meta = self._names(envelope.id)
        if not (body.exists() and (body.suffix == ".msg" or meta.exists())):
            return False
        try:
            tmp = self._write(meta.name, envelope.dumps())
            os.replace(tmp, meta)
            if not body.exists():
                # Deleted between the check and the rename: do not leave an
                # envelope without a body behind.
                meta.unlink(missing_ok=True)
                return False
        except OSError as exc:
            raise _spool_error(exc, f"cannot update {envelope.id}") from exc
        return True

    def load(self, queue_id: str, held: bool = False) -> Envelope:
        """The envelope of one message (``held``: in ``hold/``); KeyError when there is none."""
        data = self._envelope_bytes(queue_id, self.hold_dir if held else None)
        if data is None:
            raise KeyError(queue_id)
        return Envelope.loads(data)

    def _names(self, queue_id: str, directory: Path | None = None) -> tuple[Path, Path]:
        """(body, envelope) paths: ``.msg`` and ``.state`` for a one-file
        message, else ``.eml`` and ``.json``; in ``msg/`` unless ``directory``."""
        where = directory or self.msg_dir
        one = where / f"{queue_id}.msg"
        if one.exists():
            return one, where / f"{queue_id}.state"
        return where / f"{queue_id}.eml", where / f"{queue_id}.json"

    def _envelope_bytes(self, queue_id: str, directory: Path | None = None) -> bytes | None:
        """The stored envelope's JSON; None when there is no message."""
        body, meta = self._names(queue_id, directory)
        try:
            return meta.read_bytes()
        except FileNotFoundError:
            pass
        if body.suffix != ".msg":
            return None
        try:
            with open(body, "rb") as fh:
                line = fh.readline()
        except FileNotFoundError:
            return None
        # Not our line: unreadable, so quarantined (never taken as a body).
        return line[len(ENVELOPE_LINE) :] if line.startswith(ENVELOPE_LINE) else line

    def load_all(
        self, quarantine: bool = True, unreadable: list[str] | None = None
    ) -> Iterator[Envelope]:
        """Every spooled envelope, oldest first; unreadable ones are skipped.

        With ``quarantine`` (the daemon) an unreadable message is moved to
        ``corrupt/``; without it (the read-only CLI) it is left where it is.
        Either way its id is appended to ``unreadable`` when given.
        """
        ids = sorted({p.stem for p in self.msg_dir.iterdir() if p.suffix in _MESSAGE_SUFFIXES})
        for queue_id in ids:
            data = self._envelope_bytes(queue_id)
            if data is None:
                # Delivered and deleted since the listing (the daemon runs
                # while `relay queue list` reads): gone, not corrupt. Or a
                # body whose envelope never followed (removed at start-up).
                continue
            try:
                envelope = Envelope.loads(data)
            except (OSError, ValueError, KeyError, TypeError):
                if unreadable is not None:
                    unreadable.append(queue_id)
                if quarantine:
                    self.quarantine(queue_id)
                continue
            yield envelope

    def quarantine(self, queue_id: str) -> None:
        """Move a message whose envelope cannot be read to ``corrupt/``, body and all.

        Out of the way of the scheduler, kept for a human. The body moves
        first: a crash in between leaves ``corrupt/<id>.eml`` next to
        ``msg/<id>.json``, which the next load quarantines again, and never
        a body without an envelope (which :meth:`open` would delete).
        """
        self.corrupt_dir.mkdir(parents=True, exist_ok=True)
        for suffix, target in _QUARANTINE_MOVES:
            with suppress(FileNotFoundError):
                os.replace(
                    self.msg_dir / f"{queue_id}{suffix}", self.corrupt_dir / f"{queue_id}{target}"
                )
        if self.fsync:
            _fsync_dir(self.corrupt_dir)
            _fsync_dir(self.msg_dir)

    def quarantined(self) -> list[str]:
        """Ids of the messages set aside in ``corrupt/`` (read-only)."""
        if not self.corrupt_dir.is_dir():
            return []
        return sorted({p.stem for p in self.corrupt_dir.iterdir() if p.suffix in _MESSAGE_SUFFIXES})

    def has_body(self, queue_id: str) -> bool:
        """Whether the message's body is still in ``msg/`` (one stat for a ``.msg``)."""
        stem = f"{self._msg}/{queue_id}"
        for suffix in (".msg", ".eml"):
            try:
                os.stat(stem + suffix)
            except (FileNotFoundError, NotADirectoryError):
                continue
            return True
        # Only a missing file is "no body": any other error (EIO) raises,
        # or a disk hiccup would look like `relay queue delete`.
        return False

    def body_path(self, queue_id: str) -> Path:
        """The file holding the message bytes (after the envelope line in a ``.msg``)."""
        return self._names(queue_id)[0]

    def read_body(self, queue_id: str) -> bytes:
        """The whole body as bytes (after a ``.msg``'s envelope line)."""
        body = self.open_body(queue_id, sys.maxsize)
        assert isinstance(body, bytes)  # no file is over sys.maxsize bytes
        return body

    def delete(self, queue_id: str) -> bool:
        """Remove a message; False when there was none.

        The body first: it may carry the envelope, and a body left alone
        would be a message again. A crash in between leaves a ``.json``
        without a body, which the scheduler drops when it comes due.
        """
        if not self._unlink(queue_id):
            return False
        self._sync_msg_dir()
        return True

    def _unlink(self, queue_id: str) -> bool:
        existed = False
        stem = f"{self._msg}/{queue_id}"
        for suffix in (".msg", ".eml", ".state", ".json"):  # bodies first
            try:
                os.unlink(stem + suffix)
                existed = True
            except FileNotFoundError:
                pass
        return existed

    def writable(self) -> bool:
        """True when a new file can be created in the spool (for /healthz)."""
        return os.access(self.tmp_dir, os.W_OK | os.X_OK)
