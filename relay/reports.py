"""The reports a message's outcome calls for, spooled as messages of their own.

RFC 3464 DSNs for recipients that failed, the one delay warning
(``Action: delayed``) for recipients still deferred after ``[bounces]
delay_warning``, the "relayed" notice for recipients that asked
NOTIFY=SUCCESS of a next hop without DSN, and the postmaster copy of a DSN
(``[bounces] notify``). Each recipient's NOTIFY (RFC 3461 section 4.1)
decides which of these its sender gets; RET which part of the message
comes back.
The bytes are relay.bounce's; this module spools them and queues them like
any other message (null sender, the bounce route). A report is never sent
to the null reverse-path (RFC 5321 section 4.5.5), so reports cannot loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from datetime import UTC, datetime

from relay import errors, events
from relay.bounce import (
    BounceReason,
    Delay,
    Failure,
    build_delay_warning,
    build_dsn,
    build_postmaster_copy,
    build_relayed,
    delay_needs_smtputf8,
    needs_smtputf8,
    relayed_needs_smtputf8,
)
from relay.config import Config
from relay.envelope import Envelope, RcptState, Recipient
from relay.errors import RelayError
from relay.metrics import Metrics
from relay.spool import Spool
from relay.spoolbody import IN_MEMORY_MAX, Body, BodyFile
from relay.spoolfiles import new_id

#: Route label for recipients that no rule routes any more.
NO_ROUTE = "(none)"


class Reporter:
    """Spools DSNs, delay warnings and postmaster copies, and queues them."""

    def __init__(
        self,
        config: Callable[[], Config],
        spool: Spool,
        metrics: Metrics,
        queue: Callable[[Envelope], None],
    ) -> None:
        self._config = config
        self._spool = spool
        self._metrics = metrics
        #: Queues a spooled report for delivery (the scheduler's add).
        self._queue = queue

    async def bounce(
        self, envelope: Envelope, body: Body, failures: Sequence[Failure], now: float
    ) -> str | None:
        """Spool one DSN for ``failures``; its queue id, "" when no DSN is
        due (the null reverse-path, or NOTIFY without FAILURE for every one
        of them), None when it could not be spooled."""
        if not envelope.mail_from:
            # RFC 5321 section 4.5.5 / RFC 3464: never bounce the null
            # reverse-path; a DSN that cannot be delivered is dropped.
            self._metrics.bounces.labels(BounceReason.DOUBLE_BOUNCE.value).inc()
            return ""
        # RFC 3461 section 4.1: NOTIFY=NEVER (or SUCCESS/DELAY alone): no DSN.
        failures = [f for f in failures if _notifies(envelope, f.address, "FAILURE")]
        if not failures:
            return ""
        cfg = self._config()
        full = await _full_message(envelope, body, cfg.bounces.max_returned_size)
        if full is not None:
            body = full
        elif isinstance(body, BodyFile):
            # The DSN quotes the header section only: read a bounded head.
            body = await asyncio.to_thread(body.head, IN_MEMORY_MAX)
        notify = cfg.bounces.notify
        dsn = build_dsn(
            envelope, failures, hostname=cfg.server.hostname, original=body,
            now=datetime.fromtimestamp(now, UTC), postmaster_told=bool(notify),
            full=full is not None,
        )  # fmt: skip
        report = _report(envelope, [envelope.mail_from], now, needs_smtputf8(envelope, failures))
        try:
            # Durable before the originals are marked: a crash here means
            # at worst a second DSN, never none.
            await asyncio.to_thread(self._spool.put, report, dsn)
        except RelayError as exc:
            events.error("bounce_failed", id=envelope.id, error=exc.detail)
            return None
        for reason in sorted({f.reason.value for f in failures}):
            self._metrics.bounces.labels(reason).inc()
        self._queue(report)
        if notify:
            await self._notify(envelope, body, failures, now, notify)
        return report.id

    def warning_time(self, envelope: Envelope) -> float | None:
        """When ``envelope``'s sender is due its delay warning; None if never."""
        after = self._config().bounces.delay_warning
        if not after or envelope.delay_warned or not envelope.mail_from or envelope.is_bounce:
            # Off, sent already, or a DSN (null sender): never to <>.
            return None
        return envelope.received_at + after

    def warning_due(self, envelope: Envelope, now: float) -> bool:
        when = self.warning_time(envelope)
        return when is not None and now >= when

    async def warn(
        self,
        envelope: Envelope,
        body: Body,
        deferred: Sequence[tuple[Recipient, str]],
        now: float,
    ) -> bool:
        """Spool the one delay warning (RFC 3464, ``Action: delayed``) for the
        ``deferred`` recipients (with their route names); True once it is spooled.

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
                route="" if route == NO_ROUTE else route,
            )
            for rcpt, route in deferred
            # RFC 3461 section 4.1: only to those whose NOTIFY allows DELAY.
            if rcpt.state is RcptState.PENDING and rcpt.notifies("DELAY")
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
        smtputf8 = delay_needs_smtputf8(envelope, delayed)
        report = _report(envelope, [envelope.mail_from], now, smtputf8)
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
        self._queue(report)
        return True

    async def relayed(
        self, envelope: Envelope, body: Body, relayed: Sequence[Recipient], now: float
    ) -> bool:
        """Spool the "relayed" notice (RFC 3461 section 4.2, ``Action:
        relayed``) for recipients that asked NOTIFY=SUCCESS and went to a
        next hop without DSN; True once spooled (or when none is due: the
        null sender, a DSN itself)."""
        if not relayed or not envelope.mail_from or envelope.is_bounce:
            return True
        cfg = self._config()
        if isinstance(body, BodyFile):
            body = await asyncio.to_thread(body.head, IN_MEMORY_MAX)
        notice = build_relayed(
            envelope, relayed, hostname=cfg.server.hostname, original=body,
            now=datetime.fromtimestamp(now, UTC),
        )  # fmt: skip
        report = _report(
            envelope, [envelope.mail_from], now, relayed_needs_smtputf8(envelope, relayed)
        )
        try:
            await asyncio.to_thread(self._spool.put, report, notice)
        except RelayError as exc:
            events.error("relayed_notice_failed", id=envelope.id, error=exc.detail)
            return False
        events.log(
            "relayed_notice", id=envelope.id, to=f"<{envelope.mail_from}>", dsn=report.id,
            recipients=len(relayed),
        )  # fmt: skip
        self._queue(report)
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
        report = _report(envelope, notify, now, needs_smtputf8(envelope, failures))
        try:
            await asyncio.to_thread(self._spool.put, report, copy)
        except RelayError as exc:
            events.error("postmaster_copy_failed", id=envelope.id, error=exc.detail)
            return
        events.log("postmaster_copy", id=envelope.id, copy=report.id, to=", ".join(notify))
        self._queue(report)


def _report(envelope: Envelope, to: Sequence[str], now: float, smtputf8: bool) -> Envelope:
    """The envelope of a report about ``envelope``: null sender, due now."""
    return Envelope(
        id=new_id(),
        mail_from="",
        recipients=[Recipient(address) for address in to],
        received_at=now,
        next_attempt=now,
        smtputf8=smtputf8,
        is_bounce=True,
        # RFC 8689 section 5: a report on a REQUIRETLS message quotes its
        # headers (never the body: build_dsn) and goes with REQUIRETLS too.
        requiretls=envelope.requiretls,
    )


def _notifies(envelope: Envelope, address: str, when: str) -> bool:
    """The recipient ``address`` of ``envelope`` asked to hear of ``when`` (RFC 3461)."""
    rcpt = next((r for r in envelope.recipients if r.address == address), None)
    return rcpt is None or rcpt.notifies(when)


async def _full_message(envelope: Envelope, body: Body, limit: int) -> bytes | None:
    """The whole message for a DSN when its sender asked RET=FULL (RFC 3461
    section 4.3) and it is at most ``limit`` bytes; else None (headers only)."""
    size = len(body) if isinstance(body, bytes) else body.size
    if envelope.ret != "FULL" or size > limit:
        return None
    if isinstance(body, BodyFile):
        return await asyncio.to_thread(body.read, 0, size)
    return body
