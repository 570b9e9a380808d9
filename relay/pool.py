"""Reuse of open outbound SMTP sessions per next hop, and the per-hop connection limit.

Part of the outbound SMTP package (delivery, session, pool, probe); it
needs no aiosmtplib of its own: sessions come from :mod:`relay.session`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator

from relay.hop import Hop
from relay.limits import LiveLimit
from relay.session import Session, quit_session


class Pool:
    """Idle sessions per next hop, and a connection limit per next hop.

    A hop's entries are dropped once it has no connection in use and no
    idle session, so state does not grow with every host ever delivered to.
    Each idle session carries its own expiry timer, cancelled when the
    session is taken again: O(1) per message.
    """

    def __init__(self) -> None:
        self._idle: dict[Hop, list[Session]] = {}
        #: Per next hop, ``[delivery] max_per_host`` read live (a reload applies).
        self._slots: dict[Hop, LiveLimit] = {}
        #: Per next hop, the slot holders still opening their session
        #: (connect, greeting, EHLO, STARTTLS).
        self._connecting: dict[Hop, int] = {}
        #: Attempts waiting for any slot or connection state to change.
        self._watchers: list[asyncio.Future[None]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def hops(self) -> int:
        """Next hops with any state (a connection in use or idle sessions)."""
        return len(self._slots.keys() | self._idle.keys())

    @contextlib.asynccontextmanager
    async def slot(self, hop: Hop, limit: Callable[[], int]) -> AsyncIterator[None]:
        """Hold one of ``limit()`` connection slots for ``hop``."""
        gate = self._slots.get(hop)
        if gate is None:
            gate = self._slots[hop] = LiveLimit(limit)
        try:
            await gate.acquire()
        except BaseException:
            self._forget(hop)
            raise
        try:
            yield
        finally:
            gate.release()
            self._forget(hop)
            if self._watchers:
                self._notify()

    @contextlib.contextmanager
    def connecting(self, hop: Hop) -> Iterator[None]:
        """Count one slot holder of ``hop`` as opening its session (:meth:`jammed`)."""
        self._connecting[hop] = self._connecting.get(hop, 0) + 1
        try:
            yield
        finally:
            left = self._connecting[hop] - 1
            if left:
                self._connecting[hop] = left
            else:
                del self._connecting[hop]
            if self._watchers:
                self._notify()

    async def changed(self) -> None:
        """Wait until a slot is released or a session finished opening somewhere."""
        watcher = asyncio.get_running_loop().create_future()
        self._watchers.append(watcher)
        try:
            await watcher
        finally:
            if watcher in self._watchers:
                self._watchers.remove(watcher)

    def _notify(self) -> None:
        watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            if not watcher.done():
                watcher.set_result(None)

    def jammed(self, hop: Hop) -> bool:
        """Every slot of ``hop`` is taken by a connection not yet greeted.

        A wedged host (accepts TCP, never speaks) stays so for a whole
        connect timeout; a healthy one for a moment at most.
        """
        gate = self._slots.get(hop)
        return gate is not None and gate.full and self._connecting.get(hop, 0) >= gate.used

    def _forget(self, hop: Hop) -> None:
        """Drop ``hop``'s entries when nothing uses them."""
        gate = self._slots.get(hop)
        if gate is not None and gate.idle:
            del self._slots[hop]
        if not self._idle.get(hop):
            self._idle.pop(hop, None)

    def take(self, hop: Hop, idle_timeout: float) -> Session | None:
        """An idle session for ``hop`` younger than ``idle_timeout``, if any."""
        sessions = self._idle.get(hop, [])
        now = time.monotonic()
        while sessions:
            session = sessions.pop()
            _cancel_expiry(session)
            if now - session.idle_since < idle_timeout and session.connected:
                return session
            self._retire(session)
        return None

    def give(self, session: Session, idle_timeout: float, limit: int) -> None:
        sessions = self._idle.setdefault(session.hop, [])
        if len(sessions) >= limit or idle_timeout <= 0:
            self._retire(session)
            return
        session.idle_since = time.monotonic()
        sessions.append(session)
        loop = asyncio.get_running_loop()
        session.expiry = loop.call_later(idle_timeout, self._expire, session)

    def _expire(self, session: Session) -> None:
        """The session stayed idle for idle_timeout: drop it from the pool."""
        session.expiry = None
        sessions = self._idle.get(session.hop, [])
        if session in sessions:
            sessions.remove(session)
            self._retire(session)
        self._forget(session.hop)

    def _retire(self, session: Session) -> None:
        """QUIT politely in the background; close regardless."""
        task = asyncio.get_running_loop().create_task(quit_session(session))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for sessions in self._idle.values():
            for session in sessions:
                _cancel_expiry(session)
                self._retire(session)
        self._idle.clear()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)


def _cancel_expiry(session: Session) -> None:
    if session.expiry is not None:
        session.expiry.cancel()
        session.expiry = None
