"""Edges of the whole path: mixed TLS and temporary failures, failover per
recipient, IPv6+IPv4 names, stale pooled sessions, DSNs that cannot be delivered.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support import configs
from tests.support.hosts import closed_port
from tests.support.integ import (
    SENDER,
    InProcessRelay,
    dsn_parts,
    idle,
    integration_toml,
    sinks_on_one_port,
)
from tests.support.pki import Pki
from tests.support.queue import Clock
from tests.support.sink import Sink
from tests.support.wait import until

RULES = configs.rule("Corp", "@corp.test") + configs.rule("Senders", "@sender.test")
NAMES = ("mx1.corp.test", "mx2.corp.test", "backup.corp.test", "mx.sender.test")
HOSTS = {name: ["127.0.0.1"] for name in NAMES}
MX = {"sender.test": [(10, "mx.sender.test")]}
STRICT_TLS = {"require_tls": True, "require_ca_signed": False, "validate_hostname": False}


def tls_route(primary: list[tuple[str, int, int]], secondary=()) -> str:
    """A multi-host route that requires TLS (no certificate checks)."""
    return configs.route("Corp", primary=primary, secondary=secondary, require_tls=True)


def senders(dsn_sink: Sink) -> str:
    return configs.route("Senders", "sender.test", dsn_sink.port, mx_lookup=True)


async def test_tls_failure_and_unreachable_defers(tmp_path, dnsmasq, dsn_sink):
    """Some hosts failed TLS, others temporarily: deferred, not bounced."""
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink() as no_tls:
        route = tls_route(
            [("mx1.corp.test", no_tls.port, 50), ("mx2.corp.test", closed_port(), 50)]
        )
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES,
                           min_backoff="10m", max_backoff="1h")  # fmt: skip
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                SENDER,
                ["bob@corp.test"],
                when=lambda: relay.sample(
                    "relay_recipients_total", route="Corp", outcome="deferred"
                ),
            )
            [left] = relay.spooled()
            assert left.pending[0].address == "bob@corp.test"
            assert relay.sample("relay_bounces_total", reason="tls_policy") == 0
            assert relay.sample("relay_tls_failures_total", route="Corp", host="mx1.corp.test",
                                reason="starttls-not-supported") == 1  # fmt: skip
    assert no_tls.messages == []
    assert dsn_sink.connections == 0


async def test_every_host_failing_tls_names_each_in_the_dsn(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink() as first, Sink() as second:
        route = tls_route([("mx1.corp.test", first.port, 50), ("mx2.corp.test", second.port, 50)])
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: dsn_sink.messages)
            assert relay.spooled() == []
    _, human, [fields] = dsn_parts(dsn_sink.messages[0].data)
    assert fields["status"] == "5.7.4"
    # Each host tried, by name and address, and what it failed.
    for host in ("mx1.corp.test", "mx2.corp.test"):
        assert f"{host} [127.0.0.1]: it does not support encrypted connections" in human
    # Remote-MTA: the last host tried (one per recipient, RFC 3464 section 2.3.5).
    assert fields["remote-mta"] in ("dns; mx1.corp.test", "dns; mx2.corp.test")
    assert fields["remote-mta"].removeprefix("dns; ") in fields["x-relay-diagnosis"]
    assert "require_tls failed" in fields["x-relay-diagnosis"]


async def test_secondary_carries_mail_when_the_primary_fails_tls(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink() as no_tls, Sink() as backup:
        # The secondary offers STARTTLS with a test certificate.
        pki = Pki(tmp_path / "pki")
        backup.tls_context = pki.server_context("backup.corp.test")
        route = tls_route([("mx1.corp.test", no_tls.port, 100)],
                          [("backup.corp.test", backup.port, 100)])  # fmt: skip
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: backup.messages)
            assert relay.spooled() == []
            assert relay.sample("relay_bounces_total", reason="tls_policy") == 0
    assert backup.messages[0].tls is not None
    assert dsn_sink.connections == 0


async def test_recipient_deferred_at_the_primary_tries_the_secondary(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    busy = {"RCPT later@corp.test": "451 4.2.0 mailbox busy"}
    async with Sink(replies=busy) as primary, Sink() as backup:
        route = configs.route("Corp", primary=[("mx1.corp.test", primary.port, 100)],
                              secondary=[("backup.corp.test", backup.port, 100)])  # fmt: skip
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                SENDER,
                ["good@corp.test", "later@corp.test"],
                when=lambda: primary.messages and backup.messages,
            )
            assert relay.spooled() == []
    assert [m.rcpt_tos for m in primary.messages] == [["good@corp.test"]]
    assert [m.rcpt_tos for m in backup.messages] == [["later@corp.test"]]


async def test_name_with_ipv6_and_ipv4_reaches_the_ipv4_listener(tmp_path, dnsmasq, dsn_sink):
    # Nothing listens on [::1]:port, so the IPv6 try is refused first.
    server = dnsmasq(hosts={**HOSTS, "dual.corp.test": ["::1", "127.0.0.1"]}, mx=MX)
    async with Sink() as sink:
        route = configs.route("Corp", "dual.corp.test", sink.port)
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: sink.messages)
            assert relay.spooled() == []


async def test_stale_pooled_session_is_replaced(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink() as sink:
        route = configs.route("Corp", "mx1.corp.test", sink.port)
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["one@corp.test"], when=lambda: sink.messages)
            sink.kill_connections()
            await relay.send_and_settle(
                SENDER, ["two@corp.test"], when=lambda: len(sink.messages) == 2
            )
            assert relay.sample("relay_recipients_total", route="Corp", outcome="deferred") == 0
    assert sink.connections == 2


async def test_undeliverable_dsn_is_retried_then_dropped(tmp_path, dnsmasq):
    """A DSN whose destination is down is deferred like any mail; at expiry it is dropped."""
    server = dnsmasq(hosts=HOSTS, mx=MX)
    clock = Clock(1_900_000_000.0)
    async with Sink(replies={"RCPT": "550 5.1.1 no such user"}) as sink:
        routes = configs.route("Corp", "mx1.corp.test", sink.port)
        routes += configs.route("Senders", "sender.test", closed_port(), mx_lookup=True)
        toml = integration_toml(tmp_path, server, routes, RULES, max_lifetime="1h",
                           min_backoff="10m", max_backoff="1h")  # fmt: skip
        async with InProcessRelay(tmp_path, toml, clock=clock) as relay:
            await relay.send_and_settle(
                SENDER,
                ["bad@corp.test"],
                when=lambda: relay.sample(
                    "relay_recipients_total", route="Senders", outcome="deferred"
                ),
            )
            [dsn] = relay.spooled()
            assert dsn.is_bounce and dsn.mail_from == ""
            clock.advance(3600)
            relay.scheduler.flush()
            await until(lambda: relay.sample("relay_bounces_total", reason="double_bounce"))
            await idle(relay)
            assert relay.spooled() == []
            assert relay.sample("relay_bounces_total", reason="remote_permanent") == 1
            assert relay.sample("relay_bounces_total", reason="expired") == 0


STRICT = {"require_tls": True, "require_ca_signed": True, "validate_hostname": True}


@pytest.mark.parametrize(
    ("names", "delivered"),
    [(("mx1.corp.test",), True), (("corp.test",), False)],
    ids=["cert-for-mx-host", "cert-for-domain-only"],
)
async def test_mx_route_verifies_the_mx_host_name(tmp_path, dnsmasq, dsn_sink, names, delivered):
    """validate_hostname checks the MX host's name, not the route's domain."""
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx={**MX, "corp.test": [(10, "mx1.corp.test")]})
    async with Sink(tls_context=pki.server_context(*names)) as sink:
        route = configs.route("Corp", "corp.test", sink.port, mx_lookup=True, **STRICT)
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES,
                           ca_file=pki.ca_file)  # fmt: skip
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                SENDER, ["bob@corp.test"], when=lambda: sink.messages or dsn_sink.messages
            )
            assert relay.spooled() == []
    assert bool(sink.messages) is delivered
    assert bool(dsn_sink.messages) is not delivered


@pytest.mark.parametrize(
    ("names", "delivered"),
    [(("127.0.0.1",), True), (("mx1.corp.test",), False)],
    ids=["ip-san", "dns-san-only"],
)
async def test_ip_literal_route_host_needs_an_ip_san(tmp_path, dnsmasq, dsn_sink, names, delivered):
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(tls_context=pki.server_context(*names)) as sink:
        route = configs.route("Corp", "127.0.0.1", sink.port, **STRICT)
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES,
                           ca_file=pki.ca_file)  # fmt: skip
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                SENDER, ["bob@corp.test"], when=lambda: sink.messages or dsn_sink.messages
            )
            if not delivered:
                assert relay.sample("relay_tls_failures_total", route="Corp", host="127.0.0.1",
                                    reason="certificate-host-mismatch") == 1  # fmt: skip
    assert bool(sink.messages) is delivered


async def test_421_greeting_moves_on_to_the_next_mx(tmp_path, dnsmasq):
    first, second = await sinks_on_one_port(["127.0.0.2", "127.0.0.3"])
    try:
        first.script.replies["GREETING"] = "421 4.3.2 not now"
        server = dnsmasq(
            hosts={"mx1.corp.test": ["127.0.0.2"], "mx2.corp.test": ["127.0.0.3"]},
            mx={"corp.test": [(10, "mx1.corp.test"), (20, "mx2.corp.test")]},
        )
        route = configs.route("Corp", "corp.test", first.port, mx_lookup=True)
        corp = configs.rule("Corp", "@corp.test")
        async with InProcessRelay(
            tmp_path, integration_toml(tmp_path, server, route, corp)
        ) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: second.messages)
            assert relay.spooled() == []
        assert first.connections == 1 and first.messages == []
    finally:
        await first.stop()
        await second.stop()


async def test_5xx_to_data_bounces_every_recipient_in_one_dsn(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(replies={"DATA": ["554 5.6.0 content rejected"]}) as sink:
        route = configs.route("Corp", "mx1.corp.test", sink.port)
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                SENDER, ["a@corp.test", "b@corp.test"], when=lambda: dsn_sink.messages
            )
            assert relay.spooled() == []
    _, _, recipients = dsn_parts(dsn_sink.messages[0].data)
    assert [r["status"] for r in recipients] == ["5.6.0", "5.6.0"]
    assert len(dsn_sink.messages) == 1


async def test_utf8_sender_gets_its_dsn_over_smtputf8(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    sender = "ålice@sender.test"
    async with Sink(replies={"RCPT": "550 5.1.1 no such user"}) as sink:
        route = configs.route("Corp", "mx1.corp.test", sink.port)
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                sender, ["bob@corp.test"], smtputf8=True, when=lambda: dsn_sink.messages
            )
            assert relay.spooled() == []
    [dsn] = dsn_sink.messages
    assert dsn.rcpt_tos == [sender]
    assert "SMTPUTF8" in dsn.mail_options
    message, _, [fields] = dsn_parts(dsn.data, utf8=True)
    assert fields["final-recipient"].endswith("bob@corp.test")


async def test_stop_abandons_an_attempt_to_a_silent_host(tmp_path, dnsmasq, dsn_sink):
    """SIGTERM's bound: a host that never greets is abandoned, the mail stays pending."""
    server = dnsmasq(hosts=HOSTS, mx=MX)
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    listener = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        route = configs.route("Corp", "mx1.corp.test", port)
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES)
        relay = InProcessRelay(tmp_path, toml)
        task = asyncio.create_task(relay.scheduler.run())
        envelope = relay.put(SENDER, ["bob@corp.test"])
        await until(lambda: accepted)
        await relay.scheduler.stop(0.1)
        await asyncio.wait_for(task, 5)
        await relay.deliverer.close()
        [left] = relay.spooled()
        assert left.id == envelope.id
        assert [r.address for r in left.pending] == ["bob@corp.test"]
    finally:
        for writer in accepted:
            writer.close()
        listener.close()
        await listener.wait_closed()


@pytest.mark.parametrize("require_tls", [False, True], ids=["opportunistic", "required"])
async def test_failed_handshake(tmp_path, dnsmasq, dsn_sink, require_tls):
    """Opportunistic TLS falls back to plaintext (RFC 7435); required TLS bounces."""
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    broken = {"STARTTLS": "220 2.0.0 go ahead"}  # then plaintext garbage
    async with Sink(tls_context=pki.server_context("mx1.corp.test"), replies=broken) as sink:
        options = STRICT_TLS if require_tls else {}
        route = configs.route("Corp", "mx1.corp.test", sink.port, **options)
        toml = integration_toml(tmp_path, server, route + senders(dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                SENDER, ["bob@corp.test"], when=lambda: sink.messages or dsn_sink.messages
            )
            assert relay.spooled() == []
            failures = relay.sample("relay_tls_failures_total", route="Corp",
                                    host="mx1.corp.test", reason="validation-failure")  # fmt: skip
    if require_tls:
        assert sink.messages == []
        _, human, [fields] = dsn_parts(dsn_sink.messages[0].data)
        assert fields["status"] == "5.7.5"
        assert "a secure (encrypted) connection to it could not be set up" in human
        assert fields["remote-mta"] == "dns; mx1.corp.test"
        assert "the TLS handshake with mx1.corp.test failed" in fields["x-relay-diagnosis"]
        assert failures == 1
    else:
        [message] = sink.messages
        assert message.tls is None
        assert sink.connections == 2
        assert dsn_sink.connections == 0
        assert failures == 0
