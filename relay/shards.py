"""Spool shards: one spool directory per worker process (relay.workers).

Worker 0's shard is ``[queue] path`` itself, so a spool written by a
single-process relay is shard 0 unchanged, and going back to one process
needs nothing. Worker ``k`` > 0 has ``<path>/shards/<k>``, a complete
spool of its own (``msg/``, ``tmp/``, ``hold/``, ``corrupt/``,
``control/``; relay.spool) that only that worker writes.

When ``workers`` shrinks, shards numbered ``count`` and above have no
worker: :func:`adopt_orphans` (run by the supervisor before any worker
starts, while it holds the pid file's lock) moves their messages into
shard ``k mod count``. Each file is hard-linked into place, the target
directories fsynced, and only then is the original unlinked: a crash at
any point leaves every file in one shard or both, never neither, and the
next start finishes the move. When ``workers`` grows, the new shards
start empty and the old ones keep their messages.
"""

from __future__ import annotations

import os
from pathlib import Path

from relay import events
from relay.spoolfiles import fsync_dir

#: Where shards 1.. live under the spool.
SHARDS = "shards"

#: The spool folders whose files are messages (relay.spool's layout);
#: ``tmp/`` is junk at start and ``control/`` holds stale requests.
MESSAGE_DIRS = ("msg", "hold", "corrupt")


def shard_path(spool: Path, index: int) -> Path:
    """Worker ``index``'s spool directory."""
    return spool if index == 0 else spool / SHARDS / str(index)


def shard_indexes(spool: Path) -> list[int]:
    """Every shard on disk, 0 (the spool itself) first."""
    found = [0]
    try:
        names = os.listdir(spool / SHARDS)
    except OSError:
        return found
    found += sorted(int(name) for name in names if name.isdigit() and int(name) > 0)
    return found


def shard_paths(spool: Path) -> list[Path]:
    """Every shard's spool directory, as ``relay queue`` reads them."""
    return [shard_path(spool, index) for index in shard_indexes(spool)]


def adopt_orphans(spool: Path, count: int) -> int:
    """Move the messages of shards ``count`` and above into the ones that
    have a worker; the number of files moved. Call with the spool locked."""
    total = 0
    for index in shard_indexes(spool):
        if index < count:
            continue
        source, target = shard_path(spool, index), shard_path(spool, index % count)
        moved, kept = 0, 0
        for folder in MESSAGE_DIRS:
            done, left = _move_files(source / folder, target / folder)
            moved, kept = moved + done, kept + left
        if kept:
            # Queue ids are random: a clash is a different message. Never
            # overwrite or drop one; leave it for a human (and the next start).
            events.error("shard_not_adopted", shard=index, files=kept, path=str(source))
        else:
            _remove_tree(source)
        events.log("shard_adopted", shard=index, into=index % count, files=moved)
        total += moved
    return total


def _move_files(source: Path, target: Path) -> tuple[int, int]:
    """Files moved from ``source`` to ``target``, and files left (a name clash)."""
    try:
        names = [name for name in os.listdir(source) if not name.startswith(".")]
    except FileNotFoundError:
        return 0, 0
    if not names:
        return 0, 0
    target.mkdir(parents=True, exist_ok=True)
    linked = []
    for name in names:
        try:
            os.link(source / name, target / name)
        except FileExistsError:
            if not os.path.samefile(source / name, target / name):
                continue
        linked.append(name)
    fsync_dir(target)
    for name in linked:
        (source / name).unlink()
    fsync_dir(source)
    return len(linked), len(names) - len(linked)


def _remove_tree(root: Path) -> None:
    """What is left of an emptied shard (tmp/ junk, stale control files)."""
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames:
            os.unlink(os.path.join(dirpath, name))
        for name in dirnames:
            os.rmdir(os.path.join(dirpath, name))
    root.rmdir()
