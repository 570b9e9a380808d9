"""One delivery cycle of a due message: read it, route it, try each route once.

The message is read from the spool when it is due (or taken from memory
just after it was accepted), its pending recipients are grouped by route,
and one :meth:`Deliverer.deliver` call is made per route, concurrently
within ``[delivery] max_concurrency``. Each result is handed to
relay.outcomes as it arrives and persisted before the cycle goes on.

A body over ``spoolbody.IN_MEMORY_MAX`` is not read whole: delivery gets the
open file and sends it in pieces.

Waiting for a probe. A route whose every host is held down while another
attempt probes one of them (relay.health) is not deferred for a backoff:
when no route of the message tried anything, the cycle counts no attempt,
writes nothing and answers :class:`Waiting`, and the scheduler makes the
message due again as soon as the probe ends (at once if the host is back;
if the probe failed, that attempt finds the host held down and defers as
ever). A message with other routes that did try records the waiting route
as deferred, and is likewise due again when the probe ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from relay import errors, events, routing
from relay.bounce import Failure
from relay.config import Config, Route
from relay.envelope import Envelope, Recipient
from relay.health import ProbeEnd
from relay.limits import LiveLimit
from relay.outcomes import Outcomes
from relay.relaying import may_relay
from relay.reports import NO_ROUTE
from relay.spool import Spool
from relay.spoolbody import IN_MEMORY_MAX, Body, BodyFile

if TYPE_CHECKING:
    from relay.attempt import Attempt

#: A just-accepted message's body is handed to the scheduler in memory, so
#: its first attempt reads nothing back from disk (two opens, two reads and
#: a JSON parse per message: a fifth of the 1 KiB path's spool work,
#: docs/performance.md). Bounded per message (the spool's IN_MEMORY_MAX: larger
#: bodies are files anyway) and in total: beyond these the first attempt
#: reads the spool as every later one does.
FRESH_TOTAL_MAX = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Waiting:
    """A cycle's answer when a route waits for a probe: due at ``due`` at the
    latest, and as soon as one of ``probes`` is done (relay.queue)."""

    due: float
    probes: tuple[ProbeEnd, ...]


#: What a cycle answers: the next due time, a probe to wait for, or None
#: when the message left the queue.
Next = float | Waiting | None


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


def route_of(cfg: Config, envelope: Envelope, address: str) -> Route | None:
    """The route ``address`` takes now under ``cfg``, or None (deferred until a
    rule routes it; also ``relay queue list --route``).

    Routes are looked up at every attempt, not at acceptance, so a
    reload that changes the rules applies to mail already queued. A
    DSN's recipient (the original sender) goes by the bounce route.
    """
    if envelope.is_bounce:
        try:
            return routing.bounce_route(cfg, address)
        except ValueError:
            return None  # no domain to send it to: deferred, dropped at its lifetime
    trusted = may_relay(cfg.server, envelope.client.ip)
    return routing.route_for(cfg, address, trusted, envelope.mail_from)


class DeliveryCycle:
    """Runs the cycle of one due message at a time (many concurrently)."""

    def __init__(
        self,
        config: Callable[[], Config],
        spool: Spool,
        deliverer: Deliverer,
        outcomes: Outcomes,
        *,
        clock: Callable[[], float],
    ) -> None:
        self._config = config
        self._spool = spool
        self._deliverer = deliverer
        self._outcomes = outcomes
        self._clock = clock
        self._limiter = LiveLimit(lambda: self._config().delivery.max_concurrency)
        #: Just-accepted messages, envelope and body as spooled, until their
        #: first attempt (IN_MEMORY_MAX, FRESH_TOTAL_MAX).
        self._fresh: dict[str, tuple[Envelope, bytes]] = {}
        self._fresh_bytes = 0
        #: Flushed by an operator: the backoff restarts at their next attempt.
        self._reset_backoff: set[str] = set()

    def remember(self, envelope: Envelope, body: Sequence[bytes]) -> None:
        """Keep a just-accepted message's ``body`` parts for its first attempt,
        within IN_MEMORY_MAX and FRESH_TOTAL_MAX (else it is read back then)."""
        size = sum(map(len, body))
        if (
            body
            and size <= IN_MEMORY_MAX
            and self._fresh_bytes + size <= FRESH_TOTAL_MAX
            and envelope.id not in self._fresh
        ):
            self._fresh[envelope.id] = (envelope, b"".join(body))
            self._fresh_bytes += size

    def restart_backoff(self, ids: Sequence[str]) -> None:
        """Their next failed attempt waits ``min_backoff`` again (a flush)."""
        self._reset_backoff.update(ids)

    def forget(self, qid: str) -> None:
        """The message left the schedule (withdrawn): drop what is kept for it."""
        self._take_fresh(qid)
        self._reset_backoff.discard(qid)

    def _take_fresh(self, qid: str) -> tuple[Envelope, bytes] | None:
        fresh = self._fresh.pop(qid, None)
        if fresh is not None:
            self._fresh_bytes -= len(fresh[1])
        return fresh

    def _give_back_fresh(self, qid: str, fresh: tuple[Envelope, bytes]) -> None:
        """Undo :meth:`_take_fresh` (a cycle that tried nothing)."""
        self._fresh[qid] = fresh
        self._fresh_bytes += len(fresh[1])

    async def run(self, qid: str) -> Next:
        """Try one due message; its next due time, what it waits for (see the
        module docstring), or None when it left the queue."""
        bodies: list[Body] = []
        try:
            return await self._try(qid, bodies)
        finally:
            for body in bodies:
                if isinstance(body, BodyFile):
                    body.close()

    async def _try(self, qid: str, bodies: list[Body]) -> Next:
        """:meth:`run`; the body read goes into ``bodies`` (closed by the caller)."""
        held = self._outcomes.unsaved(qid)
        if held is not None:
            # The disk is behind memory: write first, attempt nothing until then.
            saved = await self._outcomes.save(held)
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
            return await self._outcomes.remove(envelope)
        before = envelope.attempts, envelope.backoff_from
        reset = qid in self._reset_backoff
        if reset:
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
            deferred.append((rcpt, NO_ROUTE))
        waiting: list[tuple[Route, Sequence[str], Attempt]] = []
        if not await self._attempt_routes(envelope, body, groups, failures, deferred, waiting):
            events.log("dropped", id=qid, reason="no longer in the spool")
            return None
        probes = tuple(probe for _, _, attempt in waiting for probe in attempt.probes)
        if waiting and len(waiting) == len(groups) and not unrouted:
            # Nothing was tried: as if this cycle had not run, until the probe
            # ends; at the latest after one connect timeout, which bounds how
            # long a probe takes to learn whether its host is alive.
            envelope.attempts, envelope.backoff_from = before
            if reset:
                self._reset_backoff.add(qid)
            if fresh is not None:
                self._give_back_fresh(qid, fresh)
            return Waiting(self._clock() + self._config().delivery.connect_timeout, probes)
        for route, addrs, attempt in waiting:
            self._outcomes.apply(envelope, route, addrs, attempt, failures, deferred)
        when = await self._outcomes.conclude(envelope, body, failures, deferred)
        return Waiting(when, probes) if when is not None and probes else when

    def _group(
        self, envelope: Envelope
    ) -> tuple[dict[str, tuple[Route, list[str]]], list[Recipient]]:
        """Pending recipients by route name (one transaction per route), and the unroutable."""
        groups: dict[str, tuple[Route, list[str]]] = {}
        unrouted: list[Recipient] = []
        for rcpt in envelope.pending:
            route = route_of(self._config(), envelope, rcpt.address)
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
        waiting: list[tuple[Route, Sequence[str], Attempt]],
    ) -> bool:
        """One deliver() per route, concurrently; persist each outcome as it arrives.

        A failed write does not stop the other routes: their transactions
        are under way, and the state is kept in memory (:meth:`Outcomes.save`).
        A route that tried nothing while a probe runs goes to ``waiting``
        instead, unapplied. False when the message was deleted from the
        spool meanwhile.
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
                applied = False
                for task in done:
                    route, addrs = tasks[task]
                    attempt = task.result()
                    if not isinstance(attempt, BaseException) and attempt.probes:
                        waiting.append((route, addrs, attempt))
                        continue
                    self._outcomes.apply(envelope, route, addrs, attempt, failures, deferred)
                    applied = True
                if not applied:
                    continue  # nothing changed: nothing to write
                if not pending and envelope.done:
                    # Every recipient is delivered: conclude() deletes the
                    # message, which says as much as a state write would
                    # (and falls back to one if the delete fails).
                    break
                # Persist now: a delivered recipient must never be tried again.
                gone = gone or await self._outcomes.save(envelope) == "gone"
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
