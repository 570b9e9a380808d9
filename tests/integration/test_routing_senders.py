"""Rules by envelope sender: config, matching, check-config, lint, audit diff,
the inbound RCPT check and delivery through a different sink."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path
from types import SimpleNamespace

import pytest

from relay import config, configdiff, configload, errors, lint
from relay.config import Listen, MetricsConfig
from relay.routing import bounce_route, route_for
from tests.support import configs
from tests.support.inbound import RawClient, running_inbound
from tests.support.integ import InProcessRelay, integration_toml
from tests.support.sink import Sink

SERVER = """
[server]
hostname = "relay.test"
domains = ["corp.test"]
"""

ROUTES = """
[[routes]]
name = "Billing"
host = "billing-smarthost.test"

[[routes]]
name = "Corp"
host = "mail.corp.test"

[[routes]]
name = "Outbound"
host = "smarthost.test"
"""

RULES = """
[[rules]]
senders = ["@billing.corp.test", "invoices@corp.test"]
route = "Billing"

[[rules]]
senders = ["ceo@corp.test"]
recipients = ["@partner.test"]
route = "Outbound"

[[rules]]
recipients = ["@corp.test"]
route = "Corp"

[[rules]]
recipients = ["*"]
route = "Outbound"
"""


def load(tmp_path: Path, text: str = SERVER + ROUTES + RULES) -> config.Config:
    return configload.parse(tomllib.loads(text), tmp_path / "relay.toml")


@pytest.mark.parametrize(
    ("sender", "recipient", "route"),
    [
        # A rule by sender only takes every recipient of that sender.
        ("a@billing.corp.test", "bob@corp.test", "Billing"),
        ("Invoices@Corp.Test", "x@elsewhere.test", "Billing"),
        # Both lists given: both must match.
        ("ceo@corp.test", "p@partner.test", "Outbound"),
        ("ceo@corp.test", "bob@corp.test", "Corp"),
        ("other@corp.test", "p@partner.test", "Outbound"),  # by the "*" rule
        ("other@corp.test", "bob@corp.test", "Corp"),
        # The null sender matches no sender pattern but "*".
        ("", "bob@corp.test", "Corp"),
    ],
)
def test_first_matching_rule_by_sender_and_recipient(
    tmp_path: Path, sender: str, recipient: str, route: str
) -> None:
    found = route_for(load(tmp_path), recipient, client_trusted=False, sender=sender)
    assert found is not None and found.name == route


def test_a_dsn_to_a_sender_is_not_routed_by_that_senders_rule(tmp_path: Path) -> None:
    # A DSN to invoices@corp.test is mail *to* it from <>: the recipient rules decide.
    assert bounce_route(load(tmp_path), "invoices@corp.test").name == "Corp"


def test_a_rule_needs_recipients_or_senders(tmp_path: Path) -> None:
    text = SERVER + ROUTES + '[[rules]]\nroute = "Corp"\n'
    with pytest.raises(configload.ConfigError) as info:
        load(tmp_path, text)
    (problem,) = [str(p) for p in info.value.problems]
    assert problem.startswith("rules[1]: recipients: is required (or senders)")
    text = SERVER + ROUTES + '[[rules]]\nsenders = ["bad@"]\nroute = "Corp"\n'
    with pytest.raises(configload.ConfigError) as info:
        load(tmp_path, text)
    (problem,) = [str(p) for p in info.value.problems]
    assert problem == 'rules[1]: senders: \'bad@\' is not an address, "@domain" or "*"'
    text = SERVER + ROUTES + '[[rules]]\nsenders = []\nroute = "Corp"\n'
    with pytest.raises(configload.ConfigError) as info:
        load(tmp_path, text)
    assert [str(p) for p in info.value.problems][0].startswith("rules[1]: senders: must list")


def test_check_config_shows_the_senders(tmp_path: Path) -> None:
    lines = configdiff.describe(load(tmp_path))
    first = "rule 1: senders @billing.corp.test, invoices@corp.test; any recipient -> 'Billing'"
    assert first in lines
    assert "rule 2: senders ceo@corp.test; recipients @partner.test -> 'Outbound'" in lines
    assert "rule 3: @corp.test -> 'Corp'" in lines


def test_a_sender_restricted_catch_all_does_not_shadow_later_rules(tmp_path: Path) -> None:
    text = (
        SERVER
        + ROUTES
        + """
[[rules]]
senders = ["@billing.corp.test"]
recipients = ["*"]
route = "Billing"

[[rules]]
recipients = ["@corp.test"]
route = "Corp"

[[rules]]
recipients = ["*"]
route = "Outbound"
"""
    )
    assert [str(w) for w in lint.warnings(load(tmp_path, text))] == []


def test_a_sender_rule_after_a_catch_all_can_never_match(tmp_path: Path) -> None:
    text = (
        SERVER
        + ROUTES
        + """
[[rules]]
recipients = ["*"]
route = "Corp"

[[rules]]
senders = ["@billing.corp.test"]
route = "Billing"

[[rules]]
recipients = ["x@corp.test"]
route = "Outbound"
"""
    )
    found = [str(w) for w in lint.warnings(load(tmp_path, text))]
    assert "rules[2]: can never match: '*' (rules[1] '*' matches it first)" in found
    assert any(w.startswith("routes[1] 'Billing': no rule that can match") for w in found)


def test_the_audit_diff_records_senders(tmp_path: Path) -> None:
    old = load(tmp_path)
    new_rules = RULES.replace('"invoices@corp.test"', '"payroll@corp.test"')
    new = load(tmp_path, SERVER + ROUTES + new_rules)
    changed = configdiff.diff(old, new)["rules"]["changed"]
    assert changed == {
        "rules[1]": {
            "senders": [
                ["@billing.corp.test", "invoices@corp.test"],
                ["@billing.corp.test", "payroll@corp.test"],
            ]
        }
    }
    # A rule without senders snapshots as before senders existed.
    assert configdiff.snapshot(old)["rules"][2] == {"recipients": ["@corp.test"], "route": "Corp"}


async def test_inbound_accepts_a_recipient_only_a_sender_rule_routes(tmp_path: Path) -> None:
    text = (
        SERVER
        + f'[queue]\npath = "{tmp_path / "spool"}"\n'
        + ROUTES
        + """
[[rules]]
senders = ["app@corp.test"]
recipients = ["@corp.test"]
route = "Corp"
"""
    )
    cfg = configload.parse(tomllib.loads(text), tmp_path / "relay.toml")
    server = dataclasses.replace(cfg.server, listen=(Listen("127.0.0.1", 0),))
    cfg = dataclasses.replace(cfg, server=server, metrics=MetricsConfig(listen=None))
    async with running_inbound(cfg) as h, await RawClient.connect(h.port) as client:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert (await client.cmd("MAIL FROM:<someone@corp.test>"))[0] == 250
        assert await client.cmd("RCPT TO:<bob@corp.test>") == (550, str(errors.NO_ROUTE))
        assert (await client.cmd("RSET"))[0] == 250
        assert (await client.cmd("MAIL FROM:<app@corp.test>"))[0] == 250
        assert (await client.cmd("RCPT TO:<bob@corp.test>"))[0] == 250


async def test_one_senders_mail_goes_through_its_own_sink(tmp_path: Path) -> None:
    async with Sink() as corp, Sink() as billing:
        routes = configs.route("Corp", "127.0.0.1", corp.port) + configs.route(
            "Billing", "127.0.0.1", billing.port
        )
        rules = (
            '[[rules]]\nsenders = ["@billing.corp.test"]\nroute = "Billing"\n'
            '[[rules]]\nrecipients = ["@corp.test"]\nroute = "Corp"\n'
        )
        dns = SimpleNamespace(ip="127.0.0.1", port=53)  # IP-literal hosts: never asked
        toml = integration_toml(tmp_path, dns, routes, rules)  # type: ignore[arg-type]
        async with InProcessRelay(tmp_path, toml) as relay:
            relay.put("alice@sender.test", ["bob@corp.test"])
            await relay.send_and_settle(
                "invoices@billing.corp.test",
                ["bob@corp.test"],
                when=lambda: corp.messages and billing.messages,
            )
    assert [m.mail_from for m in corp.messages] == ["alice@sender.test"]
    assert [m.mail_from for m in billing.messages] == ["invoices@billing.corp.test"]
