"""Delivery over real SMTP to in-process aiosmtpd sinks on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

from relay import errors
from relay.config import direct_route
from relay.errors import Reply
from relay.metrics import Metrics
from relay.routing import Candidate
from tests.support import logs
from tests.support.delivery import (
    BODY,
    OPPORTUNISTIC,
    STRICT,
    addresses,
    candidate,
    deliverer,
    envelope,
    make_config,
    route,
)
from tests.support.sink import Sink

pytestmark = pytest.mark.timeout(60)


async def test_plain_single_host(closing):
    async with Sink() as sink:
        d = deliverer(make_config())
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert attempt.remote["b@x.test"] == "mx1.test [127.0.0.1]"
    (host,) = attempt.hosts
    assert host.ip == "127.0.0.1" and host.tls_version is None and host.failure is None
    (msg,) = sink.messages
    assert msg.data == BODY and msg.rcpt_tos == ["b@x.test"] and msg.tls is None
    assert msg.mail_from == "a@src.test"


async def test_tls_single_host_verified(closing, pki):
    async with Sink(tls_context=pki.server_context("mx1.test")) as sink:
        metrics = Metrics()
        d = deliverer(make_config(pki.ca_file), metrics=metrics)
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(STRICT), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    (host,) = attempt.hosts
    assert host.tls_version in ("TLSv1.2", "TLSv1.3") and host.cipher
    assert host.verified and host.peer_subject
    assert sink.messages[0].tls == host.tls_version
    assert sink.messages[0].data == BODY
    sample = metrics.registry.get_sample_value(
        "relay_delivery_attempts_total", {"route": "r1", "host": "mx1.test", "result": "delivered"}
    )
    assert sample == 1


async def test_null_sender_goes_out_as_empty_reverse_path(closing):
    async with Sink() as sink:
        d = deliverer(make_config())
        closing(d)
        env = envelope("")
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert [line.split(" SIZE=")[0] for line in sink.lines if line.startswith("MAIL")] == [
        "MAIL FROM:<>"
    ]


@pytest.mark.parametrize(
    "body",
    [
        b"Subject: dots\r\n\r\n.\r\n",
        b"Subject: dots\r\n\r\n..\r\n...\r\n. x\r\n.\r\n.end",
        b"Subject: dots\r\n\r\nline\r\n.\r\n\r\n.\r\n",
        # The first line is a line too (a body with no header section).
        b".first\r\n..\r\n",
    ],
)
async def test_dot_stuffing_arrives_intact(closing, body):
    async with Sink() as sink:
        d = deliverer(make_config())
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), body, [candidate("mx1.test", sink.port)]
        )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    # aiosmtplib appends CRLF to a body that lacks one (see check_body).
    expected = body if body.endswith(b"\r\n") else body + b"\r\n"
    assert sink.messages[0].data == expected


@pytest.mark.parametrize("body", [b"a\nb\r\n", b"a\rb\r\n", b"a\r\n\n", b"trailing\r"])
async def test_bare_cr_or_lf_is_refused_not_sent(closing, body):
    async with Sink() as sink:
        d = deliverer(make_config())
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), body, [candidate("mx1.test", sink.port)]
        )
    assert sink.connections == 0
    assert attempt.outcome("b@x.test") == errors.BOUNCED
    assert attempt.last("b@x.test") == errors.BARE_LINE_ENDING


async def test_451_at_first_host_then_250_at_second(closing):
    async with Sink(replies={"MAIL": "451 4.3.0 try later"}) as one, Sink() as two:
        d = deliverer(make_config())
        closing(d)
        env = envelope()
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
    first, second = attempt.results["b@x.test"]
    assert isinstance(first, errors.RemoteTemporary) and first.reply.code == 451
    assert isinstance(second, Reply) and second.code == 250
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert attempt.remote["b@x.test"] == "mx2.test [127.0.0.1]"
    assert [h.failure is None for h in attempt.hosts] == [False, True]
    assert len(two.messages) == 1 and not one.messages


async def test_550_for_one_recipient_other_delivered(closing):
    async with Sink(replies={"RCPT bad@x.test": "550 5.1.1 no such user"}) as one, Sink() as two:
        d = deliverer(make_config())
        closing(d)
        env = envelope("a@src.test", "good@x.test", "bad@x.test")
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
    assert attempt.outcome("good@x.test") == errors.DELIVERED
    assert attempt.outcome("bad@x.test") == errors.BOUNCED
    assert attempt.last("bad@x.test") == Reply(550, (5, 1, 1), "no such user")
    # A 5xx to RCPT is final: the second host never sees the recipient.
    assert len(attempt.results["bad@x.test"]) == 1 and two.connections == 0
    assert one.messages[0].rcpt_tos == ["good@x.test"]


async def test_5xx_to_mail_is_final_for_all(closing):
    async with Sink(replies={"MAIL": "554 5.7.1 go away"}) as one, Sink() as two:
        d = deliverer(make_config())
        closing(d)
        env = envelope("a@src.test", "b@x.test", "c@x.test")
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
    assert attempt.outcome("b@x.test") == attempt.outcome("c@x.test") == errors.BOUNCED
    assert two.connections == 0


async def test_4xx_to_data_moves_on_5xx_to_data_bounces(closing):
    async with Sink(replies={"DATA": "452 4.3.1 full"}) as one, Sink() as two:
        d = deliverer(make_config())
        closing(d)
        env = envelope()
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
        assert attempt.outcome("b@x.test") == errors.DELIVERED
        assert len(attempt.results["b@x.test"]) == 2
    async with Sink(replies={"DATA": "554 5.6.0 content refused"}) as one, Sink() as two:
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
    assert attempt.outcome("b@x.test") == errors.BOUNCED
    assert two.connections == 0


async def test_4xx_greeting_and_refused_connection_move_on(closing):
    async with Sink(replies={"GREETING": "421 4.3.2 busy"}) as busy, Sink() as good:
        d = deliverer(make_config())
        closing(d)
        env = envelope()
        # Port 1 on loopback: nothing listens, the connection is refused.
        cands = [
            candidate("mx1.test", 1),
            candidate("mx1.test", busy.port),
            candidate("mx2.test", good.port),
        ]
        attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    kinds = [type(h.failure) for h in attempt.hosts]
    assert kinds == [errors.HostUnreachable, errors.HostUnreachable, type(None)]


async def test_dropped_connection_defers(closing):
    async with Sink(replies={"RCPT": "drop"}) as sink:
        d = deliverer(make_config())
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    assert isinstance(attempt.results["b@x.test"][0], errors.ConnectionLost)


async def test_no_candidates_defers(closing):
    d = deliverer(make_config())
    closing(d)
    env = envelope()
    attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, [])
    assert attempt.outcome("b@x.test") == errors.DEFERRED and attempt.hosts == ()


async def test_max_addresses_caps_the_attempt(closing):
    # 127.0.0.2 and .3 are loopback too, but the sink only listens on .1.
    async with Sink() as sink:
        d = deliverer(
            make_config(max_addresses=2),
            {"mx1.test": ["127.0.0.2", "127.0.0.3", "127.0.0.1"]},
        )
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    assert [h.ip for h in attempt.hosts] == ["127.0.0.2", "127.0.0.3"]
    assert attempt.outcome("b@x.test") == errors.DEFERRED and sink.connections == 0


async def test_route_name_that_does_not_resolve_defers_and_counts(closing):
    metrics = Metrics()
    d = deliverer(make_config(), {}, metrics)
    closing(d)
    env = envelope()
    attempt = await d.deliver(
        route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("typo.test", 25)]
    )
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    assert isinstance(attempt.results["b@x.test"][0], errors.RouteMisconfigured)
    labels = {"route": "r1", "host": "typo.test"}
    assert metrics.registry.get_sample_value("relay_route_dns_errors_total", labels) == 1


async def test_smtputf8_and_8bitmime_options_when_asked(closing):
    async with Sink() as sink:
        d = deliverer(make_config())
        closing(d)
        env = envelope("ä@src.test", "b@x.test")
        env.smtputf8 = env.body_8bit = True
        body = "Subject: ü\r\n\r\nüber\r\n".encode()
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), body, [candidate("mx1.test", sink.port)]
        )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    (msg,) = sink.messages
    assert {"SMTPUTF8", "BODY=8BITMIME", f"SIZE={len(body)}"} <= set(msg.mail_options)
    assert msg.mail_from == "ä@src.test" and msg.data == body


async def test_smtputf8_address_to_server_without_it_bounces(closing):
    async with Sink(smtputf8=False) as sink:
        d = deliverer(make_config())
        closing(d)
        env = envelope("ä@src.test", "b@x.test")
        env.smtputf8 = True
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    assert attempt.outcome("b@x.test") == errors.BOUNCED
    assert attempt.last("b@x.test") == errors.SMTPUTF8_UNSUPPORTED


async def test_attempt_is_logged_once_per_host(closing):
    with logs.captured(logs.records) as records:
        async with Sink(replies={"MAIL": "451 4.3.0 later"}) as one, Sink() as two:
            d = deliverer(make_config())
            closing(d)
            env = envelope(qid="Q42")
            cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
            await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
    lines = [r.fields for r in records if r.getMessage() == "attempt"]  # type: ignore[attr-defined]
    assert [(f["host"], f["reply"][:3]) for f in lines] == [
        ("mx1.test", "451"),
        ("mx2.test", "250"),
    ]
    assert all(f["id"] == "Q42" and f["route"] == "r1" and f["ip"] == "127.0.0.1" for f in lines)
    assert {"port", "tls", "verified"} <= set(lines[0])


async def test_concurrent_attempts_share_a_route(closing):
    async with Sink() as sink:
        d = deliverer(make_config(max_per_host=2))
        closing(d)
        envs = [envelope(qid=f"Q{i}") for i in range(8)]
        cands = [candidate("mx1.test", sink.port)]
        attempts = await asyncio.gather(
            *(d.deliver(route(OPPORTUNISTIC), e, addresses(e), BODY, cands) for e in envs)
        )
    assert all(a.outcome("b@x.test") == errors.DELIVERED for a in attempts)
    assert len(sink.messages) == 8
    # max_per_host bounds the connections open at once, and they are reused.
    assert sink.connections <= 2


async def test_4xx_to_rcpt_tries_the_next_host_for_that_recipient(closing):
    async with Sink(replies={"RCPT c@x.test": "450 4.2.1 mailbox busy"}) as one, Sink() as two:
        d = deliverer(make_config())
        closing(d)
        env = envelope("a@src.test", "b@x.test", "c@x.test")
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
    assert attempt.outcome("b@x.test") == attempt.outcome("c@x.test") == errors.DELIVERED
    assert len(attempt.results["b@x.test"]) == 1
    first, second = attempt.results["c@x.test"]
    assert isinstance(first, Reply) and first.code == 450 and second.code == 250
    assert one.messages[0].rcpt_tos == ["b@x.test"] and two.messages[0].rcpt_tos == ["c@x.test"]


async def test_implicit_route_dns_failures(closing):
    metrics = Metrics()
    d = deliverer(make_config(), {}, metrics)
    closing(d)
    direct = direct_route("gone.test")
    env = envelope()
    # The domain's own name (implicit MX) does not exist: permanent.
    own = Candidate(host="gone.test", port=25, via_mx="gone.test", implicit=True)
    attempt = await d.deliver(direct, env, addresses(env), BODY, [own])
    assert attempt.outcome("b@x.test") == errors.BOUNCED
    # An MX target that does not resolve is that host's problem: defer.
    target = Candidate(host="mx.elsewhere.test", port=25, via_mx="gone.test", implicit=True)
    attempt = await d.deliver(direct, env, addresses(env), BODY, [target])
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    samples = {
        s.labels["host"]
        for m in metrics.registry.collect()
        if m.name == "relay_delivery_attempts"
        for s in m.samples
    }
    assert samples == {"(mx)"}  # no host names from the internet in labels
