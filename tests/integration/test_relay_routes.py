"""The whole delivery path over real SMTP and real DNS: hosts, weights, failover, reuse.

The daemon's own parts (relay.app.build, via tests/support/integ.py),
aiosmtpd sinks on loopback, names resolved by dnsmasq.
"""

from __future__ import annotations

from collections import Counter

import pytest

from relay import configload
from tests.support import configs
from tests.support.hosts import closed_port
from tests.support.integ import BODY, SENDER, InProcessRelay, idle, integration_toml
from tests.support.pki import Pki
from tests.support.sink import Sink
from tests.support.spool import read_body
from tests.support.wait import until

CORP = configs.rule("Corp", "@corp.test")


async def test_single_host_plain_delivers_the_spooled_bytes(tmp_path, dnsmasq):
    server = dnsmasq(hosts={"mx1.corp.test": ["127.0.0.1"]})
    async with Sink() as sink:
        toml = integration_toml(
            tmp_path, server, configs.route("Corp", "mx1.corp.test", sink.port), CORP
        )
        async with InProcessRelay(tmp_path, toml) as relay:
            envelope = relay.put(SENDER, ["bob@corp.test", "carol@corp.test"])
            spooled = read_body(relay.spool, envelope.id)
            await until(lambda: sink.messages)
            await idle(relay)
            assert relay.spooled() == []
    [message] = sink.messages
    assert message.data == spooled == BODY
    assert message.mail_from == SENDER
    assert message.rcpt_tos == ["bob@corp.test", "carol@corp.test"]
    assert message.tls is None


async def test_strict_tls_to_a_name_resolved_by_dns(tmp_path, dnsmasq):
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts={"mx1.corp.test": ["127.0.0.1"]})
    async with Sink(tls_context=pki.server_context("mx1.corp.test")) as sink:
        route = configs.route(
            "Corp", "mx1.corp.test", sink.port,
            require_tls=True, require_ca_signed=True, validate_hostname=True,
        )  # fmt: skip
        toml = integration_toml(tmp_path, server, route, CORP, ca_file=pki.ca_file)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: sink.messages)
            assert relay.spooled() == []
            assert relay.sample("relay_tls_failures_total", route="Corp", host="mx1.corp.test",
                                reason="certificate-host-mismatch") == 0  # fmt: skip
    [message] = sink.messages
    assert message.data == BODY
    assert message.tls is not None and message.tls.startswith("TLS")


async def _shares(tmp_path, dnsmasq, loads, messages, seed):
    names = [f"mx{i}.corp.test" for i in range(1, len(loads) + 1)]
    server = dnsmasq(hosts={name: ["127.0.0.1"] for name in names})
    sinks = [await Sink().start() for _ in loads]
    try:
        hosts = [(n, s.port, load) for n, s, load in zip(names, sinks, loads, strict=True)]
        # max_per_host = max_concurrency: a host's slots are never all taken,
        # so no pick is moved to another host while the first connections
        # are still waiting for their greetings (delivery's jam isolation,
        # tested in test_host_health.py): the counts are the weighted picks.
        toml = integration_toml(
            tmp_path, server, configs.route("Corp", primary=hosts), CORP,
            max_concurrency=8, max_per_host=8,
        )  # fmt: skip
        async with InProcessRelay(tmp_path, toml, seed=seed) as relay:
            for i in range(messages):
                relay.put(SENDER, [f"user{i}@corp.test"])
            await until(lambda: sum(len(s.messages) for s in sinks) == messages, 20)
            await idle(relay)
            # Every message arrived on its first attempt: counts are first picks.
            attempts = sum(
                relay.sample(
                    "relay_delivery_attempts_total", route="Corp", host=n, result="delivered"
                )  # fmt: skip
                for n in names
            )
            assert attempts == messages
    finally:
        for sink in sinks:
            await sink.stop()
    return [len(s.messages) / messages for s in sinks]


@pytest.mark.parametrize(
    ("loads", "seed"),
    [((70, 30), 4242), ((70, 30), None), ((50, 25, 25), 99)],
    ids=["70-30-seeded", "70-30-unseeded", "50-25-25-seeded"],
)
async def test_weighted_primaries_get_their_share(tmp_path, dnsmasq, loads, seed):
    # 400 messages: one standard deviation of a 70% share is 2.3 points,
    # so the 8-point band holds even for the unseeded run (3.5 sigma).
    shares = await _shares(tmp_path, dnsmasq, loads, 400, seed)
    for share, load in zip(shares, loads, strict=True):
        assert abs(share * 100 - load) <= 8, (shares, loads)


async def test_secondaries_only_when_every_primary_is_down(tmp_path, dnsmasq):
    names = ["mx1.corp.test", "mx2.corp.test", "backup1.corp.test", "backup2.corp.test"]
    server = dnsmasq(hosts={name: ["127.0.0.1"] for name in names})
    async with Sink() as backup1, Sink() as backup2:
        down1, down2 = closed_port(), closed_port()
        route = configs.route(
            "Corp",
            primary=[("mx1.corp.test", down1, 50), ("mx2.corp.test", down2, 50)],
            secondary=[
                ("backup1.corp.test", backup1.port, 50),
                ("backup2.corp.test", backup2.port, 50),
            ],
        )
        toml = integration_toml(tmp_path, server, route, CORP)
        async with InProcessRelay(tmp_path, toml) as relay:
            for i in range(20):
                relay.put(SENDER, [f"user{i}@corp.test"])
            await until(lambda: len(backup1.messages) + len(backup2.messages) == 20)
            await idle(relay)
            assert relay.spooled() == []
            for name in ("mx1.corp.test", "mx2.corp.test"):
                # Tried by the attempts under way when it failed, then held
                # down (relay.health): never more than once per message.
                unreachable = relay.sample("relay_delivery_attempts_total", route="Corp",
                                           host=name, result="unreachable")  # fmt: skip
                assert unreachable is not None and 1 <= unreachable <= 20
    # Both secondaries take a share of the failover traffic.
    assert backup1.messages and backup2.messages


async def test_secondaries_untouched_while_a_primary_works(tmp_path, dnsmasq):
    names = ["mx1.corp.test", "mx2.corp.test", "backup.corp.test"]
    server = dnsmasq(hosts={name: ["127.0.0.1"] for name in names})
    async with Sink() as primary, Sink() as backup:
        route = configs.route(
            "Corp",
            primary=[("mx1.corp.test", primary.port, 50), ("mx2.corp.test", closed_port(), 50)],
            secondary=[("backup.corp.test", backup.port, 100)],
        )
        toml = integration_toml(tmp_path, server, route, CORP)
        async with InProcessRelay(tmp_path, toml) as relay:
            for i in range(20):
                relay.put(SENDER, [f"user{i}@corp.test"])
            await until(lambda: len(primary.messages) == 20)
            await idle(relay)
    assert backup.connections == 0
    assert backup.messages == []


async def test_connection_reuse_at_the_sink(tmp_path, dnsmasq):
    server = dnsmasq(hosts={"mx1.corp.test": ["127.0.0.1"]})
    async with Sink() as sink:
        route = configs.route("Corp", "mx1.corp.test", sink.port)
        toml = integration_toml(tmp_path, server, route, CORP, max_per_host=3)
        async with InProcessRelay(tmp_path, toml) as relay:
            for i in range(50):
                relay.put(SENDER, [f"user{i}@corp.test"])
            await until(lambda: len(sink.messages) == 50)
            await idle(relay)
    counts = Counter(m.connection for m in sink.messages)
    assert 1 <= sink.connections <= 3, counts
    assert sum(counts.values()) == 50


async def test_strict_tls_sessions_are_reused(tmp_path, dnsmasq):
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts={"mx1.corp.test": ["127.0.0.1"]})
    async with Sink(tls_context=pki.server_context("mx1.corp.test")) as sink:
        route = configs.route(
            "Corp", "mx1.corp.test", sink.port,
            require_tls=True, require_ca_signed=True, validate_hostname=True,
        )  # fmt: skip
        toml = integration_toml(tmp_path, server, route, CORP, ca_file=pki.ca_file, max_per_host=2)
        async with InProcessRelay(tmp_path, toml) as relay:
            for i in range(20):
                relay.put(SENDER, [f"user{i}@corp.test"])
            await until(lambda: len(sink.messages) == 20)
            await idle(relay)
    assert sink.connections <= 2
    assert all(m.tls is not None for m in sink.messages)
    # Never a plaintext MAIL on a reused connection.
    assert None not in sink.sessions_tls


async def test_idle_session_is_closed_after_idle_timeout(tmp_path, dnsmasq):
    server = dnsmasq(hosts={"mx1.corp.test": ["127.0.0.1"]})
    async with Sink() as sink:
        route = configs.route("Corp", "mx1.corp.test", sink.port)
        toml = integration_toml(tmp_path, server, route, CORP).replace(
            'idle_timeout = "5s"', 'idle_timeout = "200ms"'
        )
        async with InProcessRelay(tmp_path, toml) as relay:
            assert relay.config.delivery.idle_timeout == 0.2
            relay.put(SENDER, ["one@corp.test"])
            await until(lambda: sink.messages)
            await until(lambda: "QUIT" in sink.lines, 3)
            await relay.send_and_settle(
                SENDER, ["two@corp.test"], when=lambda: len(sink.messages) == 2
            )
    assert sink.connections == 2
    assert [m.connection for m in sink.messages] == [1, 2]


async def test_session_reused_after_a_refused_transaction(tmp_path, dnsmasq):
    server = dnsmasq(hosts={"mx1.corp.test": ["127.0.0.1"]})
    refuse = {"RCPT bad@corp.test": "550 5.1.1 no such user", "DATA": ["554 5.6.0 rejected"]}
    async with Sink(replies=refuse) as sink:
        route = configs.route("Corp", "mx1.corp.test", sink.port)
        toml = integration_toml(tmp_path, server, route, CORP, max_per_host=1)
        async with InProcessRelay(tmp_path, toml) as relay:
            for address in ("bad@corp.test", "first@corp.test", "ok@corp.test"):
                # One at a time, so each finds the previous one's pooled session.
                await relay.send_and_settle("", [address], when=lambda: len(relay.scheduler) == 0)
            assert relay.sample("relay_bounces_total", reason="double_bounce") == 2
    assert [m.rcpt_tos for m in sink.messages] == [["ok@corp.test"]]
    assert sink.connections == 1


async def test_new_config_applies_at_the_next_attempt(tmp_path, dnsmasq):
    """A reload (the config callable answering a new Config) redirects queued mail."""
    server = dnsmasq(hosts={"old.corp.test": ["127.0.0.1"], "new.corp.test": ["127.0.0.1"]})
    async with Sink() as sink:
        old = configs.route("Corp", "old.corp.test", closed_port())
        toml = integration_toml(tmp_path, server, old, CORP, min_backoff="10m", max_backoff="1h")
        async with InProcessRelay(tmp_path, toml) as relay:
            relay.put(SENDER, ["bob@corp.test"])
            await until(lambda: relay.sample("relay_recipients_total", route="Corp",
                                             outcome="deferred"))  # fmt: skip
            await idle(relay)
            new = configs.route("Corp", "new.corp.test", sink.port)
            path = tmp_path / "reloaded.toml"
            path.write_text(integration_toml(tmp_path, server, new, CORP))
            relay.config = configload.load(path)
            relay.scheduler.flush()
            await until(lambda: sink.messages)
            await idle(relay)
            assert relay.spooled() == []
            assert relay.sample("relay_delivery_attempts_total", route="Corp",
                                host="new.corp.test", result="delivered") == 1  # fmt: skip
