"""Served domains: no direct route back to ourselves; U-labels compare as A-labels."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from relay import configload
from relay.addresses import domain_key
from relay.config import DIRECT_ROUTE, Config, Host, Rule
from relay.configload import ConfigError
from relay.routing import route_for

#: The envelope sender of the mail being routed (no rule here matches senders).
S = "alice@sender.test"

TOML = """
[server]
hostname = "relay.example.test"
domains = ["corp.test", "other.test", "bücher.example"]
relay_networks = ["127.0.0.0/8"]

[[routes]]
name = "Exchange"
host = "mail.corp.test"

[[routes]]
name = "Books"
host = "mail.books.test"

[[rules]]
recipients = ["@corp.test"]
route = "Exchange"

[[rules]]
recipients = ["@BÜCHER.example", "kontakt@xn--mller-kva.example"]
route = "Books"
"""


def load(tmp_path: Path, text: str = TOML) -> Config:
    return configload.parse(tomllib.loads(text), tmp_path / "relay.toml")


# --- finding 4: a served domain never goes to its own MX ----------------------


@pytest.mark.parametrize("address", ["bob@other.test", "bob@Other.Test.", "x@OTHER.TEST"])
def test_served_domain_without_a_rule_never_goes_direct(tmp_path: Path, address: str) -> None:
    # other.test's public MX is this relay: the direct route would loop.
    assert route_for(load(tmp_path), address, client_trusted=True, sender=S) is None


def test_foreign_domain_still_goes_direct_for_a_trusted_client(tmp_path: Path) -> None:
    route = route_for(load(tmp_path), "bob@elsewhere.test", client_trusted=True, sender=S)
    assert route is not None and route.name == DIRECT_ROUTE


# --- finding 3: U-labels (RFC 6531 section 3.3) are A-labels (RFC 5890) -------


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example.", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("Corp.Test", "corp.test"),
        ("例え.jp", "xn--r8jz45g.jp"),
        # Not convertible (an empty label): lower-cased, as written.
        ("Bü..example", "bü..example"),
    ],
)
def test_domain_key(text: str, key: str) -> None:
    assert domain_key(text) == key


def test_config_keeps_u_label_domains_as_a_labels(tmp_path: Path) -> None:
    cfg = load(tmp_path)
    assert cfg.server.domains == ("corp.test", "other.test", "xn--bcher-kva.example")


def test_config_still_refuses_a_bad_international_domain(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, TOML.replace('"bücher.example"', '"bü cher.example"'))
    assert any(p.field == "domains" for p in info.value.problems)


@pytest.mark.parametrize(
    "address",
    [
        "anna@bücher.example",
        "anna@BÜCHER.EXAMPLE",
        "anna@xn--bcher-kva.example",
        "kontakt@müller.example",
        "Kontakt@xn--MLLER-KVA.example",
    ],
)
def test_rules_match_either_label_form(tmp_path: Path, address: str) -> None:
    for trusted in (False, True):
        route = route_for(load(tmp_path), address, client_trusted=trusted, sender=S)
        assert route is not None and route.name == "Books"


def test_rule_matches_without_config_loading() -> None:
    rule = Rule(("@bücher.example",), "Books")
    assert rule.matches("a@xn--bcher-kva.example", "")
    assert not rule.matches("a@bucher.example", "")


def test_direct_route_asks_dns_for_the_a_label(tmp_path: Path) -> None:
    route = route_for(load(tmp_path), "user@例え.jp", client_trusted=True, sender=S)
    assert route is not None and route.name == DIRECT_ROUTE
    assert route.primary == (Host("xn--r8jz45g.jp", 25, 100),)
