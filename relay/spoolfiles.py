"""The spool's files: queue ids and file names, the envelope line, writes, fsync, errors.

Shared by the modules that work in the spool directory (relay.spool,
relay.hold, relay.spoolbody, relay.groupcommit); the layout itself is
described in relay.spool.
"""

from __future__ import annotations

import errno
import os
import random
import time
from contextlib import suppress
from pathlib import Path

from relay.errors import SpoolError, SpoolFull

#: The first line of a ``.msg`` file: the envelope it was accepted with.
ENVELOPE_LINE = b"#relay-envelope "

_ID_CHARS = "0123456789BCDFGHJKLMNPQRSTVWXZ"

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


def tmp_suffix() -> str:
    """A random suffix for a temp file name (unique among concurrent writers)."""
    return f"{_RNG.getrandbits(32):08x}"


#: Every file that belongs to a message, bodies first.
MESSAGE_SUFFIXES = (".msg", ".eml", ".state", ".json")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_all(paths: list[str]) -> None:
    for path in paths:
        with suppress(FileNotFoundError):
            os.unlink(path)


def spool_error(exc: OSError, what: str) -> SpoolError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return SpoolFull(f"{what}: {exc}")
    return SpoolError(f"{what}: {exc}")


def message_paths(directory: Path, queue_id: str) -> tuple[Path, Path]:
    """(body, envelope) paths in ``directory``: ``.msg`` and ``.state`` for a
    one-file message, else ``.eml`` and ``.json``."""
    one = directory / f"{queue_id}.msg"
    if one.exists():
        return one, directory / f"{queue_id}.state"
    return directory / f"{queue_id}.eml", directory / f"{queue_id}.json"


def envelope_bytes(directory: Path, queue_id: str) -> bytes | None:
    """The stored envelope's JSON; None when there is no message."""
    body, meta = message_paths(directory, queue_id)
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


def message_ids(directory: Path) -> list[str]:
    """Ids of the messages with a file in ``directory`` (none if it does not exist)."""
    if not directory.is_dir():
        return []
    return sorted({p.stem for p in directory.iterdir() if p.suffix in MESSAGE_SUFFIXES})


def write_temp(tmp_dir: str, name: str, data: bytes, prefix: bytes = b"", *, fsync: bool) -> str:
    """``prefix + data`` in a new file in ``tmp_dir`` (fsynced with ``fsync``); its path.

    Paths in the hot spool operations are plain strings: pathlib's
    parsing was a fifth of the spool threads' Python time, which the
    event loop waits for (the GIL; docs/performance.md).
    """
    tmp = f"{tmp_dir}/{name}.{tmp_suffix()}"
    try:
        with open(tmp, "wb") as fh:
            if prefix:
                fh.write(prefix)
            fh.write(data)
            if fsync:
                fh.flush()
                os.fsync(fh.fileno())
    except BaseException:
        with suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return tmp
