"""The scheduler against a real SMTP peer: an in-process aiosmtpd sink on 127.0.0.1.

The deliverer here is a minimal stand-in (plain SMTP, one loopback host,
no TLS, no DNS) until the lead connects relay.delivery; the point is the
scheduler's side: real replies in, spool state and a real DSN out.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

import aiosmtplib
import pytest
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relay.attempt import Attempt, HostResult
from relay.config import Host, Route, Rule
from relay.envelope import Envelope, RcptState
from relay.errors import ConnectionLost, HostUnreachable, RelayError, Reply
from relay.routing import Candidate
from tests.support.queue import harness, make_config, running, settle, spool_message


@dataclass
class Sink:
    """Accepts everything except the addresses in ``refuse`` (550) and ``later`` (451)."""

    refuse: set[str] = field(default_factory=set)
    later: set[str] = field(default_factory=set)
    messages: list[tuple[str, list[str], bytes]] = field(default_factory=list)

    async def handle_RCPT(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, address: str, options: list
    ) -> str:
        if address in self.refuse:
            return "550 5.1.1 No such user here"
        if address in self.later:
            return "451 4.2.0 Mailbox busy, try later"
        envelope.rcpt_tos.append(address)  # aiosmtpd: handle_RCPT must append
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        content = envelope.original_content or b""
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), content))
        return "250 2.0.0 Ok: queued"


class LoopbackDeliverer:
    """Plain SMTP to the route's first host, which must be 127.0.0.1."""

    async def deliver(
        self, route: Route, envelope: Envelope, recipients: Sequence[str], body: bytes
    ) -> Attempt:
        host = route.primary[0]
        assert host.name == "127.0.0.1", "tests never leave loopback"
        candidate = Candidate(host.name, host.port)
        where = f"{host.name} [{host.name}]"
        results: dict[str, tuple[Reply | RelayError, ...]] = {}
        failure: RelayError | None = None
        try:
            async with aiosmtplib.SMTP(
                hostname=host.name, port=host.port, timeout=5, start_tls=False
            ) as smtp:
                refused, _ = await smtp.sendmail(envelope.mail_from, list(recipients), body)
            for address in recipients:
                if address in refused:
                    code, text = refused[address]
                    results[address] = (Reply.parse(code, text),)
                else:
                    results[address] = (Reply(250, (2, 0, 0), "Ok: queued"),)
        except aiosmtplib.SMTPRecipientsRefused as exc:
            for err in exc.recipients:
                results[err.recipient] = (Reply.parse(err.code, err.message),)
        except aiosmtplib.SMTPConnectError as exc:
            failure = HostUnreachable(str(exc))
        except aiosmtplib.SMTPException as exc:
            failure = ConnectionLost(str(exc))
        if failure is not None:
            results = {address: (failure,) for address in recipients}
        hosts = (HostResult(candidate, ip=host.name, failure=failure),)
        return Attempt(route.name, hosts, results, {a: where for a in recipients})


@pytest.fixture
async def sink() -> AsyncIterator[tuple[Sink, int]]:
    handler = Sink()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: SMTP(handler), "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield handler, port
    finally:
        server.close()
        await server.wait_closed()


async def test_real_replies_deliver_defer_and_bounce(tmp_path, sink) -> None:
    handler, port = sink
    handler.refuse.add("carol@example.com")
    handler.later.add("dan@example.com")
    cfg = make_config(
        tmp_path / "spool",
        routes=[Route("Sink", (Host("127.0.0.1", port),))],
        rules=[Rule(("*",), "Sink")],
        bounce_route="Sink",
    )
    h = harness(tmp_path, LoopbackDeliverer(), cfg)
    env = spool_message(h.spool, ["bob@example.com", "carol@example.com", "dan@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)

    # bob delivered once, dan deferred (still pending), carol bounced to alice.
    original = [m for m in handler.messages if m[0] == "alice@sender.test"]
    assert [m[1] for m in original] == [["bob@example.com"]]
    (stored,) = h.spooled()
    states = {r.address: r.state for r in stored.recipients}
    assert states == {
        "bob@example.com": RcptState.DELIVERED,
        "carol@example.com": RcptState.BOUNCED,
        "dan@example.com": RcptState.PENDING,
    }
    assert str(stored.recipients[2].last_reply) == "451 4.2.0 Mailbox busy, try later"
    (dsn,) = [m for m in handler.messages if m[0] == "<>"]  # aiosmtpd's null path
    assert dsn[1] == ["alice@sender.test"]
    report = email.message_from_bytes(dsn[2], policy=email.policy.default)
    status = [p for p in report.walk() if p.get_content_type() == "message/delivery-status"]
    blocks = status[0].get_payload()
    assert [str(b["Final-Recipient"]) for b in blocks[1:]] == ["rfc822; carol@example.com"]
    assert str(blocks[1]["Diagnostic-Code"]) == "smtp; 550 5.1.1 No such user here"
