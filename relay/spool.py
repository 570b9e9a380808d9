"""The durable spool: messages and their envelopes on disk, crash-safe.

Layout under ``[queue] path``::

    msg/<id>.eml    the message bytes, our Received header first
    msg/<id>.json   the envelope (relay.envelope.Envelope as JSON)
    tmp/            files being written; anything here at start-up is junk
    corrupt/        messages whose envelope cannot be read (both files, for a
                    human): never delivered, never deleted by relay

A message exists once its ``.json`` is in ``msg/``: the body is renamed
into place first, the envelope second, and the directory is fsynced after
both, so a crash at any point leaves either a complete message or nothing
that counts (an orphan body is removed at start-up). Every write is
temp file + fsync + rename + directory fsync, the sequence that survives
kill -9 and power loss on POSIX file systems.

All methods block; the asyncio side calls them through ``asyncio.to_thread``.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

from relay.envelope import Envelope
from relay.errors import SpoolError, SpoolFull

_ID_CHARS = "0123456789BCDFGHJKLMNPQRSTVWXZ"


def new_id() -> str:
    """A queue id: sortable by arrival (microseconds), unique by 40 random bits."""
    stamp = time.time_ns() // 1000
    chars = []
    while stamp:
        stamp, digit = divmod(stamp, len(_ID_CHARS))
        chars.append(_ID_CHARS[digit])
    return "".join(reversed(chars)) + secrets.token_hex(5).upper()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _spool_error(exc: OSError, what: str) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"{what}: {exc}")
    return SpoolError(f"{what}: {exc}")


class Spool:
    """Stores messages durably; the single owner of the spool directory."""

    def __init__(self, path: Path, fsync: bool = True) -> None:
        self.path = path
        self.msg_dir = path / "msg"
        self.tmp_dir = path / "tmp"
        self.corrupt_dir = path / "corrupt"
        #: Turn off only in tests that measure something else; 250 means durable.
        self.fsync = fsync

    def open(self) -> None:
        """Create the directories and clean up what a crash left behind."""
        for directory in (self.path, self.msg_dir, self.tmp_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp_dir.iterdir():
            leftover.unlink(missing_ok=True)
        for legacy in self.msg_dir.glob("*.corrupt"):
            # Set aside by an older relay next to its body: move both.
            self.quarantine(legacy.stem)
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

    def _write(self, target: Path, data: bytes) -> Path:
        tmp = self.tmp_dir / f"{target.name}.{secrets.token_hex(4)}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
                if self.fsync:
                    fh.flush()
                    os.fsync(fh.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return tmp

    def put(self, envelope: Envelope, data: bytes) -> None:
        """Store a new message durably; return only once it is on disk.

        Raises SpoolFull (disk full) or SpoolError (anything else); either
        way nothing of the message is left behind.
        """
        body = self.msg_dir / f"{envelope.id}.eml"
        meta = self.msg_dir / f"{envelope.id}.json"
        envelope.size = len(data)
        written: list[Path] = []
        try:
            tmp_body = self._write(body, data)
            written.append(tmp_body)
            tmp_meta = self._write(meta, envelope.dumps())
            written.append(tmp_meta)
            os.replace(tmp_body, body)
            written[0] = body
            os.replace(tmp_meta, meta)
            written[1] = meta
            if self.fsync:
                _fsync_dir(self.msg_dir)
        except OSError as exc:
            for path in written:
                path.unlink(missing_ok=True)
            raise _spool_error(exc, f"cannot spool {envelope.id}") from exc

    def update(self, envelope: Envelope) -> bool:
        """Persist a changed envelope (recipient states, next attempt) atomically.

        Only an existing message is updated: False (and nothing written)
        when its envelope or body is gone, e.g. ``relay queue delete`` ran
        during the attempt. Raises SpoolFull / SpoolError when the write fails.
        """
        meta = self.msg_dir / f"{envelope.id}.json"
        body = self.body_path(envelope.id)
        if not (meta.exists() and body.exists()):
            return False
        try:
            tmp = self._write(meta, envelope.dumps())
            os.replace(tmp, meta)
            if not body.exists():
                # Deleted between the check and the rename: do not leave an
                # envelope without a body behind.
                meta.unlink(missing_ok=True)
                return False
            if self.fsync:
                _fsync_dir(self.msg_dir)
        except OSError as exc:
            raise _spool_error(exc, f"cannot update {envelope.id}") from exc
        return True

    def load(self, queue_id: str) -> Envelope:
        """The envelope of one message; KeyError when there is none."""
        try:
            return Envelope.loads((self.msg_dir / f"{queue_id}.json").read_bytes())
        except FileNotFoundError:
            raise KeyError(queue_id) from None

    def load_all(
        self, quarantine: bool = True, unreadable: list[str] | None = None
    ) -> Iterator[Envelope]:
        """Every spooled envelope, oldest first; unreadable ones are skipped.

        With ``quarantine`` (the daemon) an unreadable message is moved to
        ``corrupt/``; without it (the read-only CLI) it is left where it is.
        Either way its id is appended to ``unreadable`` when given.
        """
        for meta in sorted(self.msg_dir.glob("*.json")):
            try:
                data = meta.read_bytes()
            except FileNotFoundError:
                # Delivered and deleted since the listing (the daemon runs
                # while `relay queue list` reads): gone, not corrupt.
                continue
            try:
                envelope = Envelope.loads(data)
            except (OSError, ValueError, KeyError, TypeError):
                if unreadable is not None:
                    unreadable.append(meta.stem)
                if quarantine:
                    self.quarantine(meta.stem)
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
        for suffix, target in ((".eml", ".eml"), (".json", ".json"), (".corrupt", ".json")):
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
        return sorted({p.stem for p in self.corrupt_dir.iterdir() if p.suffix in (".json", ".eml")})

    def body_path(self, queue_id: str) -> Path:
        return self.msg_dir / f"{queue_id}.eml"

    def read_body(self, queue_id: str) -> bytes:
        return self.body_path(queue_id).read_bytes()

    def delete(self, queue_id: str) -> bool:
        """Remove a message (envelope first, so a crash leaves an orphan body, not a ghost)."""
        meta = self.msg_dir / f"{queue_id}.json"
        if not meta.exists():
            return False
        meta.unlink(missing_ok=True)
        self.body_path(queue_id).unlink(missing_ok=True)
        if self.fsync:
            _fsync_dir(self.msg_dir)
        return True

    def writable(self) -> bool:
        """True when a new file can be created in the spool (for /healthz)."""
        return os.access(self.tmp_dir, os.W_OK | os.X_OK)
