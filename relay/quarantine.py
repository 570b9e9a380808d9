"""Messages whose envelope cannot be read, set aside in the spool's ``corrupt/``.

Out of the way of the scheduler, kept for a human: never delivered, never
deleted by relay (docs/queue.md).
"""

from __future__ import annotations

import os
from contextlib import suppress
from pathlib import Path

from relay.spoolfiles import fsync_dir, message_ids

#: Bodies first: a crash in between leaves an envelope whose body is in
#: corrupt/, which the next load quarantines again (never a lone body).
_MOVES = (
    (".msg", ".msg"),
    (".eml", ".eml"),
    (".state", ".state"),
    (".json", ".json"),
    (".corrupt", ".json"),
)


class Quarantine:
    """The spool's ``corrupt/`` directory, next to its ``msg/``."""

    def __init__(self, path: Path, msg_dir: Path, fsync: bool) -> None:
        self.path = path
        self._msg_dir = msg_dir
        self._fsync = fsync

    def add(self, queue_id: str) -> None:
        """Move a message from ``msg/`` to ``corrupt/``, body and all.

        The body moves first: a crash in between leaves ``corrupt/<id>.eml``
        next to ``msg/<id>.json``, which the next load quarantines again, and
        never a body without an envelope (which :meth:`relay.spool.Spool.open`
        would delete).
        """
        self.path.mkdir(parents=True, exist_ok=True)
        for suffix, target in _MOVES:
            with suppress(FileNotFoundError):
                os.replace(self._msg_dir / f"{queue_id}{suffix}", self.path / f"{queue_id}{target}")
        if self._fsync:
            fsync_dir(self.path)
            fsync_dir(self._msg_dir)

    def ids(self) -> list[str]:
        """Ids of the messages set aside (read-only)."""
        return message_ids(self.path)
