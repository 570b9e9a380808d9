"""What one attempt's results change: recipient states, expiry, reports, the next try.

Each recipient's outcome is recorded in its envelope and written back to
the spool *before anything else happens*, so a recipient the next hop
accepted is never delivered twice (docs/queue.md). Deferred mail is retried
with exponential backoff and jitter until ``[queue] max_lifetime``;
permanent failures and expiry produce one RFC 3464 DSN per message per
attempt (relay.reports), spooled before the originals are marked bounced,
so a crash can at worst duplicate a DSN, never lose one.

A state that could not be written (disk full, I/O error) is kept in memory
(:meth:`Outcomes.unsaved`): the write is retried before any new attempt of
that message, and its state is never reloaded from disk meanwhile.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Literal

from relay import errors, events, routing
from relay.bounce import BounceReason, Failure, TlsIssue, reason_for
from relay.config import Config, Route
from relay.envelope import Envelope, RcptState, Recipient
from relay.errors import RelayError, Reply, TlsPolicyFailure
from relay.metrics import Metrics
from relay.reports import NO_ROUTE, Reporter
from relay.spool import Spool
from relay.spoolbody import Body

if TYPE_CHECKING:
    from relay.attempt import Attempt

#: Jitter either side of the backoff delay, so messages deferred together
#: (one next hop down) do not all come back in the same second.
JITTER = 0.15

#: What became of a state write: on disk, the message was deleted meanwhile
#: (``relay queue delete``), or the write failed and the state is held in memory.
Saved = Literal["saved", "gone", "failed"]


def backoff(attempts: int, min_backoff: float, max_backoff: float, rng: random.Random) -> float:
    """Seconds to wait after the ``attempts``-th failed attempt (1 is the first).

    ``min_backoff * 2**(attempts-1)``, capped at ``max_backoff``, times a
    random factor in ``[1 - JITTER, 1 + JITTER]``; never above ``max_backoff``.
    """
    exponent = max(0, min(attempts, 64) - 1)
    base = min(min_backoff * 2.0**exponent, max_backoff)
    return min(base * rng.uniform(1 - JITTER, 1 + JITTER), max_backoff)


class Outcomes:
    """Applies attempt results to a message's recipients and persists them."""

    def __init__(
        self,
        config: Callable[[], Config],
        spool: Spool,
        metrics: Metrics,
        reporter: Reporter,
        *,
        clock: Callable[[], float],
        rng: random.Random,
    ) -> None:
        self._config = config
        self._spool = spool
        self._metrics = metrics
        self._reporter = reporter
        self._clock = clock
        self._rng = rng
        #: Envelopes whose latest state is not on disk yet (a failed write):
        #: the truth until a write succeeds; the spool copy is stale.
        self._unsaved: dict[str, Envelope] = {}

    def unsaved(self, qid: str) -> Envelope | None:
        """The message's latest state when only memory holds it, else None."""
        return self._unsaved.get(qid)

    async def save(self, envelope: Envelope) -> Saved:
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

    async def save_unsaved(self) -> None:
        """Last chance (the scheduler stops) for states only held in memory."""
        for envelope in list(self._unsaved.values()):
            await self.save(envelope)
        if self._unsaved:
            # Lost with the process: these recipients may be delivered again.
            events.error("spool_state_lost", ids=",".join(sorted(self._unsaved)))

    def apply(
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
            rcpt = pending(envelope, address)
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
                metrics = self._metrics
                metrics.child(metrics.recipients, route.name, outcome).inc()
                rcpt.state = RcptState.DELIVERED
                if not isinstance(attempt, BaseException) and address in attempt.relayed:
                    # RFC 3461 section 4.2: told "relayed" by conclude().
                    rcpt.relayed_notice = rcpt.notifies("SUCCESS")
                metrics.child(metrics.delivery_seconds, route.name).observe(
                    max(0.0, now - envelope.received_at)
                )
                events.log(
                    "delivered", id=envelope.id, to=f"<{address}>", route=route.name,
                    remote=remote, reply=str(reply),
                )  # fmt: skip
            elif outcome == errors.BOUNCED:
                assert not isinstance(attempt, BaseException)
                failures.append(_failure(attempt, address, route, now, envelope.requiretls))
            else:
                deferred.append((rcpt, route.name))

    async def conclude(
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
                (r, f.route or NO_ROUTE) for f in failures if (r := pending(envelope, f.address))
            ]
        for _, route in deferred:
            self._metrics.child(self._metrics.recipients, route, errors.DEFERRED).inc()
        owed = [r for r in envelope.recipients if r.relayed_notice]
        if owed and await self._reporter.relayed(envelope, body, owed, now):
            # Spooled (or not due): once only. One that could not be spooled
            # is tried again with the next attempt, or lost with a message
            # that is done: a success notice never holds up the mail.
            for rcpt in owed:
                rcpt.relayed_notice = False
        if envelope.done:
            return await self.remove(envelope)
        if deferred and self._reporter.warning_due(envelope, now):
            # Marked before the state write below: a crash in between can at
            # worst repeat the warning, never lose the recipients' state.
            envelope.delay_warned = await self._reporter.warn(envelope, body, deferred, now)
        tries = envelope.attempts - envelope.backoff_from
        delay = backoff(tries, cfg.queue.min_backoff, cfg.queue.max_backoff, self._rng)
        # Never sleep past the lifetime: the last try happens at expiry.
        deadline = envelope.received_at + cfg.queue.max_lifetime
        warning = self._reporter.warning_time(envelope)
        if warning is not None and warning > now:
            # Nor past the delay warning: it goes out with the attempt then
            # (as Postfix's delay_warning_time), not up to max_backoff late.
            deadline = min(deadline, warning)
        envelope.next_attempt = max(now, min(now + delay, deadline))
        saved = await self.save(envelope)
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

    async def remove(self, envelope: Envelope) -> float | None:
        """Delete a message every recipient of which is final.

        The delete is its only record of success (no state write before
        it), so if it fails the states are written instead, or held in
        memory by :meth:`save`: a delivered recipient is never tried again.
        """
        try:
            await self._spool.delete_async(envelope.id)
        except (OSError, RelayError) as exc:
            events.error("spool_delete_failed", id=envelope.id, error=str(exc))
            saved = await self.save(envelope)
            if saved != "gone":
                # Try the delete again later (the next cycle deletes a done envelope).
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
        # RFC 3463 4.4.7 (delivery time expired) with Action: failed (RFC 3464),
        # the last error as the Diagnostic-Code.
        return Failure(
            address=rcpt.address,
            reply=last or errors.DELIVERY_EXPIRED,
            reason=BounceReason.EXPIRED,
            remote_mta=rcpt.remote_mta,
            remote=last is not None and rcpt.last_remote,
            last_attempt=now,
            route="" if route == NO_ROUTE else route,
            status=errors.EXPIRED_STATUS,
        )

    async def _bounce(
        self, envelope: Envelope, body: Body, failures: Sequence[Failure], now: float
    ) -> bool:
        """Spool one DSN for ``failures`` (relay.reports), then mark them bounced.

        False when the DSN could not be spooled (the recipients stay pending).
        """
        dsn_id = await self._reporter.bounce(envelope, body, failures, now)
        if dsn_id is None:
            return False
        for failure in failures:
            rcpt = pending(envelope, failure.address)
            if rcpt is not None:
                rcpt.state = RcptState.BOUNCED
                # Counted here, once: a DSN that could not be spooled leaves
                # the recipient pending, to fail (and be counted) again later.
                self._metrics.recipients.labels(failure.route or NO_ROUTE, errors.BOUNCED).inc()
            events.log(
                "bounced", logging.WARNING, id=envelope.id, to=f"<{failure.address}>",
                reason=failure.reason.value, reply=str(failure.reply),
                remote=failure.remote_mta, dsn=dsn_id or "none (null sender, or NOTIFY)",
            )  # fmt: skip
        return True


def pending(envelope: Envelope, address: str) -> Recipient | None:
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


def _failure(attempt: Attempt, address: str, route: Route, now: float, requiretls: bool) -> Failure:
    """The DSN entry of a recipient that bounced in ``attempt`` (of a message
    sent with REQUIRETLS when ``requiretls``)."""
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
                sts_domain=host.candidate.sts_domain,
                requiretls=requiretls,
            )
            for host in attempt.hosts
            if isinstance(host.failure, TlsPolicyFailure)
        ) or tuple(
            TlsIssue(
                attempt.remote.get(address, "") or route.name, item.reason, requiretls=requiretls
            )
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
