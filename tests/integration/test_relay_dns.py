"""The delivery path through real DNS (dnsmasq): MX order and failover, implicit
MX, null MX on a bounce, and route hosts that do not resolve.

Two MX hosts of one domain share the route's port, so their sinks listen on
different loopback addresses (127.0.0.2, 127.0.0.3), as two machines would.
"""

from __future__ import annotations

import socket

import pytest

from tests.support import configs
from tests.support.integ import SENDER, InProcessRelay, idle, integration_toml, sinks_on_one_port
from tests.support.sink import Sink
from tests.support.wait import until

CORP = configs.rule("Corp", "@corp.test")


def _nothing_listens(ip: str, port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind((ip, port))
        except OSError:
            return False
    return True


@pytest.fixture
async def two_mx():
    sinks = await sinks_on_one_port(["127.0.0.2", "127.0.0.3"])
    yield sinks
    for sink in sinks:
        await sink.stop()


async def test_mx_hosts_in_preference_order(tmp_path, dnsmasq, two_mx):
    first, second = two_mx
    server = dnsmasq(
        hosts={"mx1.corp.test": ["127.0.0.2"], "mx2.corp.test": ["127.0.0.3"]},
        # Listed backwards: the preference decides, not the answer's order.
        mx={"corp.test": [(20, "mx2.corp.test"), (10, "mx1.corp.test")]},
    )
    route = configs.route("Corp", "corp.test", first.port, mx_lookup=True)
    async with InProcessRelay(tmp_path, integration_toml(tmp_path, server, route, CORP)) as relay:
        for i in range(10):
            relay.put(SENDER, [f"user{i}@corp.test"])
        await until(lambda: len(first.messages) == 10)
        await idle(relay)
    assert second.connections == 0


async def test_mx_failover_to_the_next_preference(tmp_path, dnsmasq, two_mx):
    _, second = two_mx
    assert _nothing_listens("127.0.0.4", second.port)
    server = dnsmasq(
        hosts={"mx1.corp.test": ["127.0.0.4"], "mx2.corp.test": ["127.0.0.3"]},
        mx={"corp.test": [(10, "mx1.corp.test"), (20, "mx2.corp.test")]},
    )
    route = configs.route("Corp", "corp.test", second.port, mx_lookup=True)
    async with InProcessRelay(tmp_path, integration_toml(tmp_path, server, route, CORP)) as relay:
        for i in range(5):
            relay.put(SENDER, [f"user{i}@corp.test"])
        await until(lambda: len(second.messages) == 5)
        await idle(relay)
        assert relay.spooled() == []
        # mx1 is tried by the attempts under way when it failed, then held
        # down (relay.health): later messages go straight to mx2.
        unreachable = relay.sample("relay_delivery_attempts_total", route="Corp",
                                   host="corp.test", result="unreachable")  # fmt: skip
        assert unreachable is not None and 1 <= unreachable <= 5
        assert relay.sample("relay_delivery_attempts_total", route="Corp", host="corp.test",
                            result="delivered") == 5  # fmt: skip


async def test_implicit_mx_uses_the_domains_own_address(tmp_path, dnsmasq):
    server = dnsmasq(hosts={"plain.test": ["127.0.0.1"]})
    async with Sink() as sink:
        route = configs.route("Corp", "plain.test", sink.port, mx_lookup=True)
        async with InProcessRelay(
            tmp_path, integration_toml(tmp_path, server, route, CORP)
        ) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: sink.messages)
            assert relay.spooled() == []
    assert sink.messages[0].rcpt_tos == ["bob@corp.test"]


async def test_null_mx_sender_domain_drops_the_bounce(tmp_path, dnsmasq):
    """A bounce to a null-MX domain fails for good, and a bounce is never bounced."""
    server = dnsmasq(hosts={"mx1.corp.test": ["127.0.0.1"]}, mx={"nullmx.test": [(0, ".")]})
    async with Sink(replies={"RCPT": "550 5.1.1 no such user"}) as sink:
        route = configs.route("Corp", "mx1.corp.test", sink.port)
        async with InProcessRelay(
            tmp_path, integration_toml(tmp_path, server, route, CORP)
        ) as relay:
            await relay.send_and_settle(
                "alice@nullmx.test",
                ["nobody@corp.test"],
                when=lambda: relay.sample("relay_bounces_total", reason="double_bounce"),
            )
            assert relay.spooled() == []
            assert relay.sample("relay_bounces_total", reason="remote_permanent") == 1
            assert relay.sample("relay_recipients_total", route="(direct)",
                                outcome="bounced") == 1  # fmt: skip
            assert relay.sample("relay_recipients_total", route="(direct)",
                                outcome="deferred") == 0  # fmt: skip
    assert sink.messages == []


@pytest.mark.parametrize(
    ("host", "mx_lookup"),
    [("typo.corp.test", False), ("nxdomain.test", True), ("nullmx.test", True)],
    ids=["host-nxdomain", "mx-nxdomain", "mx-null"],
)
async def test_misconfigured_route_host_defers_and_counts(tmp_path, dnsmasq, host, mx_lookup):
    server = dnsmasq(mx={"nullmx.test": [(0, ".")]})
    route = configs.route("Corp", host, 2525, mx_lookup=mx_lookup)
    # Long backoff: exactly one attempt to count.
    toml = integration_toml(tmp_path, server, route, CORP, min_backoff="10m", max_backoff="1h")
    async with InProcessRelay(tmp_path, toml) as relay:
        envelope = relay.put(SENDER, ["bob@corp.test"])
        await until(lambda: relay.sample("relay_recipients_total", route="Corp",
                                         outcome="deferred"))  # fmt: skip
        await idle(relay)
        assert relay.sample("relay_route_dns_errors_total", route="Corp", host=host) == 1
        assert relay.sample("relay_recipients_total", route="Corp", outcome="bounced") == 0
        [left] = relay.spooled()
        assert left.id == envelope.id
        assert left.pending[0].last_reply.code == 451
        assert left.pending[0].last_reply.status == (4, 4, 4)
    for reason in ("remote_permanent", "dns_permanent", "tls_policy", "expired"):
        assert relay.sample("relay_bounces_total", reason=reason) == 0


@pytest.mark.parametrize("mx_lookup", [False, True], ids=["host", "mx"])
async def test_servfail_defers(tmp_path, dnsmasq, mx_lookup):
    server = dnsmasq(servfail=["broken.test"])
    host = "broken.test" if mx_lookup else "mx.broken.test"
    route = configs.route("Corp", host, 2525, mx_lookup=mx_lookup)
    toml = integration_toml(tmp_path, server, route, CORP, min_backoff="10m", max_backoff="1h")
    async with InProcessRelay(tmp_path, toml) as relay:
        await relay.send_and_settle(
            SENDER,
            ["bob@corp.test"],
            when=lambda: relay.sample("relay_recipients_total", route="Corp", outcome="deferred"),
        )
        [left] = relay.spooled()
        assert left.pending[0].last_reply.status == (4, 4, 3)
        # A DNS outage is not a configuration problem.
        assert relay.sample("relay_route_dns_errors_total", route="Corp", host=host) == 0
        assert relay.sample("relay_bounces_total", reason="dns_permanent") == 0


async def test_ipv6_address_is_tried_first(tmp_path, dnsmasq):
    try:
        v6, v4 = await sinks_on_one_port(["::1", "127.0.0.1"])
    except OSError as exc:  # no IPv6 loopback on this machine
        pytest.skip(f"cannot listen on [::1]: {exc}")
    try:
        server = dnsmasq(hosts={"dual.corp.test": ["127.0.0.1", "::1"]})
        route = configs.route("Corp", "dual.corp.test", v6.port)
        async with InProcessRelay(
            tmp_path, integration_toml(tmp_path, server, route, CORP)
        ) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: v6.messages)
        assert v4.connections == 0
    finally:
        await v6.stop()
        await v4.stop()
