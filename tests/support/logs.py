"""relay's log events inside a block, for tests that check what was logged.

relay's logger may not propagate (relay.events sets it up), so pytest's
caplog does not see it; this handler sits on the logger itself.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import TypeVar

T = TypeVar("T")


class _Keep(logging.Handler):
    def __init__(self, keep: Callable[[logging.LogRecord], object], level: int) -> None:
        super().__init__(level)
        self._keep = keep

    def emit(self, record: logging.LogRecord) -> None:
        self._keep(record)


@contextlib.contextmanager
def captured(
    view: Callable[[logging.LogRecord], T | None], level: int = logging.INFO
) -> Iterator[list[T]]:
    """A list that gets ``view(record)`` of every event logged inside the block
    (``None`` from ``view``: left out), at ``level`` and above."""
    kept: list[T] = []

    def keep(record: logging.LogRecord) -> None:
        seen = view(record)
        if seen is not None:
            kept.append(seen)

    handler = _Keep(keep, level)
    logger = logging.getLogger("relay")
    old_level = logger.level
    logger.addHandler(handler)
    logger.setLevel(level)
    try:
        yield kept
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)


def records(record: logging.LogRecord) -> logging.LogRecord:
    """The view that keeps whole records."""
    return record


def fields_of(event: str) -> Callable[[logging.LogRecord], dict[str, object] | None]:
    """The view that keeps the fields of each ``event`` line, with its level."""

    def view(record: logging.LogRecord) -> dict[str, object] | None:
        if record.getMessage() != event:
            return None
        return {"level": record.levelname, **getattr(record, "fields", {})}

    return view
