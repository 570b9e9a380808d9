"""Group commit: many writers in the spool share one directory fsync.

A rename or unlink is durable only once the directory holding it is
fsynced. :func:`durable` runs such a change in a spool thread and settles
its future once a :class:`GroupSync` sync that started after the change has
completed, so each caller keeps its promise per message while a burst of N
concurrent writes costs one directory fsync instead of N.
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from contextlib import suppress
from typing import TypeVar

from relay.spoolfiles import spool_error

_T = TypeVar("_T")


#: What a GroupSync caller is told: in the fsync thread, then optionally on a loop.
_Done = Callable[[OSError | None], tuple[asyncio.AbstractEventLoop, Callable[[], None]] | None]


class GroupSync:
    """Group commit of one blocking ``sync`` (a directory fsync) for many writers.

    ``submit(done)`` after a rename or unlink: ``done(error)`` is called once
    a ``sync()`` that *started after* the submit has completed, with None, or
    with an OSError if that sync failed (a new one for each caller). The
    syncs run in a thread of their own, back to back while callers keep
    coming: each one covers every caller that arrived while the one before
    it ran, however many, and no caller holds a spool thread while it waits.
    ``done`` runs in that thread, so it must be quick; it may return
    ``(loop, call)``: the calls for one event loop are made there together,
    with one wake-up of that loop for the whole batch.

    The spool's threads submit right after their rename or unlink, so a
    durable write costs the event loop one hand-off to a thread and back.
    (The first asyncio version cost four: on a busy loop each hand-off is a
    turn of the loop, which was 9 ms of the 23 ms before a 250. Waiting in
    the spool's threads instead capped a batch at the pool's 8 threads, and
    waking the loop once per writer from this thread cost 13 %; docs/performance.md.)
    """

    def __init__(self, sync: Callable[[], None]) -> None:
        self._sync = sync
        self._cond = threading.Condition()
        self._pending: list[_Done] = []
        self._thread: threading.Thread | None = None
        self._closing = False
        #: How many syncs ran, and how many callers they served (for benchmarks).
        self.syncs = 0
        self.served = 0

    def submit(self, done: _Done) -> None:
        with self._cond:
            self._pending.append(done)
            if self._thread is None:
                self._closing = False
                self._thread = threading.Thread(
                    target=self._run, name="relay-spool-sync", daemon=True
                )
                self._thread.start()
            self._cond.notify()

    def close(self) -> None:
        """Serve what is pending, then stop the thread (a later submit starts it again)."""
        with self._cond:
            thread, self._closing = self._thread, True
            self._cond.notify()
        if thread is not None:
            thread.join()

    def _run(self) -> None:
        name_os_thread("relay-sync")
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if not self._pending:
                    self._thread = None
                    return
                # Everyone here renamed or unlinked before this sync starts;
                # later arrivals wait for the next one.
                batch, self._pending = self._pending, []
            error: OSError | None = None
            try:
                self._sync()
            except BaseException as exc:
                # Any failure fails the callers it serves: nobody may wait
                # forever, and nobody is told a failed sync succeeded.
                error = exc if isinstance(exc, OSError) else OSError(str(exc))
            self.syncs += 1
            self.served += len(batch)
            # One wake-up per event loop for the whole batch, not one per caller.
            wakeups: dict[asyncio.AbstractEventLoop, list[Callable[[], None]]] = {}
            for done in batch:
                with suppress(Exception):
                    then = done(None if error is None else _fresh_error(error))
                    if then is not None:
                        wakeups.setdefault(then[0], []).append(then[1])
            for loop, calls in wakeups.items():
                with suppress(RuntimeError):
                    loop.call_soon_threadsafe(_call_all, calls)


def name_os_thread(name: str) -> None:
    """Give the calling thread ``name`` in the OS too (at most 15 bytes on Linux).

    ``top -H`` and ``/proc/<pid>/task/*/comm`` then tell the spool's threads
    from the event loop (the main thread), whose CPU is what limits relay.
    Best effort: elsewhere than Linux nothing happens.
    """
    comm = f"/proc/self/task/{threading.get_native_id()}/comm"
    with suppress(OSError), open(comm, "w") as file:
        file.write(name[:15])


def _call_all(calls: list[Callable[[], None]]) -> None:
    for call in calls:
        call()


def _fresh_error(error: OSError) -> OSError:
    """A copy for one caller: one exception raised in many threads would
    collect all their tracebacks (and keep their frames alive)."""
    if error.errno is None:
        return OSError(str(error))
    return OSError(error.errno, error.strerror)


def durable(
    pool: Executor,
    group: GroupSync,
    change: Callable[[], _T],
    what: str,
    undo: Callable[[_T], None] | None = None,
) -> asyncio.Future[_T]:
    """Run ``change`` (a rename or unlink) in ``pool``; the future is done
    once a directory fsync of ``group`` that started after it has completed.

    A falsy result (nothing was there to change) needs no fsync. If the
    fsync fails, ``undo`` gets the result (in the fsync's thread) and the
    future a SpoolError (``what``, the error). A future, not a coroutine: the
    change is under way once this returns, whatever happens to the caller
    (inbound shields it), and on a busy loop a task of its own would cost a
    turn of the loop to start and another to finish.
    """
    loop = asyncio.get_running_loop()
    result: asyncio.Future[_T] = loop.create_future()

    def settle(value: _T | None, error: BaseException | None) -> None:
        with suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(_settle, result, value, error)

    def committed(
        value: _T, error: OSError | None
    ) -> tuple[asyncio.AbstractEventLoop, Callable[[], None]]:
        if error is None:
            return loop, functools.partial(_settle, result, value, None)
        if undo is not None:
            with suppress(OSError):
                undo(value)
        return loop, functools.partial(_settle, result, None, spool_error(error, what))

    def work() -> None:
        try:
            value = change()
        except BaseException as exc:
            settle(None, exc)
            return
        if not value:
            settle(value, None)
            return
        group.submit(functools.partial(committed, value))

    pool.submit(work)
    return result


def _settle(future: asyncio.Future[_T], value: _T | None, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(value)  # type: ignore[arg-type]
    else:
        future.set_exception(error)
