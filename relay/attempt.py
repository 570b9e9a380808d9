"""What one delivery attempt found, per host and per recipient, and its bookkeeping.

:class:`Attempt` is what the scheduler consumes (``errors.outcome``
decides each recipient's fate from it); :class:`HostResult` is one line
of the attempt log; :class:`RecipientResults` collects the results while
the attempt walks its hosts; :class:`AttemptRecorder` counts and logs
them (metrics, the ``attempt`` log line, certificate expiry).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from relay import errors, events
from relay.advice import hop_advice
from relay.config import Config, Route
from relay.envelope import Envelope
from relay.errors import RelayError, Reply, TlsPolicyFailure
from relay.expiry import ExpiryWatch
from relay.health import ProbeEnd
from relay.metrics import Metrics
from relay.mtasts import TESTING, would_fail
from relay.routing import Candidate


class HostOutcome(enum.StrEnum):
    """What happened at one host: the attempt log's ``result=`` and the metric label."""

    TLS_FAILED = "tls_failed"
    UNREACHABLE = "unreachable"
    AUTH_FAILED = "auth_failed"
    DNS_FAILED = "dns_failed"
    DELIVERED = "delivered"
    BOUNCED = "bounced"
    DEFERRED = "deferred"


@dataclass(frozen=True, slots=True)
class HostResult:
    """What happened at one candidate host (one line of the attempt log)."""

    candidate: Candidate
    ip: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    verified: bool = False
    peer_subject: str | None = None
    #: None when the host took the transaction (some recipients may still be refused).
    failure: RelayError | None = None
    #: The reply that sums up this host for the log (DATA reply, or the failure's).
    reply: Reply | None = None
    #: True when an idle pooled session was reused for this transaction.
    reused: bool = False
    #: Whether the host offered STARTTLS; None when no session got that far.
    starttls_offered: bool | None = None
    #: The verified certificate's notAfter (Unix seconds); None when not verified.
    not_after: float | None = None

    @property
    def tls_state(self) -> str:
        """What happened to TLS, for the attempt log's ``tls=`` field.

        The TLS version when the session was encrypted (``verified`` says
        whether its certificate was checked); ``failed`` when the host failed
        the TLS policy (the check is ``failure.reason``); ``not_used`` when
        STARTTLS was offered but the mail went in plaintext (opportunistic
        fallback); ``none`` when it was not offered; ``-`` when no SMTP
        session came up (unreachable, DNS).
        """
        if isinstance(self.failure, TlsPolicyFailure):
            return "failed"
        if self.tls_version:
            return self.tls_version
        if self.starttls_offered is None:
            return "-"
        return "not_used" if self.starttls_offered else "none"

    @property
    def outcome(self) -> HostOutcome:
        failure = self.failure
        if isinstance(failure, TlsPolicyFailure):
            return HostOutcome.TLS_FAILED
        if isinstance(failure, errors.HostUnreachable):
            return HostOutcome.UNREACHABLE
        if isinstance(failure, errors.AuthFailed):
            return HostOutcome.AUTH_FAILED
        if isinstance(failure, errors.DnsTemporary | errors.RouteMisconfigured) or (
            self.ip is None and failure is not None
        ):
            return HostOutcome.DNS_FAILED
        if self.reply is not None and self.reply.code // 100 == 2:
            return HostOutcome.DELIVERED
        if self.reply is not None and self.reply.permanent:
            return HostOutcome.BOUNCED
        return HostOutcome.DEFERRED


@dataclass(frozen=True, slots=True)
class Attempt:
    """The result of one attempt for one route: what the scheduler consumes."""

    route: str
    hosts: tuple[HostResult, ...]
    #: Per recipient address: the result at each candidate tried, in order.
    results: Mapping[str, tuple[Reply | RelayError, ...]]
    #: Per recipient address: "host [ip]" of the host that gave the last result.
    remote: Mapping[str, str]
    #: The route's ``on_tls_failure = "defer"``: TLS failures at every host defer.
    tls_defers: bool = False
    #: Recipients accepted by a next hop that does not offer DSN (RFC 3461).
    relayed: frozenset[str] = frozenset()
    #: Nothing was tried: every host is held down and these probes of some
    #: of them are running (relay.health). The results defer every
    #: recipient; the scheduler may instead retry when a probe ends (relay.cycle).
    probes: tuple[ProbeEnd, ...] = ()

    def outcome(self, address: str) -> errors.Outcome:
        """errors.DELIVERED, errors.BOUNCED or errors.DEFERRED."""
        return errors.outcome(self.results.get(address, ()), self.tls_defers)

    def last(self, address: str) -> Reply:
        """The reply to record for this recipient (for logs, queue list, the DSN)."""
        items = self.results.get(address, ())
        # A NotTried marker only keeps the outcome a deferral; the last
        # host's own result says more.
        items = tuple(i for i in items if not isinstance(i, errors.NotTried)) or items
        if not items:
            return errors.HostUnreachable("no candidate host").reply
        item = items[-1]
        if isinstance(item, TlsPolicyFailure) and self.tls_defers and errors.tls_only(items):
            # on_tls_failure = "defer": the recipient waits, so its recorded
            # reply is a 4xx (450 4.7.5), made permanent again at expiry.
            return item.reply.as_temporary()
        return item if isinstance(item, Reply) else item.reply


def _is_final(item: Reply | RelayError) -> bool:
    """A result that ends a recipient's attempt: accepted, or refused for good."""
    if isinstance(item, Reply):
        return item.code // 100 in (2, 5)
    return isinstance(item, errors.PermanentFailure)


class RecipientResults:
    """Per-recipient results of one attempt, as they come in."""

    def __init__(self, recipients: Sequence[str]) -> None:
        self.results: dict[str, list[Reply | RelayError]] = {r: [] for r in recipients}
        self.remote: dict[str, str] = {}
        #: Recipients that already have a result from the current host.
        self.seen: set[str] = set()
        #: Recipients settled for this attempt without a final result.
        self.held: set[str] = set()
        #: Recipients accepted by a next hop that does not offer DSN.
        self.relayed: set[str] = set()

    def next_host(self) -> list[str]:
        """Start a new host; the recipients it should carry."""
        self.seen = set()
        return self.open

    def record(self, address: str, item: Reply | RelayError, where: str) -> None:
        self.results[address].append(item)
        self.remote[address] = where
        self.seen.add(address)

    def hold(self, addresses: Iterable[str]) -> None:
        """No other host gets ``addresses`` in this attempt (their reply was lost)."""
        self.held.update(addresses)

    def fail(self, addresses: Sequence[str], failure: RelayError, where: str) -> None:
        """The host failed: every recipient it carried without a result gets ``failure``."""
        for address in addresses:
            if address not in self.seen:
                self.record(address, failure, where)

    @property
    def open(self) -> list[str]:
        return [
            r
            for r, items in self.results.items()
            if r not in self.held and (not items or not _is_final(items[-1]))
        ]


def host_label(route: Route, candidate: Candidate) -> str:
    """The metric label for a host: config values only (bounded cardinality).

    Implicit routes (mail to a domain's own MX) go to hosts from the
    internet, not from the config: they share one label.
    """
    if route.implicit:
        return "(mx)"
    return candidate.configured or candidate.host


class AttemptRecorder:
    """Counts and logs what attempts did: one line and metric per host tried,
    and the attempt's end (the Attempt, with the loud cases said)."""

    def __init__(self, config: Callable[[], Config], metrics: Metrics) -> None:
        self._config = config
        self._metrics = metrics
        self._expiry = ExpiryWatch(metrics, config)

    def host_done(self, route: Route, envelope: Envelope, result: HostResult) -> HostResult:
        """Count and log one host tried."""
        cand = result.candidate
        label = host_label(route, cand)
        failure = result.failure
        outcome = result.outcome
        if isinstance(failure, TlsPolicyFailure):
            metrics = self._metrics
            metrics.child(metrics.tls_failures, route.name, label, failure.reason.value).inc()
        self._metrics.child(self._metrics.delivery_attempts, route.name, label, outcome).inc()
        if cand.sts == TESTING and result.starttls_offered is not None and not result.tls_version:
            # RFC 8461 section 4.2 wants TLS at every MX: enforce would refuse
            # a session that went on without it.
            would_fail(self._metrics, route, cand.via_mx or "", cand.host, "starttls-not-supported")
        if result.not_after is not None:
            self._expiry.record(route.name, label, cand.host.strip("[]"), result.not_after)
        reply = result.reply or (failure.reply if failure else None)
        fields: dict[str, Any] = {
            "id": envelope.id,
            "route": route.name,
            "host": cand.host,
            "ip": result.ip or "-",
            "port": cand.port,
            "tls": result.tls_state,
            "verified": result.verified,
            "reused": result.reused,
            "result": outcome,
            "reply": str(reply) if reply else "-",
        }
        if cand.sts:
            fields["mta_sts"] = cand.sts
        if failure is not None and failure.detail != (reply.text if reply else ""):
            fields["detail"] = failure.detail
        if isinstance(failure, TlsPolicyFailure):
            advice = hop_advice(
                failure.reason, cand.host.strip("[]"), failure.certificate, route.name,
                failure.detail, via_mx=cand.via_mx or "", sts_domain=cand.sts_domain,
                requiretls=envelope.requiretls,
            )  # fmt: skip
            fields["tls_check"] = failure.reason.value
            fields["diagnosis"] = advice.one_line()
        events.log("attempt", **fields)
        return result

    def not_tried(
        self, route: Route, envelope: Envelope, results: RecipientResults, count: int
    ) -> None:
        """The budget ran out before ``count`` candidates: the open recipients defer.

        Without this, TLS failures at the hosts tried would bounce them at
        once although other hosts were never asked (errors.outcome).
        """
        events.warning(
            "addresses_exhausted", id=envelope.id, route=route.name, untried_hosts=count,
            recipients=len(results.open),
        )  # fmt: skip
        failure = errors.NotTried(f"{count} candidate host(s) not tried: max_addresses reached")
        for address in results.open:
            # Not a host's result: the remote and reply of the last host stay.
            results.results[address].append(failure)

    def route_dns_error(
        self, route: Route, label: str, host: str, error: RelayError, qid: str | None
    ) -> None:
        """A name from the configuration does not resolve: the mail is deferred
        (never bounce everyone's mail for a typo), but it is said loudly."""
        self._metrics.route_dns_errors.labels(route.name, label).inc()
        # With the queue id (none for test-tls): `grep ID` tells why it waits.
        ident = {"id": qid} if qid else {}
        events.warning("route_dns_error", **ident, route=route.name, host=host, error=error.detail)

    def attempt(
        self,
        route: Route,
        envelope: Envelope,
        hosts: Sequence[HostResult],
        results: RecipientResults,
    ) -> Attempt:
        """The attempt's end: what the scheduler consumes."""
        final = {r: tuple(items) for r, items in results.results.items()}
        if route.tls_defers:
            self._tls_held(route, envelope, hosts, final)
        return Attempt(
            route.name, tuple(hosts), final, dict(results.remote), route.tls_defers,
            frozenset(results.relayed),
        )  # fmt: skip

    def _tls_held(
        self,
        route: Route,
        envelope: Envelope,
        hosts: Sequence[HostResult],
        results: Mapping[str, tuple[Reply | RelayError, ...]],
    ) -> None:
        """Every host failed the TLS policy and the route says "defer": say it loudly.

        The recipients stay queued with the normal backoff; they bounce
        only at max_lifetime, so a certificate fixed before then delivers them.
        """
        held = [a for a, items in results.items() if errors.tls_only(items)]
        if not held:
            return
        self._metrics.tls_deferred.labels(route.name).inc(len(held))
        checks = sorted(
            {h.failure.reason.value for h in hosts if isinstance(h.failure, TlsPolicyFailure)}
        )
        deadline = envelope.received_at + self._config().queue.max_lifetime
        events.warning(
            "tls_deferred", id=envelope.id, route=route.name, recipients=len(held),
            tls_checks=",".join(checks), on_tls_failure=route.on_tls_failure,
            bounce_at=datetime.fromtimestamp(deadline, UTC).isoformat(timespec="seconds"),
        )  # fmt: skip
