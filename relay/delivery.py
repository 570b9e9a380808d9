"""One delivery attempt over a route's candidates (RFC 5321, RFC 3207).

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
every host held down, every recipient is deferred at once; when one of
them is being probed by another attempt, the Attempt carries that probe
(``Attempt.probes``) so the scheduler can retry when it ends instead.

At-least-once: the scheduler persists per-recipient state after
``deliver`` returns. A duplicate can come from a crash between the next
hop's 250 to DATA and that state write, or from a reply lost after the
final dot (waited for ``data_timeout``): those recipients are deferred and
not sent to another host in the same attempt (RFC 5321 section 6.1).

The outbound side: this module (planning and walking the candidates),
:mod:`relay.handoff` (one transaction at one address), :mod:`relay.attempt`
(the results, metrics and the attempt log), :mod:`relay.session` (the SMTP
wire, the only module that imports aiosmtplib), :mod:`relay.pool` (session
reuse, per-hop limits) and :mod:`relay.probe` (``relay test-tls``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
from collections.abc import Callable, Sequence

from relay import errors, events, routing
from relay.attempt import Attempt, AttemptRecorder, HostResult, RecipientResults, host_label
from relay.config import Config, Route
from relay.content import has_bare_line_ending
from relay.dns import Resolver
from relay.envelope import Envelope
from relay.errors import RelayError
from relay.handoff import Handoff
from relay.health import Health
from relay.hop import Hop
from relay.metrics import Metrics
from relay.mtasts import MtaSts
from relay.pool import Pool
from relay.probe import ProbeResult, probe_hosts
from relay.routing import Candidate
from relay.session import SEND_CHUNK, read_piece
from relay.spoolbody import Body, BodyFile

# --- the body ---------------------------------------------------------------


def check_body(body: bytes) -> None:
    """Refuse to send a body with a bare CR or LF (no SMTP smuggling downstream).

    The wire (:func:`relay.session.send_mail`) only dot-stuffs lines
    starting with "." (RFC 5321 section 4.5.2) and ends the body with CRLF
    and ".\r\n". Inbound refuses bare CR/LF, so spooled bodies are
    CRLF-only and pass through byte for byte; should one ever not be, we
    refuse rather than pass a bare line ending on to the next hop.
    """
    if has_bare_line_ending(body):
        raise errors.PermanentFailure(
            "spooled body contains a bare CR or LF", errors.BARE_LINE_ENDING
        )


def scan_body_file(body: BodyFile, chunk: int = SEND_CHUNK) -> bool:
    """True when the file holds a bare CR or LF (blocking: run it in a thread).

    :func:`check_body` per piece; pieces never split a CRLF, so one has a
    bare CR or LF exactly when the file has.
    """
    if body.bare_line_ending is None:
        bare = False
        offset = 0
        while offset < body.size and not bare:
            data = read_piece(body, offset, chunk)
            if not data:
                break  # the file shrank: cannot happen in the spool
            offset += len(data)
            bare = has_bare_line_ending(data)
        body.bare_line_ending = bare
    return body.bare_line_ending


async def check_any_body(body: Body) -> None:
    """:func:`check_body` for a body in memory or in a file."""
    if isinstance(body, bytes):
        check_body(body)
    elif await asyncio.to_thread(scan_body_file, body):
        raise errors.PermanentFailure(
            "spooled body contains a bare CR or LF", errors.BARE_LINE_ENDING
        )


# --- the deliverer ----------------------------------------------------------


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
        # Reserved for address-order jitter; candidate order comes from routing.
        self._rng = rng or random.Random()
        self._pool = Pool()
        #: Which next hops are held down; shared by every attempt (relay.health).
        self.health = Health(config, metrics)
        self._handoff = Handoff(config, self._pool, self.health)
        self._recorder = AttemptRecorder(config, metrics)
        #: MTA-STS policies of recipient domains (relay.mtasts), cached in the spool.
        self.mta_sts = MtaSts(config, metrics)

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
            failure = planned.failure if not planned.candidates else None
            if failure is not None:
                # Also when every host is held down: deferred without connecting,
                # unless the caller waits for the probes running (relay.cycle).
                results = {address: (failure,) for address in recipients}
                probes = tuple(self.health.probe_ended(planned.probing))
                return Attempt(route.name, (), results, {}, probes=probes)
            candidates, token = planned.candidates, planned.token
            if planned.sts_enforced and not route.tls_defers:
                # RFC 8461 section 5: an enforce policy's failure is never
                # permanent before the policy is looked up again (next attempt).
                route = dataclasses.replace(route, on_tls_failure="defer")
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
        results = RecipientResults(recipients)
        hosts: list[HostResult] = []
        try:
            await check_any_body(body)
        except RelayError as exc:
            events.error("refused_body", id=envelope.id, route=route.name, error=exc.detail)
            for address in recipients:
                results.record(address, exc, "")
            return self._recorder.attempt(route, envelope, hosts, results)
        budget = self._config().delivery.max_addresses
        untried = 0
        candidates = list(candidates)
        for index in range(len(candidates)):
            await self._around_jam(route, candidates, index)
            candidate = candidates[index]
            if not results.open:
                break
            if budget <= 0:
                untried = len(candidates) - index
                break
            try:
                ips = await self._candidate_addresses(route, candidate, envelope.id)
            except RelayError as exc:
                hosts.append(
                    self._recorder.host_done(route, envelope, HostResult(candidate, failure=exc))
                )
                results.fail(results.next_host(), exc, candidate.host)
                continue
            # Keep one address for each candidate after this one, so a
            # primary with many addresses cannot starve the secondaries.
            cap = max(1, budget - (len(candidates) - index - 1))
            for ip in ips[:cap]:
                if not results.open:
                    break
                budget -= 1
                result = await self._handoff.to(
                    route, envelope, candidate, ip, results, body, token
                )
                if result is None:
                    budget += 1  # held down meanwhile: skipped, not tried
                    continue
                hosts.append(self._recorder.host_done(route, envelope, result))
        if untried and results.open:
            self._recorder.not_tried(route, envelope, results, untried)
        return self._recorder.attempt(route, envelope, hosts, results)

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
            self._pool.jammed(Hop.of(route, candidate, ip)) for ip in candidate.addresses
        )

    async def _plan(self, route: Route, envelope: Envelope) -> routing.Plan:
        """The route's candidates with their addresses; without any, its ``failure``
        (a DNS failure, or every host held down) says why."""
        plan = await routing.plan(route, self._resolver, self._rng, self.health, self.mta_sts)
        for failure in plan.dns_failures:
            if isinstance(failure.error, errors.RouteMisconfigured):
                self._recorder.route_dns_error(
                    route, failure.configured, failure.configured, failure.error, envelope.id
                )
            else:
                events.log(
                    "dns_failure", id=envelope.id, route=route.name,
                    host=failure.configured, error=failure.error.detail,
                )  # fmt: skip
        if not plan.candidates and plan.failure is not None:
            self.health.release(plan.token)
        return plan

    async def _candidate_addresses(
        self, route: Route, candidate: Candidate, qid: str | None = None
    ) -> list[str]:
        """The planned addresses of ``candidate`` (looked up now if it came unplanned)."""
        if candidate.error is not None:
            if isinstance(candidate.error, errors.RouteMisconfigured):
                label = host_label(route, candidate)
                self._recorder.route_dns_error(route, label, candidate.host, candidate.error, qid)
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
            self._recorder.route_dns_error(
                route, host_label(route, candidate), candidate.host, exc, qid
            )
            raise

    # --- probe (relay test-tls) -------------------------------------------

    async def probe(self, route: Route, candidates: Sequence[Candidate]) -> list[ProbeResult]:
        """Connect to every address of every candidate as delivery would; send no mail."""
        return await probe_hosts(route, candidates, self._addresses, self._config)


def _interchangeable(one: Candidate, other: Candidate) -> bool:
    """Either may go first: hosts of one table, other than two MX hosts of
    the same domain (RFC 5321 section 5.1 orders those by preference)."""
    same_domain = one.via_mx is not None and one.configured == other.configured
    return one.table == other.table and not same_domain


__all__ = [
    "Deliverer",
    "check_any_body",
    "check_body",
]
