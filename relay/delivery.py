"""One delivery attempt over a route's candidates with aiosmtplib (RFC 5321, RFC 3207).

``Deliverer.deliver`` walks the candidate hosts in order, each host's
addresses in turn (at most ``[delivery] max_addresses`` in all, keeping
one address for each later candidate), and runs
one SMTP transaction carrying every recipient still open: EHLO, STARTTLS
per the route's TLS policy, MAIL, one RCPT per recipient, DATA. Every
result is recorded per recipient and per host, so ``errors.outcome``
decides each recipient's fate.

Moving on: a connect failure, a 4xx/5xx greeting, a dropped connection,
a 4xx to MAIL, STARTTLS or DATA, or a TLS-policy failure moves the open
recipients to the next candidate. A 5xx to RCPT is final for that
recipient; a 5xx to MAIL or DATA is final for all. A 4xx to RCPT leaves
the recipient open for the next candidate. Only a verdict on the host's
TLS is a TLS-policy failure (no STARTTLS, a 5xx to STARTTLS, a
certificate error, an OpenSSL alert); a 4xx to STARTTLS or the peer
going away mid-handshake is temporary. When the address budget runs out
before every candidate was tried, the open recipients defer (never the
"every host failed TLS" bounce). A route with ``on_tls_failure = "defer"``
defers that case too, loudly (``tls_deferred``), until max_lifetime.

Host health (:mod:`relay.health`): the plan (routing.plan) leaves out the
addresses held down and carries each candidate's addresses, so an attempt
walks one list. Opening a session tells health whether the host is alive
(:func:`relay.health.marks_down`); an address that goes down while an
attempt waits for its connection slot is skipped without connecting. With
every host held down, every recipient is deferred at once.

At-least-once: the scheduler persists per-recipient state after
``deliver`` returns. A duplicate can come from a crash between the next
hop's 250 to DATA and that state write, or from a reply lost after the
final dot (waited for ``data_timeout``): those recipients are deferred and
not sent to another host in the same attempt (RFC 5321 section 6.1).

The outbound SMTP package: this module (the attempt and the transaction),
:mod:`relay.session` (connect, EHLO, STARTTLS, and :func:`map_smtp_errors`,
the one mapping of aiosmtplib's exceptions), :mod:`relay.pool` (session
reuse, per-hop limits) and :mod:`relay.probe` (``relay test-tls``). aiosmtplib
is imported in these modules and nowhere else.
"""

from __future__ import annotations

import asyncio
import random
import re
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import SMTPProtocol

from relay import errors, events, health, routing
from relay.advice import tls_advice
from relay.config import Config, Route
from relay.dns import Resolver
from relay.envelope import Envelope
from relay.errors import RelayError, Reply, TlsPolicyFailure
from relay.expiry import ExpiryWatch
from relay.health import Health
from relay.metrics import Metrics
from relay.pool import Pool
from relay.probe import ProbeResult, probe_hosts
from relay.routing import Candidate
from relay.session import (
    HandshakeFailed,
    HopKey,
    Session,
    StaleSession,
    map_smtp_errors,
    open_session,
    pipeline,
    remote_failure,
    reply_within,
)
from relay.spoolbody import Body, BodyFile


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

    def outcome(self, address: str) -> str:
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


# --- the body ---------------------------------------------------------------


def check_body(body: bytes) -> None:
    """Refuse to send a body with a bare CR or LF (no SMTP smuggling downstream).

    aiosmtplib's data() rewrites every lone CR or LF to CRLF, dot-stuffs
    lines starting with "." (RFC 5321 section 4.5.2), appends CRLF if the
    body lacks it, then ".\r\n". Inbound refuses bare CR/LF, so spooled
    bodies are CRLF-only and pass through byte for byte; should one ever
    not be, we refuse rather than let aiosmtplib silently rewrite it.
    """
    # Counting in C beats a regex with look-arounds several times over.
    pairs = body.count(b"\r\n")
    if body.count(b"\r") != pairs or body.count(b"\n") != pairs:
        raise errors.PermanentFailure(
            "spooled body contains a bare CR or LF", errors.BARE_LINE_ENDING
        )


#: Bytes read from a spooled body file and written per step (delivery of a
#: large message): memory per session stays about twice this.
SEND_CHUNK = 256 << 10


def _piece(body: BodyFile, offset: int, chunk: int) -> bytes:
    """Up to ``chunk`` bytes of ``body`` from ``offset``, one less when they
    would end between a CR and its LF, so a piece after one that ends in
    CRLF starts a line and dot-stuffing per piece is exact. Blocking."""
    piece = body.read(offset, chunk)
    if len(piece) > 1 and piece.endswith(b"\r") and offset + len(piece) < body.size:
        piece = piece[:-1]
    return piece


def scan_body_file(body: BodyFile, chunk: int = SEND_CHUNK) -> bool:
    """True when the file holds a bare CR or LF (blocking: run it in a thread).

    :func:`check_body` per piece; pieces never split a CRLF, so the counts add up.
    """
    if body.bare_line_ending is None:
        pairs = crs = lfs = offset = 0
        while offset < body.size:
            data = _piece(body, offset, chunk)
            if not data:
                break  # the file shrank: cannot happen in the spool
            offset += len(data)
            pairs += data.count(b"\r\n")
            crs += data.count(b"\r")
            lfs += data.count(b"\n")
        body.bare_line_ending = crs != pairs or lfs != pairs
    return body.bare_line_ending


async def check_any_body(body: Body) -> None:
    """:func:`check_body` for a body in memory or in a file."""
    if isinstance(body, bytes):
        check_body(body)
    elif await asyncio.to_thread(scan_body_file, body):
        raise errors.PermanentFailure(
            "spooled body contains a bare CR or LF", errors.BARE_LINE_ENDING
        )


def _is_final(item: Reply | RelayError) -> bool:
    """A result that ends a recipient's attempt: accepted, or refused for good."""
    if isinstance(item, Reply):
        return item.code // 100 in (2, 5)
    return isinstance(item, errors.PermanentFailure)


def _host_label(route: Route, candidate: Candidate) -> str:
    """The metric label for a host: config values only (bounded cardinality).

    Implicit routes (mail to a domain's own MX) go to hosts from the
    internet, not from the config: they share one label.
    """
    if route.implicit:
        return "(mx)"
    return candidate.configured or candidate.host


# --- the deliverer ----------------------------------------------------------


class _Transaction:
    """Per-recipient results of one attempt, as they come in."""

    def __init__(self, recipients: Sequence[str]) -> None:
        self.results: dict[str, list[Reply | RelayError]] = {r: [] for r in recipients}
        self.remote: dict[str, str] = {}
        #: Recipients that already have a result from the current host.
        self.seen: set[str] = set()
        #: Recipients settled for this attempt without a final result.
        self.held: set[str] = set()

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


class Deliverer:
    """Delivers one route's recipients of one message: ``deliver() -> Attempt``.

    ``config`` is called for every attempt, so a reload takes effect at the
    next attempt. Open sessions are pooled per next hop for
    ``[delivery] idle_timeout``; call :meth:`close` on shutdown.
    """

    def __init__(
        self,
        config: Callable[[], Config],
        resolver: Resolver,
        metrics: Metrics,
        rng: random.Random | None = None,
    ) -> None:
        self._config = config
        self._resolver = resolver
        self._metrics = metrics
        # Reserved for address-order jitter; candidate order comes from routing.
        self._rng = rng or random.Random()
        self._pool = Pool()
        self._expiry = ExpiryWatch(metrics, config)
        #: Which next hops are held down; shared by every attempt (relay.health).
        self.health = Health(config, metrics)

    async def close(self) -> None:
        """QUIT and close every pooled session."""
        await self._pool.close()

    @property
    def pooled_hops(self) -> int:
        """Next hops the pool holds state for (in use or idle sessions)."""
        return self._pool.hops

    # --- deliver ----------------------------------------------------------

    @property
    def resolver(self) -> Resolver:
        """The resolver of the current ``[dns]`` (inbound names its clients with it)."""
        return self._resolver

    def use_resolver(self, resolver: Resolver) -> None:
        """Resolve through ``resolver`` from the next attempt on (a reload changed [dns])."""
        self._resolver = resolver

    async def deliver(
        self,
        route: Route,
        envelope: Envelope,
        recipients: Sequence[str],
        body: Body,
        candidates: Sequence[Candidate] | None = None,
    ) -> Attempt:
        """Try ``candidates`` in order until every recipient has a final result.

        Without ``candidates`` (the scheduler's call) the route is planned
        here: weighted order, MX lookup, all through the one resolver.
        Never raises for delivery problems: they are in the Attempt. With
        no candidates, every recipient is deferred (no results).
        ``body`` is the spooled body, in memory or (large) an open file,
        which is then sent in pieces (:data:`SEND_CHUNK`).
        """
        token = object()
        if candidates is None:
            planned = await self._plan(route, envelope)
            if isinstance(planned, RelayError):
                # Also when every host is held down: deferred without connecting.
                results = {address: (planned,) for address in recipients}
                return Attempt(route.name, (), results, {})
            candidates, token = planned.candidates, planned.token
        try:
            return await self._walk(route, envelope, recipients, body, candidates, token)
        finally:
            # Probes this attempt claimed but never ran go to the next attempt.
            self.health.release(token)

    async def _walk(
        self,
        route: Route,
        envelope: Envelope,
        recipients: Sequence[str],
        body: Body,
        candidates: Sequence[Candidate],
        token: object,
    ) -> Attempt:
        """:meth:`deliver` over one ordered list of candidates and their addresses."""
        txn = _Transaction(recipients)
        hosts: list[HostResult] = []
        try:
            await check_any_body(body)
        except RelayError as exc:
            events.error("refused_body", id=envelope.id, route=route.name, error=exc.detail)
            for address in recipients:
                txn.record(address, exc, "")
            return self._attempt(route, envelope, hosts, txn)
        budget = self._config().delivery.max_addresses
        untried = 0
        candidates = list(candidates)
        for index in range(len(candidates)):
            await self._around_jam(route, candidates, index)
            candidate = candidates[index]
            if not txn.open:
                break
            if budget <= 0:
                untried = len(candidates) - index
                break
            try:
                ips = await self._candidate_addresses(route, candidate, envelope.id)
            except RelayError as exc:
                hosts.append(self._host_done(route, envelope, HostResult(candidate, failure=exc)))
                txn.fail(txn.next_host(), exc, candidate.host)
                continue
            # Keep one address for each candidate after this one, so a
            # primary with many addresses cannot starve the secondaries.
            cap = max(1, budget - (len(candidates) - index - 1))
            for ip in ips[:cap]:
                if not txn.open:
                    break
                budget -= 1
                result = await self._try_host(route, envelope, candidate, ip, txn, body, token)
                if result is None:
                    budget += 1  # held down meanwhile: skipped, not tried
                    continue
                hosts.append(self._host_done(route, envelope, result))
        if untried and txn.open:
            self._not_tried(route, envelope, txn, untried)
        return self._attempt(route, envelope, hosts, txn)

    async def _around_jam(self, route: Route, candidates: list[Candidate], index: int) -> None:
        """Concurrency isolation: when every connection slot of the candidate at
        ``index`` is held by a connection still waiting for its greeting (a
        wedged host accepts TCP and never speaks, for a whole connect timeout),
        try the next candidate of the same table that is not jammed first, and
        this one right after it; when all of them are jammed, wait until one
        is not (a healthy host greets in a moment). So a wedged host keeps
        only the attempts already on it, instead of every attempt queueing
        behind its slots while holding a delivery slot healthy hosts need.
        A candidate with no alternative in its table is waited for as ever,
        and MX hosts of one domain keep their preference order.
        """
        first = candidates[index]
        same = [index] + [
            j for j in range(index + 1, len(candidates)) if _interchangeable(first, candidates[j])
        ]
        if len(same) < 2:
            return
        while (
            free := next((j for j in same if not self._jammed(route, candidates[j])), None)
        ) is None:
            # Bounded: a connect timeout ends every jam.
            await self._pool.changed()
        if free != index:
            candidates.insert(index, candidates.pop(free))

    def _jammed(self, route: Route, candidate: Candidate) -> bool:
        return bool(candidate.addresses) and all(
            self._pool.jammed(_hop(route, candidate, ip)) for ip in candidate.addresses
        )

    def _not_tried(self, route: Route, envelope: Envelope, txn: _Transaction, count: int) -> None:
        """The budget ran out before ``count`` candidates: the open recipients defer.

        Without this, TLS failures at the hosts tried would bounce them at
        once although other hosts were never asked (errors.outcome).
        """
        events.warning(
            "addresses_exhausted", id=envelope.id, route=route.name, untried_hosts=count,
            recipients=len(txn.open),
        )  # fmt: skip
        failure = errors.NotTried(f"{count} candidate host(s) not tried: max_addresses reached")
        for address in txn.open:
            # Not a host's result: the remote and reply of the last host stay.
            txn.results[address].append(failure)

    async def _plan(self, route: Route, envelope: Envelope) -> routing.Plan | RelayError:
        """The route's candidates with their addresses, or the failure that left none
        (a DNS failure, or every host held down)."""
        plan = await routing.plan(route, self._resolver, self._rng, self.health)
        for failure in plan.dns_failures:
            if isinstance(failure.error, errors.RouteMisconfigured):
                self._route_dns_error(
                    route, failure.configured, failure.configured, failure.error, envelope.id
                )
            else:
                events.log(
                    "dns_failure", id=envelope.id, route=route.name,
                    host=failure.configured, error=failure.error.detail,
                )  # fmt: skip
        if not plan.candidates and plan.failure is not None:
            self.health.release(plan.token)
            return plan.failure
        return plan

    def _attempt(
        self, route: Route, envelope: Envelope, hosts: list[HostResult], txn: _Transaction
    ) -> Attempt:
        results = {r: tuple(items) for r, items in txn.results.items()}
        if route.tls_defers:
            self._tls_held(route, envelope, hosts, results)
        return Attempt(route.name, tuple(hosts), results, dict(txn.remote), route.tls_defers)

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

    async def _candidate_addresses(
        self, route: Route, candidate: Candidate, qid: str | None = None
    ) -> list[str]:
        """The planned addresses of ``candidate`` (looked up now if it came unplanned)."""
        if candidate.error is not None:
            if isinstance(candidate.error, errors.RouteMisconfigured):
                label = _host_label(route, candidate)
                self._route_dns_error(route, label, candidate.host, candidate.error, qid)
            raise candidate.error
        if candidate.addresses:
            return list(candidate.addresses)
        return await self._addresses(route, candidate, qid)

    async def _addresses(
        self, route: Route, candidate: Candidate, qid: str | None = None
    ) -> list[str]:
        """The IPs to connect to for ``candidate``, under the route's DNS policy."""
        try:
            return await routing.addresses_for(candidate, self._resolver)
        except errors.RouteMisconfigured as exc:
            self._route_dns_error(route, _host_label(route, candidate), candidate.host, exc, qid)
            raise

    def _route_dns_error(
        self, route: Route, label: str, host: str, error: RelayError, qid: str | None
    ) -> None:
        """A name from the configuration does not resolve: the mail is deferred
        (never bounce everyone's mail for a typo), but it is said loudly."""
        self._metrics.route_dns_errors.labels(route.name, label).inc()
        # With the queue id (none for test-tls): `grep ID` tells why it waits.
        ident = {"id": qid} if qid else {}
        events.warning("route_dns_error", **ident, route=route.name, host=host, error=error.detail)

    async def _try_host(
        self,
        route: Route,
        envelope: Envelope,
        candidate: Candidate,
        ip: str,
        txn: _Transaction,
        body: Body,
        token: object,
    ) -> HostResult | None:
        """One transaction at one address; records into ``txn``; never raises RelayError.

        None when the address went down while this attempt waited for one
        of its connection slots: skipped without connecting, so a message
        waits at most one connect timeout behind a host that is down.
        """
        cfg = self._config()
        key = _hop(route, candidate, ip)
        where = f"{candidate.host} [{ip}]"
        session: Session | None = None
        reused = False
        carried = txn.next_host()
        async with self._pool.slot(key, lambda: self._config().delivery.max_per_host):
            if not self.health.claim((ip, candidate.port), token):
                txn.fail(carried, errors.HostUnreachable(f"{where}: held down"), where)
                return None
            try:
                while True:
                    with self._pool.connecting(key):
                        session, reused = await self._health_checked(
                            route, candidate, ip, token, self._session(key, cfg, envelope.id)
                        )
                    try:
                        reply = await self._transaction(
                            session, envelope, txn, body, where, cfg, reused
                        )
                        break
                    except StaleSession:
                        # Closed while pooled, nothing sent: not the host's fault.
                        session.close()
                        session = None
            except RelayError as exc:
                if session is not None:
                    session.close()
                txn.fail(carried, exc, where)
                if isinstance(exc, errors.ReplyLost):
                    # The next hop may have the message: no other host gets
                    # it in this attempt (RFC 5321 section 6.1); deferred.
                    txn.hold(a for a in carried if txn.results[a][-1] is exc)
                return self._result(candidate, ip, session, failure=exc, reply=exc.reply)
            except BaseException:
                # Cancelled (shutdown): never pool a session mid-transaction.
                if session is not None:
                    session.close()
                raise
            self._pool.give(session, cfg.delivery.idle_timeout, cfg.delivery.max_per_host)
            return self._result(candidate, ip, session, reply=reply, reused=reused)

    async def _health_checked(
        self,
        route: Route,
        candidate: Candidate,
        ip: str,
        token: object,
        opening: Awaitable[tuple[Session, bool]],
    ) -> tuple[Session, bool]:
        """Await a session for ``ip``; tell health whether the host is alive."""
        key = (ip, candidate.port)
        label = _host_label(route, candidate)
        try:
            opened = await opening
        except RelayError as exc:
            if health.marks_down(exc):
                self.health.failed(key, candidate.host, route.name, label, exc, token)
            else:
                # It greeted: a TLS verdict or a 4xx to STARTTLS is not about its life.
                self.health.succeeded(key, candidate.host, route.name, label)
            raise
        self.health.succeeded(key, candidate.host, route.name, label)
        return opened

    @staticmethod
    def _result(
        candidate: Candidate,
        ip: str,
        session: Session | None,
        failure: RelayError | None = None,
        reply: Reply | None = None,
        reused: bool = False,
    ) -> HostResult:
        if session is None:
            return HostResult(candidate, ip, failure=failure, reply=reply)
        return HostResult(
            candidate,
            ip,
            tls_version=session.tls_version,
            cipher=session.cipher,
            verified=session.verified,
            peer_subject=session.peer_subject,
            failure=failure,
            reply=reply,
            reused=reused,
            starttls_offered=session.starttls_offered,
            not_after=session.not_after,
        )

    async def _session(self, key: HopKey, cfg: Config, qid: str = "") -> tuple[Session, bool]:
        """A pooled session that answers RSET, or a fresh one; (session, reused)."""
        while (session := self._pool.take(key, cfg.delivery.idle_timeout)) is not None:
            if _pipelining(session.smtp):
                # The RSET goes out with the transaction's command group.
                return session, True
            try:
                with map_smtp_errors(require_tls=False):
                    # RFC 5321 section 4.1.1.5: RSET clears any leftover
                    # transaction state; it doubles as a liveness check.
                    await session.smtp.rset(timeout=cfg.delivery.command_timeout)
                return session, True
            except RelayError:
                # A dead pooled session is not the host's fault: replace it.
                session.close()
        return await self._connect(key, cfg, qid), False

    async def _connect(self, key: HopKey, cfg: Config, qid: str = "") -> Session:
        """Connect, EHLO and STARTTLS per the policy; raise a RelayError if the host fails."""
        ip, port, policy, name, _ = key
        try:
            return await open_session(key, cfg, starttls=True)
        except TlsPolicyFailure:
            raise
        except HandshakeFailed as exc:
            if policy.require_tls:
                raise exc.failure from exc
            # Opportunistic (RFC 7435): a failed handshake must not stop
            # the mail; reconnect to the same host and stay in plaintext.
            # With the queue id of the attempt that opened it: `grep ID` shows
            # why its attempt line says tls=not_used.
            ident = {"id": qid} if qid else {}
            events.warning(
                "tls_fallback", **ident, host=name, ip=ip, port=port, error=exc.failure.detail
            )
            return await open_session(key, cfg, starttls=False)

    async def _transaction(
        self,
        session: Session,
        envelope: Envelope,
        txn: _Transaction,
        body: Body,
        where: str,
        cfg: Config,
        reused: bool = False,
    ) -> Reply:
        """MAIL, RCPT per open recipient, DATA; the reply that sums it up.

        With a server that offers PIPELINING (RFC 2920) the commands go out
        as one group (after an RSET on a ``reused`` session): two round
        trips per message instead of five. Raises :class:`StaleSession` if
        a reused session turns out closed before its first reply.
        """
        smtp = session.smtp
        recipients = txn.open
        # TLS is settled by now: a TLS error mid-transaction is a lost
        # connection, not a policy failure.
        with map_smtp_errors(require_tls=False):
            encoding = "utf-8" if envelope.smtputf8 else "ascii"
            size = len(body) if isinstance(body, bytes) else body.size
            options = _mail_options(smtp, envelope, size)
            # quote_address: as aiosmtplib's mail() and rcpt() quote ("" -> "<>").
            mail = b" ".join(
                [b"MAIL FROM:" + quote_address(envelope.mail_from).encode(encoding)]
                + [o.encode("ascii") for o in options]
            )
            rcpts = [b"RCPT TO:" + quote_address(a).encode(encoding) for a in recipients]
            timeout = cfg.delivery.command_timeout
            accepted: list[str] = []
            last: Reply | None = None
            mail_ok = False

            def rcpt_reply(address: str, response: aiosmtplib.SMTPResponse) -> None:
                # Recorded as it arrives: a refusal stays a refusal if the
                # connection is lost later in the transaction.
                nonlocal last
                if response.code in (aiosmtplib.SMTPStatus.completed, 251):
                    accepted.append(address)
                    return
                last = Reply.parse(response.code, response.message)
                txn.record(address, last, where)

            if _pipelining(smtp):
                # Section 3.1: RSET, MAIL and RCPT may appear anywhere in a
                # group, DATA only last.
                group = [b"RSET"] * reused + [mail, *rcpts, b"DATA"]
                first_rcpt = reused + 1

                def on_reply(index: int, response: aiosmtplib.SMTPResponse) -> None:
                    nonlocal mail_ok
                    if index == reused:
                        mail_ok = response.code == aiosmtplib.SMTPStatus.completed
                    elif mail_ok and first_rcpt <= index < first_rcpt + len(recipients):
                        rcpt_reply(recipients[index - first_rcpt], response)

                replies = await pipeline(smtp, group, timeout, fresh=not reused, on_reply=on_reply)
                mail_reply, data_reply = replies[reused], replies[-1]
            else:
                mail_reply = await smtp.execute_command(mail, timeout=timeout)
                data_reply = None
                if mail_reply.code == aiosmtplib.SMTPStatus.completed:
                    for address, command in zip(recipients, rcpts, strict=True):
                        rcpt_reply(address, await smtp.execute_command(command, timeout=timeout))
            if mail_reply.code != aiosmtplib.SMTPStatus.completed:
                raise remote_failure(mail_reply.code, mail_reply.message)
            if not accepted:
                if data_reply is None:
                    await smtp.rset(timeout=timeout)
                elif data_reply.code == aiosmtplib.SMTPStatus.start_input:
                    # Section 3.1: a server that took DATA with no valid
                    # recipient gets an empty message it will refuse.
                    await _send_body(smtp, b"", cfg)
                assert last is not None
                return last
            if data_reply is None:
                data_reply = await smtp.execute_command(b"DATA", timeout=timeout)
            if data_reply.code // 100 in (2, 3) and data_reply.code != 354:
                # Not an answer DATA can have: a confused (or out of step)
                # server; never take it as the message's fate.
                raise errors.TemporaryFailure(f"unexpected reply to DATA: {data_reply.code}")
            try:
                if data_reply.code != aiosmtplib.SMTPStatus.start_input:
                    raise aiosmtplib.SMTPDataError(data_reply.code, data_reply.message)
                response = await _send_body(smtp, body, cfg)
            except aiosmtplib.SMTPDataError as exc:
                reply = Reply.parse(exc.code, exc.message)
                if reply.temporary:
                    # A 4xx to DATA: this host failed the transaction; the
                    # recipients stay open for the next candidate.
                    raise remote_failure(exc.code, exc.message) from exc
                for address in accepted:
                    txn.record(address, reply, where)
                return reply
        reply = Reply.parse(response.code, response.message)
        for address in accepted:
            txn.record(address, reply, where)
        return reply

    def _host_done(self, route: Route, envelope: Envelope, result: HostResult) -> HostResult:
        """Count and log one host tried."""
        cand = result.candidate
        label = _host_label(route, cand)
        failure = result.failure
        if isinstance(failure, TlsPolicyFailure):
            outcome = "tls_failed"
            self._metrics.tls_failures.labels(route.name, label, failure.reason.value).inc()
        elif isinstance(failure, errors.HostUnreachable):
            outcome = "unreachable"
        elif isinstance(failure, errors.AuthFailed):
            outcome = "auth_failed"
        elif isinstance(failure, errors.DnsTemporary | errors.RouteMisconfigured) or (
            result.ip is None and failure is not None
        ):
            outcome = "dns_failed"
        elif result.reply is not None and result.reply.code // 100 == 2:
            outcome = "delivered"
        elif result.reply is not None and result.reply.permanent:
            outcome = "bounced"
        else:
            outcome = "deferred"
        self._metrics.delivery_attempts.labels(route.name, label, outcome).inc()
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
        if failure is not None and failure.detail != (reply.text if reply else ""):
            fields["detail"] = failure.detail
        if isinstance(failure, TlsPolicyFailure):
            advice = tls_advice(
                failure.reason, cand.host.strip("[]"), failure.certificate, route.name,
                failure.detail, via_mx=cand.via_mx or "",
            )  # fmt: skip
            fields["tls_check"] = failure.reason.value
            fields["diagnosis"] = advice.one_line()
        events.log("attempt", **fields)
        return result

    # --- probe (relay test-tls) -------------------------------------------

    async def probe(self, route: Route, candidates: Sequence[Candidate]) -> list[ProbeResult]:
        """Connect to every address of every candidate as delivery would; send no mail."""
        return await probe_hosts(route, candidates, self._addresses, self._config)


def _interchangeable(one: Candidate, other: Candidate) -> bool:
    """Either may go first: hosts of one table, other than two MX hosts of
    the same domain (RFC 5321 section 5.1 orders those by preference)."""
    same_domain = one.via_mx is not None and one.configured == other.configured
    return one.table == other.table and not same_domain


def _hop(route: Route, candidate: Candidate, ip: str) -> HopKey:
    """The pool's key for ``candidate`` at ``ip``: SNI and verification use its name."""
    return (ip, candidate.port, route.tls, candidate.host.strip("[]"), route.auth)


# RFC 5321 section 4.5.2: a line starting with "." gets one more.
_LEADING_DOT = re.compile(rb"^\.", re.MULTILINE)


def _pipelining(smtp: aiosmtplib.SMTP) -> bool:
    return smtp.supports_extension("pipelining")


async def _send_body(smtp: aiosmtplib.SMTP, body: Body, cfg: Config) -> aiosmtplib.SMTPResponse:
    """After the 354: the body and the final dot; the 250 reply to the dot.

    aiosmtplib's data() waits for 354 and for the reply to the dot with one
    timeout and cannot tell us which wait failed, and copies the body
    three times. Here the 354 waited ``command_timeout``; the reply to the
    dot waits ``data_timeout`` (RFC 5321 section 4.5.3.2.6: 10 minutes).
    Once the dot is written a dropped connection or a timeout raises
    :class:`errors.ReplyLost`: the next hop may have taken the message.
    ``body`` is CRLF-only (:func:`check_body`), so dot-stuffing is all the
    encoding it needs. A body in a file goes in pieces (:func:`_send_file`).
    """
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if isinstance(body, bytes):
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"
        protocol.write(_LEADING_DOT.sub(b"..", body) + b".\r\n")
        # read_response marks the reply as expected before it first yields,
        # so the reply cannot arrive unseen between the write and the wait.
        waiting = protocol.read_response(timeout=cfg.delivery.data_timeout)
    else:
        # Waiting for the reply from the start marks it as expected, so a
        # reply sent early (before our dot) is not dropped as unsolicited.
        reply = asyncio.ensure_future(protocol.read_response(timeout=None))
        try:
            await _send_file(protocol, body, reply, cfg.delivery.command_timeout)
        except BaseException:
            await _forget(reply)
            raise
        waiting = reply_within(reply, cfg.delivery.data_timeout)
    try:
        response = await waiting
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
        smtp.close()
        raise errors.ReplyLost(f"after the final dot: {exc}") from exc
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _send_file(
    protocol: SMTPProtocol,
    body: BodyFile,
    reply: asyncio.Future[aiosmtplib.SMTPResponse],
    limit: float,
) -> None:
    """Write ``body`` piece by piece, dot-stuffed, then the final dot.

    Each piece waits until the transport has room again (its buffer below
    the high-water mark), for at most ``limit`` seconds, so a slow next hop
    costs one piece of memory, not the body. Raises aiosmtplib's
    exceptions: before the dot, the next hop cannot have the message.
    """
    loop = asyncio.get_running_loop()
    offset = 0
    line_start = True
    while offset < body.size:
        piece = await loop.run_in_executor(None, _piece, body, offset, SEND_CHUNK)
        if not piece:
            raise errors.TemporaryFailure("spooled body shrank during delivery")
        offset += len(piece)
        if line_start and piece.startswith(b"."):
            protocol.write(b".")
        # Pieces never split a CRLF: every "CRLF ." is inside one piece.
        protocol.write(piece.replace(b"\r\n.", b"\r\n.."))
        line_start = piece.endswith(b"\r\n")
        del piece
        await _drained(protocol, reply, limit)
    # As data(): a body not ending in CRLF gets one before the dot.
    protocol.write(b".\r\n" if line_start else b"\r\n.\r\n")


async def _drained(
    protocol: SMTPProtocol, reply: asyncio.Future[aiosmtplib.SMTPResponse], limit: float
) -> None:
    """Wait until the transport takes more; raise if the next hop answered or left early."""
    if reply.done():
        early = reply.result()  # raises SMTPServerDisconnected when it went away
        code = early.code if early.code // 100 in (4, 5) else 451
        raise aiosmtplib.SMTPResponseException(
            code, f"reply before the end of the data: {early.message}"
        )
    try:
        async with asyncio.timeout(limit):
            # FlowControlMixin's drain, the one StreamWriter.drain() uses.
            await protocol._drain_helper()
    except TimeoutError as exc:
        raise aiosmtplib.SMTPTimeoutError("Timed out sending the message") from exc


async def _forget(reply: asyncio.Future[aiosmtplib.SMTPResponse]) -> None:
    """Stop waiting for a reply (the transaction failed before the dot)."""
    if not reply.done():
        reply.cancel()
        await asyncio.gather(reply, return_exceptions=True)
    elif not reply.cancelled():
        reply.exception()  # retrieved: no "never retrieved" log


def _mail_options(smtp: aiosmtplib.SMTP, envelope: Envelope, size: int) -> list[str]:
    """ESMTP MAIL parameters the envelope asks for and the server offers."""
    options: list[str] = []
    if smtp.supports_extension("size"):
        options.append(f"SIZE={size}")  # RFC 1870
    if envelope.body_8bit and smtp.supports_extension("8bitmime"):
        options.append("BODY=8BITMIME")  # RFC 6152
    if envelope.smtputf8:
        if smtp.supports_extension("smtputf8"):
            options.append("SMTPUTF8")  # RFC 6531
        elif not _ascii_envelope(envelope):
            # RFC 6531 section 3.4: a non-ASCII address cannot be downgraded.
            raise errors.PermanentFailure("next hop lacks SMTPUTF8", errors.SMTPUTF8_UNSUPPORTED)
    return options


def _ascii_envelope(envelope: Envelope) -> bool:
    addresses = [envelope.mail_from, *(r.address for r in envelope.recipients)]
    return all(a.isascii() for a in addresses)


__all__ = [
    "Attempt",
    "Deliverer",
    "HostResult",
    "ProbeResult",
    "check_any_body",
    "check_body",
    "map_smtp_errors",
]
