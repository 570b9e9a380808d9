"""A concurrency limit whose size is read from the live config at every acquire.

A plain asyncio.Semaphore fixes its size when created; a reload that
changes ``max_concurrency`` or ``max_per_host`` must apply to the next
attempt, so the limit is a callable re-read whenever a task waits.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable


class LiveLimit:
    """At most ``limit()`` holders at once; ``limit`` is re-read at every acquire."""

    def __init__(self, limit: Callable[[], int]) -> None:
        self._limit = limit
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Holders now.
        self.used = 0
        #: Tasks holding or waiting. A woken waiter is no longer in _waiters
        #: but not yet in ``used``: only this count says whether nobody
        #: needs the limit any more (see ``idle``).
        self._users = 0

    @property
    def full(self) -> bool:
        """A new holder would wait."""
        return self.used >= self._limit()

    @property
    def idle(self) -> bool:
        """Nobody holds or waits: the owner may drop this limit."""
        return self._users == 0

    async def acquire(self) -> None:
        self._users += 1
        try:
            while self.used >= self._limit():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
                try:
                    await waiter
                finally:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)
        except BaseException:
            self._users -= 1
            raise
        self.used += 1

    def release(self) -> None:
        self.used -= 1
        self._users -= 1
        # Wake everyone; each re-checks the (possibly reloaded) limit.
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
