"""The scheduler: when each spooled message is tried.

Only ``(due time, queue id)`` stays in memory per queued message
(:class:`DueIndex`); the envelope and body are read from the spool when the
message is due. A due message gets one delivery cycle (relay.cycle) as a
task of its own, within ``[delivery] max_concurrency``; what its results
change, recipient states, reports and the next due time, is relay.outcomes'
(docs/queue.md). A message whose cycle waits for a host's probe
(relay.cycle.Waiting) holds no delivery slot and no body meanwhile: it is
back in the index, due again as soon as the probe ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import random
import time
from collections.abc import Callable, Collection, Sequence

from relay import events
from relay.config import Config
from relay.cycle import Deliverer, DeliveryCycle, Next, Waiting
from relay.envelope import Envelope
from relay.health import ProbeEnd
from relay.metrics import Metrics
from relay.outcomes import Outcomes
from relay.reports import Reporter
from relay.spool import Spool

#: Longest sleep of the dispatch loop: bounds how late a due message starts
#: when the clock is not the loop's (an injected clock in tests, a clock step).
_MAX_SLEEP = 1.0


class DueIndex:
    """When each queued message is due: queue id -> due time, and a heap over it.

    The heap has lazy deletion: an entry whose time no longer matches the
    index is stale, dropped when it reaches the top.
    """

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __contains__(self, qid: object) -> bool:
        return qid in self._due

    def __len__(self) -> int:
        return len(self._due)

    def schedule(self, qid: str, when: float) -> None:
        self._due[qid] = when
        heapq.heappush(self._heap, (when, qid))

    def remove(self, qid: str) -> bool:
        """Take ``qid`` out; False if it was not in."""
        return self._due.pop(qid, None) is not None

    def next_due(self) -> float | None:
        """The earliest due time, or None when nothing is queued."""
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def due_now(self) -> bool:
        """True when a message is due (its time has come by the clock)."""
        when = self.next_due()
        return when is not None and when <= self._clock()

    def pop_due(self) -> str | None:
        """Take out and return a message due now, or None."""
        if not self.due_now():
            return None
        _, qid = heapq.heappop(self._heap)
        del self._due[qid]
        return qid

    def hasten(self, qid: str) -> None:
        """Make ``qid`` due now if it is queued for later (one heap push, where
        :meth:`make_due` rebuilds the heap)."""
        now = self._clock()
        if self._due.get(qid, now) > now:
            self.schedule(qid, now)

    def make_due(self, ids: Collection[str] | None) -> list[str]:
        """Make queued messages due now, every one or ``ids``; the ids made due."""
        now = self._clock()
        chosen = list(self._due) if ids is None else [qid for qid in ids if qid in self._due]
        for qid in chosen:
            self._due[qid] = min(self._due[qid], now)
        self._heap = [(when, qid) for qid, when in self._due.items()]
        heapq.heapify(self._heap)
        return chosen


class Scheduler:
    """Runs delivery attempts for spooled messages when they are due."""

    def __init__(
        self,
        config: Callable[[], Config],
        spool: Spool,
        deliverer: Deliverer,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        #: What is queued and when it is due (attempts running are not in it).
        self.due = DueIndex(clock)
        self._active: dict[str, asyncio.Task[Next]] = {}
        #: Running when a flush came: due again at once if their attempt defers.
        self._flush_after: set[str] = set()
        #: Messages waiting for a host's probe, by the future its end sets.
        self._waiting: dict[ProbeEnd, list[str]] = {}
        reporter = Reporter(config, spool, metrics, queue=self.add)
        rng = rng or random.Random()
        self._outcomes = Outcomes(config, spool, metrics, reporter, clock=clock, rng=rng)
        self._cycle = DeliveryCycle(config, spool, deliverer, self._outcomes, clock=clock)
        self._wake = asyncio.Event()
        self._stopping = False

    # --- the index -------------------------------------------------------------

    def add(self, envelope: Envelope, body: Sequence[bytes] = ()) -> None:
        """Queue a spooled message for its ``next_attempt`` (never touches disk).

        ``body``, the parts of the message as spooled, may come with a
        message just accepted: its first attempt then uses them and this
        ``envelope`` instead of reading them back (relay.cycle.FRESH_TOTAL_MAX).
        """
        if envelope.id in self._active:
            return
        self._cycle.remember(envelope, body)
        self._schedule(envelope.id, envelope.next_attempt)
        self._wake.set()

    def flush(self, ids: Collection[str] | None = None) -> list[str]:
        """Make queued messages due now, every one or ``ids``; the ids flushed.

        SIGUSR1 and ``relay queue flush``. Their backoff restarts too: after
        a flushed attempt fails, the next waits ``min_backoff`` again (the
        operator fixed something; the old delay no longer says anything).
        A message whose attempt is running now is flushed when that attempt
        ends, if it deferred: it may have been planned before the flush
        ended the hold-downs, and would otherwise wait a whole backoff.
        """
        chosen = self.due.make_due(ids)
        running_ids = [q for q in (self._active if ids is None else ids) if q in self._active]
        self._flush_after.update(running_ids)
        self._cycle.restart_backoff([*chosen, *running_ids])
        running = len(running_ids)
        # messages: every one of them in the queue, running ones included.
        events.log("flush", messages=len(chosen) + running, running=running)
        self._wake.set()
        return chosen

    async def withdraw(self, qid: str) -> bool:
        """Take a message out of the schedule (``relay queue hold``); False if not queued.

        A running attempt of it is waited for first, so its outcome is on
        disk before the message moves, and nothing writes it afterwards.
        """
        for _ in range(100):  # an attempt that ends due at once may start again
            task = self._active.get(qid)
            if task is None:
                break
            await asyncio.wait({task})
        if not self.due.remove(qid):
            return False
        self._cycle.forget(qid)
        held = self._outcomes.unsaved(qid)
        if held is not None and await self._outcomes.save(held) == "failed":
            # Its latest state exists only in memory: it must stay here.
            self._schedule(qid, self._clock() + self._config().queue.min_backoff)
            return False
        self._metrics.queue_messages.set(len(self))
        return True

    def __contains__(self, qid: object) -> bool:
        return qid in self.due or qid in self._active

    def __len__(self) -> int:
        """Messages queued or being tried."""
        return len(self.due) + len(self._active)

    def _schedule(self, qid: str, when: float) -> None:
        self.due.schedule(qid, when)
        self._metrics.queue_messages.set(len(self))

    # --- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Start attempts as messages fall due, until :meth:`stop`."""
        self._stopping = False
        while not self._stopping:
            self._wake.clear()
            self._dispatch()
            when = self.due.next_due()
            # Nothing due, or every slot taken: _finished() wakes us when an
            # attempt ends (a due message must not make this loop spin).
            idle = when is None or self._full()
            delay = _MAX_SLEEP if idle or when is None else max(0.0, when - self._clock())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), min(delay, _MAX_SLEEP))

    def _full(self) -> bool:
        return len(self._active) >= self._config().delivery.max_concurrency

    def _dispatch(self) -> None:
        # Cycles are bounded too: each holds a message body in memory.
        while not self._stopping and not self._full():
            qid = self.due.pop_due()
            if qid is None:
                return
            task = asyncio.create_task(self._cycle.run(qid), name=f"relay-queue-{qid}")
            self._active[qid] = task
            task.add_done_callback(functools.partial(self._finished, qid))

    def _finished(self, qid: str, task: asyncio.Task[Next]) -> None:
        self._active.pop(qid, None)
        if task.cancelled():
            # Abandoned at stop(): its recipients are still pending in the spool.
            pass
        elif (exc := task.exception()) is not None:
            # Something unexpected failed mid-cycle (a failed state write is
            # handled in the cycle and kept in memory by Outcomes); try again later.
            retry = self._config().queue.min_backoff
            events.error("queue_error", id=qid, error=repr(exc), retry_in=retry)
            self._schedule(qid, self._clock() + retry)
        elif isinstance(when := task.result(), Waiting):
            # Waiting for the probe beats a flush that came meanwhile: the
            # flush's own probe is usually the one being waited for.
            self._schedule(qid, when.due)
            for probe in when.probes:
                self._wait_for(probe, qid)
        elif when is not None:
            self._schedule(qid, self._clock() if qid in self._flush_after else when)
        self._flush_after.discard(qid)
        self._metrics.queue_messages.set(len(self))
        self._wake.set()

    def _wait_for(self, probe: ProbeEnd, qid: str) -> None:
        waiters = self._waiting.get(probe)
        if waiters is None:
            waiters = self._waiting[probe] = []
            probe.add_done_callback(self._probe_ended)
        waiters.append(qid)

    def _probe_ended(self, probe: ProbeEnd) -> None:
        """A probe some messages wait for ended. When it tried the host they
        are due now: it is up, or held down, so they go or are deferred at
        once. When its attempt never tried the host, they keep their due
        time (one connect timeout): the next attempt to plan claims the
        probe, and a stream of claims left unused cannot spin them.
        One that left the index meanwhile (held, deleted) stays out."""
        waiters = self._waiting.pop(probe, ())
        if probe.cancelled() or not probe.result():
            return
        for qid in waiters:
            self.due.hasten(qid)
        self._wake.set()

    async def stop(self, grace: float) -> None:
        """Start no new attempt; wait up to ``grace`` seconds, then cancel what still runs.

        A cancelled attempt leaves its recipients pending in the spool:
        deliveries are at-least-once, so at worst one is repeated.
        """
        self._stopping = True
        self._wake.set()
        tasks = list(self._active.values())
        if not tasks:
            return
        done, pending = await asyncio.wait(tasks, timeout=grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        events.log("queue_stopped", finished=len(done), abandoned=len(pending))
        await self._outcomes.save_unsaved()
