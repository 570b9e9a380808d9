"""route_for and bounce_route over a real, validated config."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from relay import configload
from relay.config import DIRECT_ROUTE, Config, Host
from relay.routing import bounce_route, route_for

#: The envelope sender of the mail being routed (no rule here matches senders).
S = "alice@sender.test"

TOML = """
[server]
hostname = "relay.example.test"
domains = ["corp.test", "other.test"]
relay_networks = ["127.0.0.0/8"]

[[routes]]
name = "CEO"
host = "vip.corp.test"

[[routes]]
name = "Exchange"
host = "mail.corp.test"
port = 587

[[routes]]
name = "Catch-all"
mx_lookup = true
[[routes.primary]]
host = "corp.test"
load = 100

[[rules]]
recipients = ["ceo@corp.test"]
route = "CEO"

[[rules]]
recipients = ["@corp.test"]
route = "Exchange"

[[rules]]
recipients = ["*"]
route = "Catch-all"
"""


def load(tmp_path: Path, text: str = TOML, bounces: str = "") -> Config:
    if bounces:
        text += f'\n[bounces]\nroute = "{bounces}"\n'
    return configload.parse(tomllib.loads(text), tmp_path / "relay.toml")


def without_catch_all(tmp_path: Path) -> Config:
    return load(tmp_path, TOML.rsplit("[[rules]]", 1)[0])


@pytest.mark.parametrize(
    ("address", "route"),
    [
        ("ceo@corp.test", "CEO"),  # the first match wins over @corp.test
        ("CEO@Corp.Test", "CEO"),
        ("alice@corp.test", "Exchange"),
        ("bob@elsewhere.test", "Catch-all"),
    ],
)
def test_first_matching_rule(tmp_path: Path, address: str, route: str) -> None:
    for trusted in (False, True):
        found = route_for(load(tmp_path), address, client_trusted=trusted, sender=S)
        assert found is not None and found.name == route


def test_no_rule_untrusted_client_has_no_route(tmp_path: Path) -> None:
    cfg = without_catch_all(tmp_path)
    assert route_for(cfg, "bob@other.test", client_trusted=False, sender=S) is None


def test_no_rule_trusted_client_goes_direct(tmp_path: Path) -> None:
    cfg = without_catch_all(tmp_path)
    route = route_for(cfg, "bob@Elsewhere.Test.", client_trusted=True, sender=S)
    assert route is not None
    assert route.name == DIRECT_ROUTE and route.implicit and route.mx_lookup
    assert route.primary == (Host("elsewhere.test", 25, 100),)
    assert not route.tls.require_tls  # opportunistic TLS


@pytest.mark.parametrize("address", ["postmaster", "user@"])
def test_no_domain_never_goes_direct(tmp_path: Path, address: str) -> None:
    assert route_for(without_catch_all(tmp_path), address, client_trusted=True, sender=S) is None


def test_bounce_route_setting_wins(tmp_path: Path) -> None:
    cfg = load(tmp_path, bounces="Exchange")
    assert bounce_route(cfg, "alice@elsewhere.test").name == "Exchange"


def test_bounce_route_by_rules(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert bounce_route(cfg, "ceo@corp.test").name == "CEO"
    assert bounce_route(cfg, "x@elsewhere.test").name == "Catch-all"


def test_bounce_route_direct_to_sender_domain(tmp_path: Path) -> None:
    route = bounce_route(without_catch_all(tmp_path), "alice@Sender.Test")
    assert route.implicit and route.name == DIRECT_ROUTE
    assert route.primary == (Host("sender.test", 25, 100),)


@pytest.mark.parametrize("sender", ["", "MAILER-DAEMON"])
def test_bounce_route_needs_a_domain(tmp_path: Path, sender: str) -> None:
    with pytest.raises(ValueError, match="no domain"):
        bounce_route(without_catch_all(tmp_path), sender)
