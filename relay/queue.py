"""The scheduler: when each spooled message is tried, and what its outcome changes.

Due messages are loaded from the spool, their pending recipients grouped by
route, one :meth:`Deliverer.deliver` call made per route (concurrently,
within ``[delivery] max_concurrency``), and each recipient's outcome written
back to the spool *before anything else happens*, so a recipient the next
hop accepted is never delivered twice (docs/queue.md). Deferred mail
is retried with exponential backoff and jitter until ``[queue]
max_lifetime``; permanent failures and expiry produce one RFC 3464 DSN per
message per attempt (relay.bounce), spooled before the originals are marked
bounced, so a crash can at worst duplicate a DSN, never lose one.

Only ``(due time, queue id)`` stays in memory per queued message; the
envelope and body are read from the spool when the message is due (a body
over ``spool.IN_MEMORY_MAX`` is not read whole: delivery gets the open
file and sends it in pieces). The
exception is a message whose latest state could not be written (disk full,
I/O error): its envelope stays in memory, the write is retried before any
new attempt of it, and its state is never reloaded from disk meanwhile, so
a recipient the next hop accepted is not delivered again.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import logging
import random
import time
from collections.abc import Callable, Collection, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal, Protocol

from relay import errors, events, routing
from relay.bounce import (
    BounceReason,
    Delay,
    Failure,
    TlsIssue,
    build_delay_warning,
    build_dsn,
    build_postmaster_copy,
    delay_needs_smtputf8,
    needs_smtputf8,
    reason_for,
)
from relay.config import Config, Route
from relay.envelope import Envelope, RcptState, Recipient
from relay.errors import RelayError, Reply, TlsPolicyFailure
from relay.limits import LiveLimit
from relay.metrics import Metrics
from relay.spool import Spool
from relay.spoolbody import IN_MEMORY_MAX, Body, BodyFile
from relay.spoolfiles import new_id

if TYPE_CHECKING:
    from relay.delivery import Attempt

#: Jitter either side of the backoff delay, so messages deferred together
#: (one next hop down) do not all come back in the same second.
JITTER = 0.15

#: Longest sleep of the dispatch loop: bounds how late a due message starts
#: when the clock is not the loop's (an injected clock in tests, a clock step).
_MAX_SLEEP = 1.0

#: Route label for recipients that no rule routes any more.
_NO_ROUTE = "(none)"

#: What became of a state write: on disk, the message was deleted meanwhile
#: (``relay queue delete``), or the write failed and the state is held in memory.
_Saved = Literal["saved", "gone", "failed"]

#: A just-accepted message's body is handed to the scheduler in memory, so
#: its first attempt reads nothing back from disk (two opens, two reads and
#: a JSON parse per message: a fifth of the 1 KiB path's spool work,
#: docs/performance.md). Bounded per message (the spool's IN_MEMORY_MAX: larger
#: bodies are files anyway) and in total: beyond these the first attempt
#: reads the spool as every later one does.
FRESH_TOTAL_MAX = 4 * 1024 * 1024


def backoff(attempts: int, min_backoff: float, max_backoff: float, rng: random.Random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 is the first).

    ``min_backoff * 2**(attempts-1)``, capped at ``max_backoff``, times a
    random factor in ``[1 - JITTER, 1 + JITTER]``; never above ``max_backoff``.
    """
    exponent = max(0, min(attempts, 64) - 1)
    base = min(min_backoff * 2.0**exponent, max_backoff)
    return min(base * rng.uniform(1 - JITTER, 1 + JITTER), max_backoff)


class Deliverer(Protocol):
    """What the scheduler needs from delivery: one attempt of one route.

    Resolving the route's candidate hosts is the deliverer's business (the
    scheduler never touches DNS). It should not raise: every failure is a
    per-recipient result in the Attempt. If it does raise, the recipients
    are deferred with 451 4.3.0.
    """

    async def deliver(
        self, route: Route, envelope: Envelope, recipients: Sequence[str], body: Body
    ) -> Attempt: ...


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
        self._spool = spool
        self._deliverer = deliverer
        self._metrics = metrics
        self._clock = clock
        self._rng = rng or random.Random()
        # The index: queue id -> due time, and a heap over it with lazy
        # deletion (an entry whose time no longer matches _due is stale).
        self._due: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []
        self._active: dict[str, asyncio.Task[float | None]] = {}
        #: Envelopes whose latest state is not on disk yet (a failed write):
        #: the truth until a write succeeds; the spool copy is stale.
        self._unsaved: dict[str, Envelope] = {}
        #: Just-accepted messages, envelope and body as spooled, until their
        #: first attempt (IN_MEMORY_MAX, FRESH_TOTAL_MAX).
        self._fresh: dict[str, tuple[Envelope, bytes]] = {}
        self._fresh_bytes = 0
        #: Flushed by an operator: the backoff restarts at their next attempt.
        self._reset_backoff: set[str] = set()
        self._limiter = LiveLimit(lambda: self._config().delivery.max_concurrency)
        self._wake = asyncio.Event()
        self._stopping = False

    # --- the index -------------------------------------------------------------

    def add(self, envelope: Envelope, body: Sequence[bytes] = ()) -> None:
        """Queue a spooled message for its ``next_attempt`` (never touches disk).

        ``body``, the parts of the message as spooled, may come with a
        message just accepted: its first attempt then uses them and this
        ``envelope`` instead of reading them back (within IN_MEMORY_MAX and FRESH_TOTAL_MAX).
        """
        if envelope.id in self._active:
            return
        size = sum(map(len, body))
        if (
            body
            and size <= IN_MEMORY_MAX
            and self._fresh_bytes + size <= FRESH_TOTAL_MAX
            and envelope.id not in self._fresh
        ):
            self._fresh[envelope.id] = (envelope, b"".join(body))
            self._fresh_bytes += size
        self._schedule(envelope.id, envelope.next_attempt)
        self._wake.set()

    def flush(self, ids: Collection[str] | None = None) -> list[str]:
        """Make queued messages due now, every one or ``ids``; the ids flushed.

        SIGUSR1 and ``relay queue flush``. Their backoff restarts too: after
        a flushed attempt fails, the next waits ``min_backoff`` again (the
        operator fixed something; the old delay no longer says anything).
        A message whose attempt is running now is not flushed.
        """
        now = self._clock()
        chosen = list(self._due) if ids is None else [qid for qid in ids if qid in self._due]
        for qid in chosen:
            self._due[qid] = min(self._due[qid], now)
        self._reset_backoff.update(chosen)
        self._heap = [(when, qid) for qid, when in self._due.items()]
        heapq.heapify(self._heap)
        running = len(self._active) if ids is None else sum(q in self._active for q in ids)
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
        if qid not in self._due:
            return False
        del self._due[qid]
        self._take_fresh(qid)
        self._reset_backoff.discard(qid)
        held = self._unsaved.get(qid)
        if held is not None and await self._save(held) == "failed":
            # Its latest state exists only in memory: it must stay here.
            self._schedule(qid, self._clock() + self._config().queue.min_backoff)
            return False
        self._metrics.queue_messages.set(len(self))
        return True

    def __contains__(self, qid: object) -> bool:
        return qid in self._due or qid in self._active

    def __len__(self) -> int:
        """Messages queued or being tried."""
        return len(self._due) + len(self._active)

    @property
    def busy(self) -> bool:
        """True while an attempt runs or a message is due now."""
        when = self._next_due()
        return bool(self._active) or (when is not None and when <= self._clock())

    def _schedule(self, qid: str, when: float) -> None:
        self._due[qid] = when
        heapq.heappush(self._heap, (when, qid))
        self._metrics.queue_messages.set(len(self))

    def _next_due(self) -> float | None:
        while self._heap and self._due.get(self._heap[0][1]) != self._heap[0][0]:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def _pop_due(self, now: float) -> str | None:
        when = self._next_due()
        if when is None or when > now:
            return None
        _, qid = heapq.heappop(self._heap)
        del self._due[qid]
        return qid

    # --- the loop ------------------------------------------------------------------

    async def run(self) -> None:
        """Start attempts as messages fall due, until :meth:`stop`."""
        self._stopping = False
        while not self._stopping:
            self._wake.clear()
            self._dispatch()
            when = self._next_due()
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
        now = self._clock()
        while not self._stopping and not self._full():
            qid = self._pop_due(now)
            if qid is None:
                return
            task = asyncio.create_task(self._cycle(qid), name=f"relay-queue-{qid}")
            self._active[qid] = task
            task.add_done_callback(functools.partial(self._finished, qid))

    def _finished(self, qid: str, task: asyncio.Task[float | None]) -> None:
        self._active.pop(qid, None)
        if task.cancelled():
            # Abandoned at stop(): its recipients are still pending in the spool.
            pass
        elif (exc := task.exception()) is not None:
            # Something unexpected failed mid-cycle (a failed state write is
            # handled in the cycle and kept in _unsaved); try again later.
            retry = self._config().queue.min_backoff
            events.error("queue_error", id=qid, error=repr(exc), retry_in=retry)
            self._schedule(qid, self._clock() + retry)
        elif (when := task.result()) is not None:
            self._schedule(qid, when)
        self._metrics.queue_messages.set(len(self))
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
        await self._save_unsaved()

    async def _save_unsaved(self) -> None:
        """Last chance at stop() for states only held in memory."""
        for envelope in list(self._unsaved.values()):
            await self._save(envelope)
        if self._unsaved:
            # Lost with the process: these recipients may be delivered again.
            events.error("spool_state_lost", ids=",".join(sorted(self._unsaved)))

    # --- one message ---------------------------------------------------------------

    async def _cycle(self, qid: str) -> float | None:
        """Try one due message; return its next due time, or None when it left the queue."""
        bodies: list[Body] = []
        try:
            return await self._try(qid, bodies)
        finally:
            for body in bodies:
                if isinstance(body, BodyFile):
                    body.close()

    async def _try(self, qid: str, bodies: list[Body]) -> float | None:
        """:meth:`_cycle`; the body read goes into ``bodies`` (closed by the caller)."""
        held = self._unsaved.get(qid)
        if held is not None:
            # The disk is behind memory: write first, attempt nothing until then.
            saved = await self._save(held)
            if saved == "failed":
                return self._clock() + self._config().queue.min_backoff
            if saved == "gone":
                events.log("dropped", id=qid, reason="no longer in the spool")
                return None
            if held.next_attempt > self._clock():
                return held.next_attempt
        fresh = self._take_fresh(qid)
        body: Body
        try:
            if fresh is not None:
                envelope, body = fresh
                if not self._spool.has_body(qid):
                    # `relay queue delete` ran before its first attempt.
                    raise FileNotFoundError(qid)
            elif held is None:
                envelope, body = await self._spool.open_async(qid, IN_MEMORY_MAX)
            else:
                # Memory is ahead of the disk's envelope: read only the body.
                body = await asyncio.to_thread(self._spool.open_body, qid, IN_MEMORY_MAX)
                envelope = held
            bodies.append(body)
        except (KeyError, FileNotFoundError):
            # `relay queue delete` removed it while it waited: nothing to do
            # but remove an envelope that outlived its body.
            await asyncio.to_thread(self._spool.delete, qid)
            events.log("dropped", id=qid, reason="no longer in the spool")
            return None
        except (ValueError, TypeError) as exc:
            # An unreadable envelope will not get better by retrying: set it
            # aside (corrupt/, body and all) for a human.
            await asyncio.to_thread(self._spool.quarantine.add, qid)
            events.error("dropped", id=qid, reason="unreadable envelope", error=str(exc))
            return None
        if envelope.done:
            return await self._remove(envelope)
        if qid in self._reset_backoff:
            self._reset_backoff.discard(qid)
            envelope.backoff_from = envelope.attempts
        envelope.attempts += 1
        failures: list[Failure] = []
        deferred: list[tuple[Recipient, str]] = []
        groups, unrouted = self._group(envelope)
        for rcpt in unrouted:
            # Rules changed by a reload since the message was accepted: wait
            # for a config that routes it rather than bounce on a typo.
            rcpt.last_reply = errors.NO_ROUTE_NOW
            rcpt.remote_mta = ""
            rcpt.last_remote = False
            rcpt.last_cause = ""
            deferred.append((rcpt, _NO_ROUTE))
        if not await self._attempt_routes(envelope, body, groups, failures, deferred):
            events.log("dropped", id=qid, reason="no longer in the spool")
            return None
        return await self._conclude(envelope, body, failures, deferred)

    def _take_fresh(self, qid: str) -> tuple[Envelope, bytes] | None:
        fresh = self._fresh.pop(qid, None)
        if fresh is not None:
            self._fresh_bytes -= len(fresh[1])
        return fresh

    async def _save(self, envelope: Envelope) -> _Saved:
        """Write the envelope's state; on failure keep it in memory (loudly) instead."""
        try:
            written = await self._spool.update_async(envelope)
        except RelayError as exc:
            self._unsaved[envelope.id] = envelope
            events.error(
                "spool_write_failed", id=envelope.id, error=exc.detail,
                state="kept in memory; retried before the next attempt",
            )  # fmt: skip
            return "failed"
        self._unsaved.pop(envelope.id, None)
        return "saved" if written else "gone"

    def _group(
        self, envelope: Envelope
    ) -> tuple[dict[str, tuple[Route, list[str]]], list[Recipient]]:
        """Pending recipients by route name (one transaction per route), and the unroutable."""
        groups: dict[str, tuple[Route, list[str]]] = {}
        unrouted: list[Recipient] = []
        for rcpt in envelope.pending:
            route = self._route_for(envelope, rcpt.address)
            if route is None:
                unrouted.append(rcpt)
                continue
            key = route.name if not route.implicit else f"{route.name} {route.primary[0].name}"
            groups.setdefault(key, (route, []))[1].append(rcpt.address)
        return groups, unrouted

    async def _attempt_routes(
        self,
        envelope: Envelope,
        body: Body,
        groups: dict[str, tuple[Route, list[str]]],
        failures: list[Failure],
        deferred: list[tuple[Recipient, str]],
    ) -> bool:
        """One deliver() per route, concurrently; persist each outcome as it arrives.

        A failed write does not stop the other routes: their transactions
        are under way, and the state is kept in memory (:meth:`_save`).
        False when the message was deleted from the spool meanwhile.
        """
        tasks = {
            asyncio.create_task(self._deliver(route, envelope, addrs, body)): (route, addrs)
            for route, addrs in groups.values()
        }
        pending = set(tasks)
        gone = False
        try:
            while pending:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    route, addrs = tasks[task]
                    self._apply(envelope, route, addrs, task.result(), failures, deferred)
                if not pending and envelope.done:
                    # Every recipient is delivered: _conclude deletes the
                    # message, which says as much as a state write would
                    # (and falls back to one if the delete fails).
                    break
                # Persist now: a delivered recipient must never be tried again.
                gone = gone or await self._save(envelope) == "gone"
        finally:
            # Only when the cycle itself is cancelled (stop()).
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        return not gone

    async def _deliver(
        self, route: Route, envelope: Envelope, addrs: Sequence[str], body: Body
    ) -> Attempt | BaseException:
        await self._limiter.acquire()
        try:
            return await self._deliverer.deliver(route, envelope, addrs, body)
        except Exception as exc:  # the Deliverer contract says it does not raise
            events.error("deliverer_error", id=envelope.id, route=route.name, exc_info=True)
            return exc
        finally:
            self._limiter.release()

    def _apply(
        self,
        envelope: Envelope,
        route: Route,
        addrs: Sequence[str],
        attempt: Attempt | BaseException,
        failures: list[Failure],
        deferred: list[tuple[Recipient, str]],
    ) -> None:
        """Record each recipient's outcome of one attempt (in memory; the caller persists)."""
        now = self._clock()
        for address in addrs:
            rcpt = _pending(envelope, address)
            if rcpt is None:
                continue
            rcpt.attempts += 1
            if isinstance(attempt, BaseException):
                outcome, reply, remote = errors.DEFERRED, errors.INTERNAL_ERROR, ""
                rcpt.last_remote = False
                rcpt.last_cause = cause([attempt], reply)
            else:
                outcome, reply = attempt.outcome(address), attempt.last(address)
                remote = attempt.remote.get(address, "")
                rcpt.last_remote = from_wire(attempt.results.get(address, ()))
                rcpt.last_cause = cause(attempt.results.get(address, ()), reply)
            if not remote and reply == routing.HELD_DOWN:
                # Deferred without connecting because the hosts failed before:
                # the host last tried is still the one a DSN should name.
                remote = rcpt.remote_mta
            rcpt.last_reply, rcpt.remote_mta = reply, remote
            if outcome == errors.DELIVERED:
                # Deferred ones are counted once the cycle knows whether they
                # expired, bounced ones once their DSN is spooled (_bounce).
                self._metrics.recipients.labels(route.name, outcome).inc()
                rcpt.state = RcptState.DELIVERED
                self._metrics.delivery_seconds.labels(route.name).observe(
                    max(0.0, now - envelope.received_at)
                )
                events.log(
                    "delivered", id=envelope.id, to=f"<{address}>", route=route.name,
                    remote=remote, reply=str(reply),
                )  # fmt: skip
            elif outcome == errors.BOUNCED:
                assert not isinstance(attempt, BaseException)
                failures.append(_failure(attempt, address, route, now))
            else:
                deferred.append((rcpt, route.name))

    async def _conclude(
        self,
        envelope: Envelope,
        body: Body,
        failures: list[Failure],
        deferred: list[tuple[Recipient, str]],
    ) -> float | None:
        """After every route answered: expiry, the DSN, the next attempt or deletion."""
        cfg = self._config()
        now = self._clock()
        if deferred and now - envelope.received_at >= cfg.queue.max_lifetime:
            for rcpt, route in deferred:
                failures.append(self._expire(envelope, rcpt, route, now))
            deferred = []
        if failures and not await self._bounce(envelope, body, failures, now):
            # The DSN could not be spooled: keep the recipients pending and
            # try again later, when the failure will be seen again.
            deferred += [
                (r, f.route or _NO_ROUTE) for f in failures if (r := _pending(envelope, f.address))
            ]
        for _, route in deferred:
            self._metrics.recipients.labels(route, errors.DEFERRED).inc()
        if envelope.done:
            return await self._remove(envelope)
        if deferred and self._warning_due(envelope, now):
            # Marked before the state write below: a crash in between can at
            # worst repeat the warning, never lose the recipients' state.
            envelope.delay_warned = await self._warn(envelope, body, deferred, now)
        tries = envelope.attempts - envelope.backoff_from
        delay = backoff(tries, cfg.queue.min_backoff, cfg.queue.max_backoff, self._rng)
        # Never sleep past the lifetime: the last try happens at expiry.
        deadline = envelope.received_at + cfg.queue.max_lifetime
        warning = self._warning_time(envelope)
        if warning is not None and warning > now:
            # Nor past the delay warning: it goes out with the attempt then
            # (as Postfix's delay_warning_time), not up to max_backoff late.
            deadline = min(deadline, warning)
        envelope.next_attempt = max(now, min(now + delay, deadline))
        saved = await self._save(envelope)
        if saved == "gone":
            events.log("dropped", id=envelope.id, reason="no longer in the spool")
            return None
        next_at = datetime.fromtimestamp(envelope.next_attempt, UTC).isoformat(timespec="seconds")
        for rcpt, route in deferred:
            events.log(
                "deferred", id=envelope.id, to=f"<{rcpt.address}>", route=route,
                remote=rcpt.remote_mta, reply=str(rcpt.last_reply), next_attempt=next_at,
            )  # fmt: skip
        if saved == "failed":
            # Retry the write at a backoff, before (and in place of) an attempt.
            return min(envelope.next_attempt, now + cfg.queue.min_backoff)
        return envelope.next_attempt

    async def _remove(self, envelope: Envelope) -> float | None:
        """Delete a message every recipient of which is final.

        The delete is its only record of success (no state write before
        it), so if it fails the states are written instead, or held in
        memory by _save: a delivered recipient is never tried again.
        """
        try:
            await self._spool.delete_async(envelope.id)
        except (OSError, RelayError) as exc:
            events.error("spool_delete_failed", id=envelope.id, error=str(exc))
            saved = await self._save(envelope)
            if saved != "gone":
                # Try the delete again later (_cycle deletes a done envelope).
                return self._clock() + self._config().queue.min_backoff
        self._unsaved.pop(envelope.id, None)
        events.log("removed", id=envelope.id)
        return None

    def _expire(self, envelope: Envelope, rcpt: Recipient, route: str, now: float) -> Failure:
        """max_lifetime reached: the recipient fails with its last reply, made permanent."""
        last = rcpt.last_reply
        rcpt.last_reply = last.as_permanent() if last else errors.DELIVERY_EXPIRED
        events.log(
            "expired", id=envelope.id, to=f"<{rcpt.address}>", route=route,
            age=round(now - envelope.received_at), reply=str(last or ""),
        )  # fmt: skip
        # Issue #5: Status 4.4.7 with Action: failed, Diagnostic-Code the last error.
        return Failure(
            address=rcpt.address,
            reply=last or errors.DELIVERY_EXPIRED,
            reason=BounceReason.EXPIRED,
            remote_mta=rcpt.remote_mta,
            remote=last is not None and rcpt.last_remote,
            last_attempt=now,
            route="" if route == _NO_ROUTE else route,
            status=errors.EXPIRED_STATUS,
        )

    async def _bounce(
        self, envelope: Envelope, body: Body, failures: Sequence[Failure], now: float
    ) -> bool:
        """Spool one DSN for ``failures``, then mark them bounced.

        False when the DSN could not be spooled (the recipients stay pending).
        """
        dsn_id = ""
        if not envelope.mail_from:
            # RFC 5321 section 4.5.5 / RFC 3464: never bounce the null
            # reverse-path; a DSN that cannot be delivered is dropped.
            self._metrics.bounces.labels(BounceReason.DOUBLE_BOUNCE.value).inc()
        else:
            cfg = self._config()
            if isinstance(body, BodyFile):
                # The DSN quotes the header section only: read a bounded head.
                body = await asyncio.to_thread(body.head, IN_MEMORY_MAX)
            notify = cfg.bounces.notify
            dsn = build_dsn(
                envelope, failures, hostname=cfg.server.hostname, original=body,
                now=datetime.fromtimestamp(now, UTC), postmaster_told=bool(notify),
            )  # fmt: skip
            report = Envelope(
                id=new_id(),
                mail_from="",
                recipients=[Recipient(envelope.mail_from)],
                received_at=now,
                next_attempt=now,
                smtputf8=needs_smtputf8(envelope, failures),
                is_bounce=True,
            )
            try:
                # Durable before the originals are marked: a crash here means
                # at worst a second DSN, never none.
                await asyncio.to_thread(self._spool.put, report, dsn)
            except RelayError as exc:
                events.error("bounce_failed", id=envelope.id, error=exc.detail)
                return False
            dsn_id = report.id
            for reason in sorted({f.reason.value for f in failures}):
                self._metrics.bounces.labels(reason).inc()
            self.add(report)
            if notify:
                await self._notify(envelope, body, failures, now, notify)
        for failure in failures:
            rcpt = _pending(envelope, failure.address)
            if rcpt is not None:
                rcpt.state = RcptState.BOUNCED
                # Counted here, once: a DSN that could not be spooled leaves
                # the recipient pending, to fail (and be counted) again later.
                self._metrics.recipients.labels(failure.route or _NO_ROUTE, errors.BOUNCED).inc()
            events.log(
                "bounced", logging.WARNING, id=envelope.id, to=f"<{failure.address}>",
                reason=failure.reason.value, reply=str(failure.reply),
                remote=failure.remote_mta, dsn=dsn_id or "none (null sender)",
            )  # fmt: skip
        return True

    def _warning_time(self, envelope: Envelope) -> float | None:
        """When ``envelope``'s sender is due its delay warning; None if never."""
        after = self._config().bounces.delay_warning
        if not after or envelope.delay_warned or not envelope.mail_from or envelope.is_bounce:
            # Off, sent already, or a DSN (null sender): never to <>.
            return None
        return envelope.received_at + after

    def _warning_due(self, envelope: Envelope, now: float) -> bool:
        when = self._warning_time(envelope)
        return when is not None and now >= when

    async def _warn(
        self,
        envelope: Envelope,
        body: Body,
        deferred: Sequence[tuple[Recipient, str]],
        now: float,
    ) -> bool:
        """Spool the one delay warning (RFC 3464, ``Action: delayed``) for the
        ``deferred`` recipients; True once it is spooled.

        It goes through the queue as a DSN does (null sender, bounce route).
        A warning that cannot be spooled is logged and tried again at the
        next attempt; it never holds up the message itself.
        """
        cfg = self._config()
        delayed = [
            Delay(
                address=rcpt.address,
                reply=rcpt.last_reply or errors.INTERNAL_ERROR,
                remote_mta=rcpt.remote_mta,
                remote=rcpt.last_remote,
                last_attempt=now,
                route="" if route == _NO_ROUTE else route,
            )
            for rcpt, route in deferred
            if rcpt.state is RcptState.PENDING
        ]
        if not delayed:
            return False
        if isinstance(body, BodyFile):
            body = await asyncio.to_thread(body.head, IN_MEMORY_MAX)
        give_up = envelope.received_at + cfg.queue.max_lifetime
        warning = build_delay_warning(
            envelope, delayed, hostname=cfg.server.hostname, original=body,
            now=datetime.fromtimestamp(now, UTC), give_up=give_up,
        )  # fmt: skip
        report = Envelope(
            id=new_id(),
            mail_from="",
            recipients=[Recipient(envelope.mail_from)],
            received_at=now,
            next_attempt=now,
            smtputf8=delay_needs_smtputf8(envelope, delayed),
            is_bounce=True,
        )
        try:
            await asyncio.to_thread(self._spool.put, report, warning)
        except RelayError as exc:
            events.error("delay_warning_failed", id=envelope.id, error=exc.detail)
            return False
        self._metrics.delay_warnings.inc()
        give_up_at = datetime.fromtimestamp(give_up, UTC).isoformat(timespec="seconds")
        events.log(
            "delay_warning", id=envelope.id, to=f"<{envelope.mail_from}>", dsn=report.id,
            recipients=len(delayed), age=round(now - envelope.received_at), gives_up=give_up_at,
        )  # fmt: skip
        self.add(report)
        return True

    async def _notify(
        self,
        envelope: Envelope,
        original: bytes,
        failures: Sequence[Failure],
        now: float,
        notify: Sequence[str],
    ) -> None:
        """Spool the postmaster copy of a DSN (``[bounces] notify``).

        Only for a DSN that went to a sender: a failed DSN or copy (null
        sender) never produces another, so copies cannot loop. A copy that
        cannot be spooled is logged; the sender's DSN is what must not be lost.
        """
        cfg = self._config()
        copy = build_postmaster_copy(
            envelope, failures, hostname=cfg.server.hostname, original=original,
            now=datetime.fromtimestamp(now, UTC), notify=notify,
        )  # fmt: skip
        report = Envelope(
            id=new_id(),
            mail_from="",
            recipients=[Recipient(address) for address in notify],
            received_at=now,
            next_attempt=now,
            smtputf8=needs_smtputf8(envelope, failures),
            is_bounce=True,
        )
        try:
            await asyncio.to_thread(self._spool.put, report, copy)
        except RelayError as exc:
            events.error("postmaster_copy_failed", id=envelope.id, error=exc.detail)
            return
        events.log("postmaster_copy", id=envelope.id, copy=report.id, to=", ".join(notify))
        self.add(report)

    # --- routing -------------------------------------------------------------------

    def _route_for(self, envelope: Envelope, address: str) -> Route | None:
        """The route ``address`` takes now, or None (deferred until a rule routes it).

        Routes are looked up at every attempt, not at acceptance, so a
        reload that changes the rules applies to mail already queued. A
        DSN's recipient (the original sender) goes by the bounce route.
        """
        return route_of(self._config(), envelope, address)


def route_of(cfg: Config, envelope: Envelope, address: str) -> Route | None:
    """:meth:`Scheduler._route_for` under ``cfg`` (also ``relay queue list --route``)."""
    if envelope.is_bounce:
        try:
            return routing.bounce_route(cfg, address)
        except ValueError:
            return None  # no domain to send it to: deferred, dropped at its lifetime
    trusted = cfg.server.trusts(envelope.client.ip)
    return routing.route_for(cfg, address, trusted, envelope.mail_from)


# --- helpers ----------------------------------------------------------------------


def _pending(envelope: Envelope, address: str) -> Recipient | None:
    for rcpt in envelope.recipients:
        if rcpt.address == address and rcpt.state is RcptState.PENDING:
            return rcpt
    return None


#: Longest cause kept per recipient: a reason, not a transcript.
_CAUSE_MAX = 300


def cause(results: Sequence[Reply | BaseException], reply: Reply) -> str:
    """What the last failure said beyond ``reply``, for ``relay queue list``; "" if nothing.

    A RelayError's detail is the log's: "Connect call failed (...)", a TLS
    check's reason, a greeting; a remote 4xx/5xx is its reply and adds nothing.
    """
    items = [i for i in results if not isinstance(i, errors.NotTried)] or list(results)
    if not items or isinstance(items[-1], Reply):
        return ""
    last = items[-1]
    text = last.detail if isinstance(last, RelayError) else f"{type(last).__name__}: {last}"
    text = " ".join(text.split())[:_CAUSE_MAX]
    return "" if text in (reply.text, str(reply)) else text


def from_wire(results: Sequence[Reply | RelayError]) -> bool:
    """True when the last result is a reply the remote host sent (its 4xx/5xx).

    A Reply, RemoteTemporary or RemotePermanent came over the wire; every
    other RelayError (TLS policy, DNS, unreachable, lost) is the relay's
    own diagnosis (RFC 3464 section 2.3.6: only the former is "smtp;").
    """
    if not results:
        return False
    return isinstance(results[-1], Reply | errors.RemoteTemporary | errors.RemotePermanent)


def _failure(attempt: Attempt, address: str, route: Route, now: float) -> Failure:
    """The DSN entry of a recipient that bounced in ``attempt``."""
    results: Sequence[Reply | RelayError] = attempt.results.get(address, ())
    reason = reason_for(results)
    tls: tuple[TlsIssue, ...] = ()
    if reason is BounceReason.TLS_POLICY:
        tls = tuple(
            TlsIssue(
                host.candidate.host.strip("[]"),
                host.failure.reason,
                ip=host.ip or "",
                certificate=host.failure.certificate,
                detail=host.failure.detail,
                via_mx=host.candidate.via_mx or "",
            )
            for host in attempt.hosts
            if isinstance(host.failure, TlsPolicyFailure)
        ) or tuple(
            TlsIssue(attempt.remote.get(address, "") or route.name, item.reason)
            for item in results
            if isinstance(item, TlsPolicyFailure)
        )
    return Failure(
        address=address,
        reply=attempt.last(address),
        reason=reason,
        remote_mta=attempt.remote.get(address, ""),
        remote=from_wire(results),
        tls=tls,
        last_attempt=now,
        route=route.name,
    )
