"""One mail transaction at one address of one next hop, for a delivery attempt.

A session comes from the pool (answering RSET) or is opened fresh
(:func:`relay.session.open_hop`: STARTTLS per the route's policy, the
opportunistic fallback, AUTH); the transaction carries every recipient
still open (:func:`relay.session.send_mail`); each reply is recorded per
recipient. Opening a session tells host health whether the host is alive
(:func:`relay.health.marks_down`). No SMTP wire code lives here.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from relay import errors, events, health
from relay.attempt import HostResult, RecipientResults, host_label
from relay.config import Config, Route
from relay.envelope import Envelope
from relay.errors import RelayError, Reply
from relay.health import Health
from relay.hop import Hop
from relay.pool import Pool
from relay.routing import Candidate
from relay.session import Session, StaleSession, open_hop, reset, send_mail
from relay.spoolbody import Body


class Handoff:
    """Hands a message to one address of a candidate host: ``to() -> HostResult``."""

    def __init__(self, config: Callable[[], Config], pool: Pool, health: Health) -> None:
        self._config = config
        self._pool = pool
        self._health = health

    async def to(
        self,
        route: Route,
        envelope: Envelope,
        candidate: Candidate,
        ip: str,
        results: RecipientResults,
        body: Body,
        token: object,
    ) -> HostResult | None:
        """One transaction at one address; records into ``results``; never raises RelayError.

        None when the address went down while this attempt waited for one
        of its connection slots: skipped without connecting, so a message
        waits at most one connect timeout behind a host that is down.
        """
        cfg = self._config()
        next_hop = Hop.of(route, candidate, ip, envelope)
        if envelope.tls_optional and next_hop.policy != route.tls:
            # RFC 8689 section 4.2.2: the sender waived the route's TLS checks.
            events.log("tls_required_no", id=envelope.id, route=route.name, host=candidate.host)
        where = f"{candidate.host} [{ip}]"
        session: Session | None = None
        reused = False
        carried = results.next_host()
        async with self._pool.slot(next_hop, lambda: self._config().delivery.max_per_host):
            if not self._health.claim((ip, candidate.port), token):
                results.fail(carried, errors.HostUnreachable(f"{where}: held down"), where)
                return None
            try:
                while True:
                    with self._pool.connecting(next_hop):
                        session, reused = await self._health_checked(
                            route, candidate, ip, token, self._session(next_hop, cfg, envelope.id)
                        )
                    try:
                        reply = await self._transaction(
                            session, envelope, results, body, where, cfg, reused
                        )
                        break
                    except StaleSession:
                        # Closed while pooled, nothing sent: not the host's fault.
                        session.close()
                        session = None
            except RelayError as exc:
                if session is not None:
                    session.close()
                results.fail(carried, exc, where)
                if isinstance(exc, errors.ReplyLost):
                    # The next hop may have the message: no other host gets
                    # it in this attempt (RFC 5321 section 6.1); deferred.
                    results.hold(a for a in carried if results.results[a][-1] is exc)
                return _result(candidate, ip, session, failure=exc, reply=exc.reply)
            except BaseException:
                # Cancelled (shutdown): never pool a session mid-transaction.
                if session is not None:
                    session.close()
                raise
            self._pool.give(session, cfg.delivery.idle_timeout, cfg.delivery.max_per_host)
            return _result(candidate, ip, session, reply=reply, reused=reused)

    async def _transaction(
        self,
        session: Session,
        envelope: Envelope,
        results: RecipientResults,
        body: Body,
        where: str,
        cfg: Config,
        reused: bool,
    ) -> Reply:
        """The recipients still open in one transaction; the reply that sums it up."""

        def refused(address: str, reply: Reply) -> None:
            results.record(address, reply, where)

        sent = await send_mail(
            session, envelope, results.open, body, cfg, reused, on_refused=refused
        )
        for address in sent.accepted:
            results.record(address, sent.reply, where)
            if not sent.dsn and sent.reply.code // 100 == 2:
                # No NOTIFY went with it: relay owes the sender's SUCCESS notice.
                results.relayed.add(address)
        return sent.reply

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
        label = host_label(route, candidate)
        try:
            opened = await opening
        except RelayError as exc:
            if health.marks_down(exc):
                self._health.failed(key, candidate.host, route.name, label, exc, token)
            else:
                # It greeted: a TLS verdict or a 4xx to STARTTLS is not about its life.
                self._health.succeeded(key, candidate.host, route.name, label)
            raise
        self._health.succeeded(key, candidate.host, route.name, label)
        return opened

    async def _session(self, hop: Hop, cfg: Config, qid: str) -> tuple[Session, bool]:
        """A pooled session that answers RSET, or a fresh one; (session, reused)."""
        while (session := self._pool.take(hop, cfg.delivery.idle_timeout)) is not None:
            if session.pipelining:
                # The RSET goes out with the transaction's command group.
                return session, True
            try:
                await reset(session, cfg)
                return session, True
            except RelayError:
                # A dead pooled session is not the host's fault: replace it.
                session.close()
        return await open_hop(hop, cfg, qid), False


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
