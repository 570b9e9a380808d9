"""The event loop the daemon runs on: asyncio's own, or uvloop (``[server] event_loop``).

uvloop (libuv underneath) spends less CPU per socket operation than
asyncio's selector loop; relay is otherwise the same on both. It is an
optional dependency (``pip install 'relay[uvloop]'``), so the default stays
asyncio's loop, which needs nothing. docs/performance.md has what it saves.
"""

from __future__ import annotations

import asyncio
import importlib.util
from collections.abc import Coroutine
from typing import Any, TypeVar

EVENT_LOOPS = ("asyncio", "uvloop")

_T = TypeVar("_T")


def missing(kind: str) -> str | None:
    """Why the loop ``kind`` cannot run here, or None if it can."""
    if kind not in EVENT_LOOPS:
        return f"{kind!r} is not one of {', '.join(EVENT_LOOPS)}"
    if kind == "uvloop" and importlib.util.find_spec("uvloop") is None:
        return "uvloop is not installed (pip install 'relay[uvloop]')"
    return None


def run(main: Coroutine[Any, Any, _T], kind: str) -> _T:
    """Run ``main`` to completion on a new event loop of ``kind``."""
    if kind == "uvloop":
        import uvloop  # type: ignore[import-not-found, unused-ignore]

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)


def name() -> str:
    """The running loop's kind, for the ``started`` line."""
    module = type(asyncio.get_running_loop()).__module__
    return "uvloop" if module.startswith("uvloop") else "asyncio"
