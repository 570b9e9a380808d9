"""Bounces over the whole path: TLS-policy failures, remote replies, expiry,
partial delivery across a restart, the null sender, and the metrics they leave.

Every DSN travels like any message: through the rules to the sender
domain's MX (found through dnsmasq) and arrives at that sink, where it is
parsed with the email package.
"""

from __future__ import annotations

import asyncio
import re

import pytest

from relay.envelope import RcptState
from relay.errors import TLS_FAILURE_OPTION, TlsFailure
from tests.support import configs
from tests.support.hosts import closed_port
from tests.support.integ import (
    BODY,
    SENDER,
    InProcessRelay,
    dsn_parts,
    idle,
    integration_toml,
)
from tests.support.pki import Pki
from tests.support.queue import Clock
from tests.support.sink import Sink
from tests.support.wait import until

RULES = configs.rule("Corp", "@corp.test") + configs.rule("Senders", "@sender.test")
HOSTS = {"mx1.corp.test": ["127.0.0.1"], "mx.sender.test": ["127.0.0.1"]}
MX = {"sender.test": [(10, "mx.sender.test")]}


def senders_route(dsn_sink: Sink) -> str:
    # The sender domain's MX hosts, by MX lookup, on the sink's port.
    return configs.route("Senders", "sender.test", dsn_sink.port, mx_lookup=True)


def _mails(sink: Sink) -> int:
    return sum(line.startswith("MAIL") for line in sink.lines)


# --- TLS policy ---------------------------------------------------------------

ON = {"require_tls": True, "require_ca_signed": True, "validate_hostname": True}
TLS_ONLY = {"require_tls": True, "require_ca_signed": False, "validate_hostname": False}
CA_ONLY = {"require_tls": True, "require_ca_signed": True, "validate_hostname": False}
OFF = {"require_tls": False, "require_ca_signed": False, "validate_hostname": False}

#: failure, how the sink's certificate is made (None: no STARTTLS), the
#: route's options with the failing check on, and with it off.
TLS_CASES = [
    (TlsFailure.NO_STARTTLS, None, TLS_ONLY, OFF),
    (TlsFailure.UNTRUSTED_CA, {"untrusted": True}, CA_ONLY, TLS_ONLY),
    (TlsFailure.HOSTNAME_MISMATCH, {"names": ("other.test",)}, ON, CA_ONLY),
    (TlsFailure.EXPIRED, {"expired": True}, CA_ONLY, TLS_ONLY),
]
TLS_IDS = [case[0].value for case in TLS_CASES]

#: What the sender reads about the host, and what the postmaster's diagnosis
#: says with the facts of the sink's real certificate.
TLS_WORDS = {
    TlsFailure.NO_STARTTLS: (
        "it does not support encrypted connections",
        r"mx1\.corp\.test does not offer STARTTLS; fix: enable STARTTLS on mx1\.corp\.test",
    ),
    TlsFailure.UNTRUSTED_CA: (
        "its security certificate is not issued by a trusted authority",
        r'is issued by "[^"]*untrusted test CA[^"]*", a CA this relay does not trust; '
        r"fix: install a certificate issued by a trusted CA on mx1\.corp\.test; "
        r"or, if that is your private CA, add its certificate to \[tls\] ca_file",
    ),
    TlsFailure.HOSTNAME_MISMATCH: (
        "its security certificate is for a different name",
        r"does not name mx1\.corp\.test; it names: other\.test; "
        r"fix: use one of these as the route host: other\.test",
    ),
    TlsFailure.EXPIRED: (
        "its security certificate has expired",
        r"expired on \d{4}-\d\d-\d\d \d\d:\d\d UTC \(valid \d{4}-\d\d-\d\d \d\d:\d\d UTC "
        r"to \d{4}-\d\d-\d\d \d\d:\d\d UTC\); fix: renew the certificate on mx1\.corp\.test",
    ),
}


def _tls_sink(pki: Pki, cert: dict | None) -> Sink:
    if cert is None:
        return Sink()
    names = cert.get("names", ("mx1.corp.test",))
    options = {k: v for k, v in cert.items() if k != "names"}
    return Sink(tls_context=pki.server_context(*names, **options))


@pytest.mark.parametrize(("failure", "cert", "on", "off"), TLS_CASES, ids=TLS_IDS)
async def test_tls_failure_bounces_at_once(tmp_path, dnsmasq, dsn_sink, failure, cert, on, off):
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with _tls_sink(pki, cert) as failing:
        routes = configs.route("Corp", "mx1.corp.test", failing.port, **on)
        routes += senders_route(dsn_sink)
        toml = integration_toml(tmp_path, server, routes, RULES, ca_file=pki.ca_file)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: dsn_sink.messages)
            assert relay.spooled() == []
            assert relay.sample("relay_bounces_total", reason="tls_policy") == 1
            assert relay.sample("relay_tls_failures_total", route="Corp", host="mx1.corp.test",
                                reason=failure.value) == 1  # fmt: skip
            # Bounced at once: one attempt, never deferred.
            assert relay.sample("relay_recipients_total", route="Corp", outcome="deferred") == 0
        assert failing.messages == []
        assert _mails(failing) == 0
    [dsn] = dsn_sink.messages
    assert dsn.mail_from == "<>"  # aiosmtpd keeps the null path as written
    assert dsn.rcpt_tos == [SENDER]
    message, human, recipients = dsn_parts(dsn.data)
    assert message["To"] == SENDER
    [fields] = recipients
    assert fields["final-recipient"] == "rfc822; bob@corp.test"
    assert fields["action"] == "failed"
    expected = "5.7.4" if failure is TlsFailure.NO_STARTTLS else "5.7.5"
    assert fields["status"] == expected
    # The host is named (RFC 3464 section 2.3.5), though it sent no reply.
    assert fields["remote-mta"] == "dns; mx1.corp.test"
    assert fields["diagnostic-code"].startswith("X-Relay; ")
    sender_words, diagnosis = TLS_WORDS[failure]
    # The sender reads the host and what happened in plain words ...
    assert f"mx1.corp.test [127.0.0.1]: {sender_words}" in human
    for internal in ("Corp", TLS_FAILURE_OPTION[failure], "fix"):
        assert internal not in human
    # ... the postmaster the check, the certificate's facts and the fix.
    assert fields["x-relay-route"] == "Corp"
    prefix = f"mx1.corp.test [127.0.0.1]: {TLS_FAILURE_OPTION[failure]} failed: "
    assert fields["x-relay-diagnosis"].startswith(prefix)
    assert re.search(diagnosis, fields["x-relay-diagnosis"]), fields["x-relay-diagnosis"]


@pytest.mark.parametrize(("failure", "cert", "on", "off"), TLS_CASES, ids=TLS_IDS)
async def test_tls_check_off_delivers(tmp_path, dnsmasq, dsn_sink, failure, cert, on, off):
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with _tls_sink(pki, cert) as sink:
        routes = configs.route("Corp", "mx1.corp.test", sink.port, **off)
        routes += senders_route(dsn_sink)
        toml = integration_toml(tmp_path, server, routes, RULES, ca_file=pki.ca_file)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: sink.messages)
            assert relay.spooled() == []
    [message] = sink.messages
    assert message.data == BODY
    assert (message.tls is None) == (cert is None)
    assert dsn_sink.connections == 0


async def test_postmaster_copy_has_the_diagnosis(tmp_path, dnsmasq, dsn_sink):
    """``[bounces] notify``: a copy with the full diagnosis, sent like a DSN."""
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with _tls_sink(pki, {"names": ("other.test",)}) as failing:
        routes = configs.route("Corp", "mx1.corp.test", failing.port, **ON)
        routes += senders_route(dsn_sink)
        toml = integration_toml(tmp_path, server, routes, RULES, ca_file=pki.ca_file,
                           notify=["postmaster@sender.test"])  # fmt: skip
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                SENDER, ["bob@corp.test"], when=lambda: len(dsn_sink.messages) == 2
            )
            assert relay.spooled() == []
            # The copy is not a second bounce of the message.
            assert relay.sample("relay_bounces_total", reason="tls_policy") == 1
    by_rcpt = {tuple(m.rcpt_tos): m for m in dsn_sink.messages}
    dsn, copy = by_rcpt[(SENDER,)], by_rcpt[("postmaster@sender.test",)]
    assert dsn.mail_from == copy.mail_from == "<>"
    _, human, _ = dsn_parts(dsn.data)
    assert "The postmaster of this mail system has been told." in human
    assert "other.test" not in human
    message, text, [fields] = dsn_parts(copy.data)
    assert message["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert message["To"] == "postmaster@sender.test"
    assert f"A message from <{SENDER}>" in text
    assert '<bob@corp.test> (route "Corp"):' in text
    assert "mx1.corp.test [127.0.0.1]: validate_hostname failed:" in text
    assert "fix: use one of these as the route host: other.test" in text
    assert fields["final-recipient"] == "rfc822; bob@corp.test"
    assert fields["remote-mta"] == "dns; mx1.corp.test"


async def test_postmaster_copy_that_fails_is_dropped_not_copied(tmp_path, dnsmasq, dsn_sink):
    """The copy has the null sender: when it fails nothing more is sent (no loop)."""
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink() as no_tls:
        routes = configs.route("Corp", "mx1.corp.test", no_tls.port, **TLS_ONLY)
        routes += senders_route(dsn_sink)
        # The postmaster's own mail takes the failing route.
        toml = integration_toml(tmp_path, server, routes, RULES, notify=["postmaster@corp.test"])
        async with InProcessRelay(tmp_path, toml) as relay:
            relay.put(SENDER, ["bob@corp.test"])
            await until(lambda: relay.sample("relay_bounces_total", reason="double_bounce"))
            await until(lambda: dsn_sink.messages)
            await idle(relay)
            assert relay.spooled() == []
            assert relay.sample("relay_bounces_total", reason="tls_policy") == 1
            assert relay.sample("relay_bounces_total", reason="double_bounce") == 1
    [dsn] = dsn_sink.messages
    assert dsn.rcpt_tos == [SENDER]
    assert no_tls.messages == []


# --- remote replies --------------------------------------------------------------


@pytest.mark.parametrize("command", ["MAIL", "DATA"])
async def test_451_then_accept_is_delivered_once(tmp_path, dnsmasq, dsn_sink, command):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(replies={command: ["451 4.3.0 try again"]}) as sink:
        routes = configs.route("Corp", "mx1.corp.test", sink.port) + senders_route(dsn_sink)
        async with InProcessRelay(
            tmp_path, integration_toml(tmp_path, server, routes, RULES)
        ) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: sink.messages)
            assert relay.spooled() == []
            assert relay.sample("relay_recipients_total", route="Corp", outcome="deferred") == 1
            assert relay.sample("relay_recipients_total", route="Corp", outcome="delivered") == 1
    assert len(sink.messages) == 1
    assert _mails(sink) == 2
    assert dsn_sink.connections == 0


async def test_550_for_one_recipient_bounces_only_that_one(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(replies={"RCPT bad@corp.test": "550 5.1.1 no such user"}) as sink:
        routes = configs.route("Corp", "mx1.corp.test", sink.port) + senders_route(dsn_sink)
        async with InProcessRelay(
            tmp_path, integration_toml(tmp_path, server, routes, RULES)
        ) as relay:
            await relay.send_and_settle(
                SENDER, ["good@corp.test", "bad@corp.test"], when=lambda: dsn_sink.messages
            )
            assert relay.spooled() == []
    [delivered] = sink.messages
    assert delivered.rcpt_tos == ["good@corp.test"]
    [dsn] = dsn_sink.messages
    _, human, recipients = dsn_parts(dsn.data)
    assert [r["final-recipient"] for r in recipients] == ["rfc822; bad@corp.test"]
    assert recipients[0]["status"] == "5.1.1"
    assert "550 5.1.1 no such user" in recipients[0]["diagnostic-code"]
    assert "bad@corp.test" in human
    assert "good@corp.test" not in human


async def test_expiry_sends_a_4_4_7_dsn(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    clock = Clock(1_900_000_000.0)
    routes = configs.route("Corp", "mx1.corp.test", closed_port()) + senders_route(dsn_sink)
    toml = integration_toml(
        tmp_path, server, routes, RULES,
        max_lifetime="1h", min_backoff="10m", max_backoff="1h",
    )  # fmt: skip
    async with InProcessRelay(tmp_path, toml, clock=clock) as relay:
        await relay.send_and_settle(
            SENDER,
            ["bob@corp.test"],
            when=lambda: relay.sample("relay_recipients_total", route="Corp", outcome="deferred"),
        )
        assert dsn_sink.connections == 0
        clock.advance(3600)
        relay.scheduler.flush()
        await until(lambda: dsn_sink.messages)
        await idle(relay)
        assert relay.spooled() == []
        assert relay.sample("relay_bounces_total", reason="expired") == 1
        assert relay.sample("relay_recipients_total", route="Corp", outcome="bounced") == 1
    [dsn] = dsn_sink.messages
    _, _, [fields] = dsn_parts(dsn.data)
    assert fields["final-recipient"] == "rfc822; bob@corp.test"
    assert fields["action"] == "failed"
    assert fields["status"] == "4.4.7"
    # The last error relay saw: the host was unreachable -- the relay's own
    # diagnosis, not a reply from a remote MTA (RFC 3464 section 2.3.6).
    assert fields["diagnostic-code"].startswith("X-Relay; 451 4.4.1 ")
    # The host it kept trying is named all the same.
    assert fields["remote-mta"] == "dns; mx1.corp.test"


# --- persistence ---------------------------------------------------------------


async def test_partial_delivery_survives_a_new_scheduler(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(replies={"RCPT later@corp.test": "451 4.2.0 mailbox busy"}) as sink:
        routes = configs.route("Corp", "mx1.corp.test", sink.port) + senders_route(dsn_sink)
        toml = integration_toml(
            tmp_path, server, routes, RULES, min_backoff="10m", max_backoff="1h"
        )
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                SENDER, ["good@corp.test", "later@corp.test"], when=lambda: sink.messages
            )
        [left] = relay.spooled()
        assert [r.address for r in left.pending] == ["later@corp.test"]
        sink.script.replies.clear()
        # A restart: a new Scheduler and Deliverer over the same spool.
        async with InProcessRelay(tmp_path, toml) as again:
            assert again.requeue() == 1
            again.scheduler.flush()
            await until(lambda: len(sink.messages) == 2)
            await idle(again)
            assert again.spooled() == []
    first, second = sink.messages
    assert first.rcpt_tos == ["good@corp.test"]
    assert second.rcpt_tos == ["later@corp.test"]
    assert sum(m.rcpt_tos.count("good@corp.test") for m in sink.messages) == 1
    assert dsn_sink.connections == 0


async def test_null_sender_failure_sends_no_dsn(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(replies={"RCPT": "550 5.1.1 no such user"}) as sink:
        routes = configs.route("Corp", "mx1.corp.test", sink.port) + senders_route(dsn_sink)
        async with InProcessRelay(
            tmp_path, integration_toml(tmp_path, server, routes, RULES)
        ) as relay:
            await relay.send_and_settle(
                "",
                ["bad@corp.test"],
                when=lambda: relay.sample("relay_bounces_total", reason="double_bounce"),
            )
            assert relay.spooled() == []
            assert relay.sample("relay_bounces_total", reason="remote_permanent") == 0
    assert any(line.startswith("MAIL FROM:<>") for line in sink.lines)
    assert dsn_sink.connections == 0


# --- metrics ---------------------------------------------------------------------


async def test_metrics_after_known_traffic(tmp_path, dnsmasq, dsn_sink):
    hosts = {**HOSTS, "mx2.corp.test": ["127.0.0.1"]}
    server = dnsmasq(hosts=hosts, mx=MX)
    refuse = {"RCPT bad@corp.test": "550 5.1.1 no such user"}
    async with Sink(replies=refuse) as corp, Sink() as plain:
        routes = configs.route("Corp", "mx1.corp.test", corp.port)
        routes += configs.route("Strict", "mx2.corp.test", plain.port, **ON)
        routes += senders_route(dsn_sink)
        rules = configs.rule("Strict", "@strict.test") + RULES
        async with InProcessRelay(
            tmp_path, integration_toml(tmp_path, server, routes, rules)
        ) as relay:
            await relay.send_and_settle(
                SENDER,
                ["good@corp.test", "bad@corp.test", "x@strict.test"],
                when=lambda: dsn_sink.messages,
            )
            assert relay.spooled() == []
            sample = relay.sample
    expected = {
        ("relay_recipients_total", ("Corp", "delivered")): 1,
        ("relay_recipients_total", ("Corp", "bounced")): 1,
        ("relay_recipients_total", ("Corp", "deferred")): 0,
        ("relay_recipients_total", ("Strict", "bounced")): 1,
        ("relay_recipients_total", ("Senders", "delivered")): 1,
    }
    for (name, (route, outcome)), value in expected.items():
        assert sample(name, route=route, outcome=outcome) == value, (route, outcome)
    attempts = {
        ("Corp", "mx1.corp.test", "delivered"): 1,
        ("Strict", "mx2.corp.test", "tls_failed"): 1,
        ("Senders", "sender.test", "delivered"): 1,
    }
    for (route, host, result), value in attempts.items():
        assert sample("relay_delivery_attempts_total", route=route, host=host,
                      result=result) == value, (route, host, result)  # fmt: skip
    assert sample("relay_tls_failures_total", route="Strict", host="mx2.corp.test",
                  reason="starttls-not-supported") == 1  # fmt: skip
    # One DSN for two causes: each cause counted once.
    assert sample("relay_bounces_total", reason="remote_permanent") == 1
    assert sample("relay_bounces_total", reason="tls_policy") == 1
    assert sample("relay_bounces_total", reason="double_bounce") == 0
    [dsn] = dsn_sink.messages
    _, _, recipients = dsn_parts(dsn.data)
    assert sorted(r["final-recipient"] for r in recipients) == [
        "rfc822; bad@corp.test",
        "rfc822; x@strict.test",
    ]
    assert plain.messages == []


async def test_each_route_persisted_as_it_ends_then_abandoned_one_retried(
    tmp_path, dnsmasq, dsn_sink
):
    """Route B's delivery is on disk while route A still hangs; a restart retries only A."""
    server = dnsmasq(hosts={**HOSTS, "slow.corp.test": ["127.0.0.1"]}, mx=MX)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # never greets

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    slow_port = listener.sockets[0].getsockname()[1]
    try:
        async with Sink() as fast:
            routes = configs.route("Slow", "slow.corp.test", slow_port)
            routes += configs.route("Corp", "mx1.corp.test", fast.port) + senders_route(dsn_sink)
            rules = configs.rule("Slow", "@slow.test") + RULES
            toml = integration_toml(tmp_path, server, routes, rules)
            relay = InProcessRelay(tmp_path, toml)
            task = asyncio.create_task(relay.scheduler.run())
            relay.put(SENDER, ["a@slow.test", "b@corp.test"])
            await until(lambda: fast.messages and accepted)
            await until(lambda: [r.state for r in relay.spooled()[0].recipients]
                        == [RcptState.PENDING, RcptState.DELIVERED])  # fmt: skip
            await relay.scheduler.stop(0.1)
            await asyncio.wait_for(task, 5)
            await relay.deliverer.close()
            for writer in accepted:
                writer.close()
            # The slow host recovers: it is now the fast sink.
            toml = toml.replace(f"port = {slow_port}", f"port = {fast.port}")
            async with InProcessRelay(tmp_path, toml) as again:
                assert again.requeue() == 1
                await until(lambda: len(fast.messages) == 2)
                await idle(again)
                assert again.spooled() == []
        assert [m.rcpt_tos for m in fast.messages] == [["b@corp.test"], ["a@slow.test"]]
    finally:
        listener.close()
        await listener.wait_closed()
