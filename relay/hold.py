"""Messages an operator put on hold (``relay queue hold``): never tried until released.

The ``hold/`` directory of the spool holds their files as ``msg/`` does
(relay.spool). Moves between the two go bodies and envelopes in a set
order, so a crash halfway leaves a state :meth:`HoldArea.finish_moves`
completes as held.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from contextlib import suppress
from pathlib import Path

from relay.envelope import Envelope
from relay.spoolbody import Body, open_body
from relay.spoolfiles import (
    MESSAGE_SUFFIXES,
    envelope_bytes,
    fsync_dir,
    message_ids,
    message_paths,
)


class HoldArea:
    """The spool's ``hold/`` directory, next to its ``msg/``."""

    def __init__(self, path: Path, msg_dir: Path, fsync: bool) -> None:
        self.path = path
        self._msg_dir = msg_dir
        self._fsync = fsync

    def add(self, ids: Iterable[str]) -> list[str]:
        """Move messages from ``msg/`` to ``hold/``; the ids moved (those in ``msg/``).

        The caller makes sure nothing else writes them meanwhile: the daemon
        withdrew them from its schedule, or no daemon runs. Bodies move
        first, then (after both directories are fsynced) the envelopes, so a
        crash in between leaves a state :meth:`finish_moves` finishes as held.
        """
        return self._move(list(ids), self._msg_dir, self.path, bodies_first=True)

    def release(self, ids: Iterable[str]) -> list[str]:
        """Move held messages back to ``msg/``; the ids moved. Envelopes first
        (the reverse of :meth:`add`): a crash in between leaves it held."""
        return self._move(list(ids), self.path, self._msg_dir, bodies_first=False)

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
            if self._fsync:
                fsync_dir(target)
                fsync_dir(source)
        return present

    def finish_moves(self) -> None:
        """A hold or release cut short: the envelope joins its body in ``hold/``.

        Both move bodies and envelopes in that order and the other
        (:meth:`add`, :meth:`release`), so an envelope in ``msg/`` whose
        body is in ``hold/`` is either; held is the safe way to finish.
        """
        if not self.path.is_dir():
            return
        for body_suffix, meta_suffix in ((".msg", ".state"), (".eml", ".json")):
            for meta in self._msg_dir.glob(f"*{meta_suffix}"):
                held = self.path / f"{meta.stem}{body_suffix}"
                if not meta.with_suffix(body_suffix).exists() and held.exists():
                    os.replace(meta, self.path / meta.name)
        if self._fsync:
            fsync_dir(self.path)
            fsync_dir(self._msg_dir)

    def ids(self) -> list[str]:
        """Ids of the messages on hold."""
        return message_ids(self.path)

    def __contains__(self, queue_id: str) -> bool:
        return any((self.path / f"{queue_id}{sfx}").exists() for sfx in (".msg", ".eml"))

    def load(self, queue_id: str) -> Envelope:
        """The envelope of one held message; KeyError when there is none."""
        data = envelope_bytes(self.path, queue_id)
        if data is None:
            raise KeyError(queue_id)
        return Envelope.loads(data)

    def load_all(self, unreadable: list[str] | None = None) -> Iterator[Envelope]:
        """Every held envelope, oldest first; unreadable ones are skipped (and
        appended to ``unreadable``), never moved."""
        for queue_id in self.ids():
            data = envelope_bytes(self.path, queue_id)
            if data is None:
                continue
            try:
                yield Envelope.loads(data)
            except (ValueError, KeyError, TypeError):
                if unreadable is not None:
                    unreadable.append(queue_id)

    def open_body(self, queue_id: str, inline_max: int) -> Body:
        """A held message's body (relay.spoolbody.open_body); FileNotFoundError if none."""
        return open_body(message_paths(self.path, queue_id)[0], inline_max)

    def delete(self, queue_id: str) -> bool:
        """Remove a held message; False when there was none."""
        existed = False
        for suffix in MESSAGE_SUFFIXES:  # bodies first
            with suppress(FileNotFoundError):
                (self.path / f"{queue_id}{suffix}").unlink()
                existed = True
        if existed and self._fsync:
            fsync_dir(self.path)
        return existed
