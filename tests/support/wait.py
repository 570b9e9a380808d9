"""Waiting in tests: one helper, bounded in time, that names what it waited for.

``until`` polls on the event loop, for tests whose peers live on that loop
(sinks, the in-process relay, an Inbound); ``blocking_until`` polls by
sleeping the thread, for tests that drive subprocesses without a loop.
Both return the condition's first truthy value, and raise ``TimeoutError``
naming ``what`` once ``within`` seconds have passed, so a broken test fails
with a message instead of hanging until pytest-timeout fires.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def until(
    condition: Callable[[], T],
    within: float = 10.0,
    *,
    what: str = "the condition",
    interval: float = 0.01,
) -> T:
    """Poll ``condition`` (a predicate on state: there is no event to wait on)."""
    try:
        async with asyncio.timeout(within):
            # Let the tasks just started run once before the first look.
            await asyncio.sleep(0)
            while not (value := condition()):  # noqa: ASYNC110 - no event to wait on
                await asyncio.sleep(interval)
            return value
    except TimeoutError:
        raise TimeoutError(f"timed out after {within:g}s waiting for {what}") from None


def blocking_until(
    condition: Callable[[], T],
    within: float = 10.0,
    *,
    what: str = "the condition",
    interval: float = 0.05,
) -> T:
    """Poll ``condition``, sleeping the thread; called once more at the deadline."""
    deadline = time.monotonic() + within
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {within:g}s waiting for {what}")
        time.sleep(interval)
