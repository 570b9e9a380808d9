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

Bodies are relay.spoolbody's, ``hold/`` is relay.hold's, ``corrupt/``
relay.quarantine's, file names and the envelope line relay.spoolfiles'.
"""

from __future__ import annotations

import asyncio
import functools
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from relay.envelope import Envelope
from relay.groupcommit import GroupSync, durable, name_os_thread
from relay.hold import HoldArea
from relay.quarantine import Quarantine
from relay.spoolbody import Body, BodyWriter, open_body
from relay.spoolfiles import (
    ENVELOPE_LINE,
    MESSAGE_SUFFIXES,
    envelope_bytes,
    fsync_dir,
    message_paths,
    remove_all,
    spool_error,
    tmp_suffix,
    write_temp,
)

#: Threads for spool file work. fsyncs issued concurrently share journal
#: commits on ext4/xfs, so a few more threads than cores pay off (measured:
#: 8 threads about 2x one thread's fsync rate on the development VM).
SPOOL_THREADS = 8


class Spool:
    """Stores messages durably; the single owner of the spool directory."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self.msg_dir = path / "msg"
        self.tmp_dir = path / "tmp"
        self.corrupt_dir = path / "corrupt"
        self.hold_dir = path / "hold"
        #: Messages on hold (``relay queue hold``), files as in ``msg/``.
        self.hold = HoldArea(self.hold_dir, self.msg_dir, fsync)
        #: Messages whose envelope cannot be read, set aside for a human.
        self.quarantine = Quarantine(self.corrupt_dir, self.msg_dir, fsync)
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
            self._executor = ThreadPoolExecutor(
                SPOOL_THREADS,
                thread_name_prefix="relay-spool",
                initializer=name_os_thread,
                initargs=("relay-spool",),
            )
        return self._executor

    def _sync_msg_dir(self) -> None:
        if self.fsync:
            fsync_dir(self.msg_dir)

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
            remove_all(placed)
            self._sync_msg_dir()

        place = functools.partial(self._place, envelope, data, prefix, body)
        write = durable(self._pool(), self.group, place, f"cannot spool {envelope.id}", undo)
        if body is not None:
            # From now on the spool owns (and cleans up) the writer's file.
            body.placing = True
        return write

    async def update_async(self, envelope: Envelope) -> bool:
        """Persist a changed envelope (recipient states, next attempt) atomically,
        with the directory fsync shared (group commit).

        Only an existing message is updated: False (and nothing written)
        when its envelope or body is gone, e.g. ``relay queue delete`` ran
        during the attempt. Raises SpoolFull / SpoolError when the write fails.
        """
        replace = functools.partial(self._replace_meta, envelope)
        return await durable(self._pool(), self.group, replace, f"cannot update {envelope.id}")

    async def delete_async(self, queue_id: str) -> bool:
        """:meth:`delete` with the directory fsync shared (group commit).

        The scheduler deletes a delivered message without writing its state
        first, so the delete is the only durable record of the delivery
        until this fsync: without it a power cut could bring the message
        back with its first envelope, every recipient pending again.
        """
        unlink = functools.partial(self._unlink, queue_id)
        return await durable(self._pool(), self.group, unlink, f"cannot delete {queue_id}")

    async def open_async(self, queue_id: str, inline_max: int) -> tuple[Envelope, Body]:
        """The envelope and body of one message (KeyError / FileNotFoundError
        if gone); a body over ``inline_max`` bytes comes as an open
        :class:`BodyFile` (the caller closes it) instead of bytes."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool(), self._open, queue_id, inline_max)

    def _open(self, queue_id: str, inline_max: int) -> tuple[Envelope, Body]:
        envelope = self.load(queue_id)
        return envelope, self.open_body(queue_id, inline_max)

    def open_body(self, queue_id: str, inline_max: int) -> Body:
        """The body as bytes, or as an open :class:`BodyFile` when over
        ``inline_max`` bytes. FileNotFoundError when there is none."""
        return open_body(message_paths(self.msg_dir, queue_id)[0], inline_max)

    def body_writer(self, queue_id: str) -> BodyWriter:
        """A body file in ``tmp/`` to fill piece by piece, for :meth:`put_async`."""
        return BodyWriter(self.tmp_dir / f"{queue_id}.eml.{tmp_suffix()}", self._pool)

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
        self.hold.finish_moves()
        for legacy in self.msg_dir.glob("*.corrupt"):
            # Set aside by an older relay next to its body: move both.
            self.quarantine.add(legacy.stem)
        for state in self.msg_dir.glob("*.state"):
            if state.with_suffix(".msg").exists():
                continue
            if (self.corrupt_dir / f"{state.stem}.msg").exists():
                self.quarantine.add(state.stem)  # interrupted between its renames
                continue
            # A delete cut short (the body goes first): nothing is left of it.
            state.unlink(missing_ok=True)
        for body in self.msg_dir.glob("*.eml"):
            if body.with_suffix(".json").exists():
                continue
            if (self.corrupt_dir / f"{body.stem}.json").exists():
                # A quarantine interrupted between its two renames: finish it.
                # That body was accepted; it is never deleted here.
                self.quarantine.add(body.stem)
                continue
            # Renamed into place but the envelope never followed: the
            # client never got a 250, so nothing was promised.
            body.unlink(missing_ok=True)

    def put(self, envelope: Envelope, data: bytes) -> None:
        """Store a new message durably; return only once it is on disk.

        Raises SpoolFull (disk full) or SpoolError (anything else); either
        way nothing of the message is left behind.
        """
        placed = self._place(envelope, data)
        try:
            self._sync_msg_dir()
        except OSError as exc:
            remove_all(placed)
            raise spool_error(exc, f"cannot spool {envelope.id}") from exc

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
                tmp_one = write_temp(self._tmp, name, data, line + prefix, fsync=self.fsync)
                written.append(tmp_one)
                one = f"{self._msg}/{name}"
                os.replace(tmp_one, one)
                return [one]
            body = f"{self._msg}/{envelope.id}.eml"
            meta = f"{self._msg}/{envelope.id}.json"
            tmp_body = str(writer.finish(self.fsync))
            written.append(tmp_body)
            tmp_meta = write_temp(
                self._tmp, f"{envelope.id}.json", envelope.dumps(), fsync=self.fsync
            )
            written.append(tmp_meta)
            os.replace(tmp_body, body)
            written[0] = body
            os.replace(tmp_meta, meta)
            written[1] = meta
        except OSError as exc:
            remove_all(written)
            raise spool_error(exc, f"cannot spool {envelope.id}") from exc
        return written

    def update_many(self, envelopes: Iterable[Envelope]) -> list[str]:
        """Persist changed envelopes (recipient states, next attempt) atomically,
        one directory fsync in all; the ids updated.

        Only existing messages are updated: one whose envelope or body is
        gone (``relay queue delete`` ran meanwhile) is left out, nothing
        written. Raises SpoolFull / SpoolError when a write fails.
        """
        updated = [e.id for e in envelopes if self._replace_meta(e)]
        if updated:
            try:
                self._sync_msg_dir()
            except OSError as exc:
                raise spool_error(exc, "cannot update the spool") from exc
        return updated

    def _replace_meta(self, envelope: Envelope) -> bool:
        """Rename a new envelope over the old one (no directory fsync): False if gone."""
        body, meta = message_paths(self.msg_dir, envelope.id)
        if not (body.exists() and (body.suffix == ".msg" or meta.exists())):
            return False
        try:
            tmp = write_temp(self._tmp, meta.name, envelope.dumps(), fsync=self.fsync)
            os.replace(tmp, meta)
            if not body.exists():
                # Deleted between the check and the rename: do not leave an
                # envelope without a body behind.
                meta.unlink(missing_ok=True)
                return False
        except OSError as exc:
            raise spool_error(exc, f"cannot update {envelope.id}") from exc
        return True

    def load(self, queue_id: str) -> Envelope:
        """The envelope of one message; KeyError when there is none."""
        data = envelope_bytes(self.msg_dir, queue_id)
        if data is None:
            raise KeyError(queue_id)
        return Envelope.loads(data)

    def load_all(
        self, quarantine: bool = True, unreadable: list[str] | None = None
    ) -> Iterator[Envelope]:
        """Every spooled envelope, oldest first; unreadable ones are skipped.

        With ``quarantine`` (the daemon) an unreadable message is moved to
        ``corrupt/``; without it (the read-only CLI) it is left where it is.
        Either way its id is appended to ``unreadable`` when given.
        """
        ids = sorted({p.stem for p in self.msg_dir.iterdir() if p.suffix in MESSAGE_SUFFIXES})
        for queue_id in ids:
            data = envelope_bytes(self.msg_dir, queue_id)
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
                    self.quarantine.add(queue_id)
                continue
            yield envelope

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
        for suffix in MESSAGE_SUFFIXES:  # bodies first
            try:
                os.unlink(stem + suffix)
                existed = True
            except FileNotFoundError:
                pass
        return existed

    def writable(self) -> bool:
        """True when a new file can be created in the spool (for /healthz)."""
        return os.access(self.tmp_dir, os.W_OK | os.X_OK)
