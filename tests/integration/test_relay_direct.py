"""The implicit route over real DNS: mail to a domain's own MX on port 25.

Bounces with no ``[bounces] route`` and no rule for the sender go to the
sender domain's MX; a relay_networks client's recipient that matches no
rule goes to the recipient domain's MX. Both use port 25, so the sinks
listen on 127.25.0.x:25; the tests skip where port 25 cannot be bound
(not root, or something already listens).
"""

from __future__ import annotations

import pytest

from tests.support import configs
from tests.support.integ import (
    SENDER,
    InProcessRelay,
    LoopbackSink,
    dsn_parts,
    integration_toml,
)
from tests.support.sink import Sink


@pytest.fixture
async def port25():
    """A sink on 127.25.0.1:25 (the sender's and the remote domain's MX)."""
    sink = LoopbackSink("127.25.0.1", 25)
    try:
        await sink.start()
    except OSError as exc:
        pytest.skip(f"cannot listen on 127.25.0.1:25: {exc}")
    yield sink
    await sink.stop()


async def test_bounce_goes_to_the_sender_domains_mx(tmp_path, dnsmasq, port25):
    server = dnsmasq(
        hosts={"mx1.corp.test": ["127.0.0.1"], "mx.sender.test": ["127.25.0.1"]},
        mx={"sender.test": [(10, "mx.sender.test")]},
    )
    async with Sink(replies={"RCPT": "550 5.1.1 no such user"}) as corp:
        route = configs.route("Corp", "mx1.corp.test", corp.port)
        toml = integration_toml(tmp_path, server, route, configs.rule("Corp", "@corp.test"))
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: port25.messages)
            assert relay.spooled() == []
            assert relay.sample("relay_recipients_total", route="(direct)",
                                outcome="delivered") == 1  # fmt: skip
            assert relay.sample("relay_delivery_attempts_total", route="(direct)", host="(mx)",
                                result="delivered") == 1  # fmt: skip
    [dsn] = port25.messages
    assert dsn.rcpt_tos == [SENDER]
    _, _, [fields] = dsn_parts(dsn.data)
    assert fields["status"] == "5.1.1"


async def test_trusted_client_relays_to_the_recipient_domains_mx(tmp_path, dnsmasq, port25):
    server = dnsmasq(
        hosts={"mx.elsewhere.test": ["127.25.0.1"]},
        mx={"elsewhere.test": [(10, "mx.elsewhere.test")]},
    )
    toml = integration_toml(
        tmp_path, server, configs.route("Corp", "mx1.corp.test", 2525),
        configs.rule("Corp", "@corp.test"), relay_networks=["192.0.2.0/24"],
    )  # fmt: skip
    async with InProcessRelay(tmp_path, toml) as relay:
        # InProcessRelay.put spools with client 192.0.2.10, inside relay_networks.
        await relay.send_and_settle(SENDER, ["carol@elsewhere.test"], when=lambda: port25.messages)
        assert relay.spooled() == []
    assert port25.messages[0].rcpt_tos == ["carol@elsewhere.test"]


async def test_recipient_domain_nxdomain_bounces(tmp_path, dnsmasq, port25):
    """For the recipient's own domain (no rule, trusted client), NXDOMAIN is permanent."""
    server = dnsmasq(
        hosts={"mx.sender.test": ["127.25.0.1"]}, mx={"sender.test": [(10, "mx.sender.test")]}
    )
    toml = integration_toml(
        tmp_path, server, configs.route("Corp", "mx1.corp.test", 2525),
        configs.rule("Corp", "@corp.test"), relay_networks=["192.0.2.0/24"],
    )  # fmt: skip
    async with InProcessRelay(tmp_path, toml) as relay:
        await relay.send_and_settle(SENDER, ["carol@nowhere.test"], when=lambda: port25.messages)
        assert relay.spooled() == []
        assert relay.sample("relay_bounces_total", reason="dns_permanent") == 1
    _, _, [fields] = dsn_parts(port25.messages[0].data)
    assert fields["final-recipient"] == "rfc822; carol@nowhere.test"
    assert fields["status"] == "5.1.2"
