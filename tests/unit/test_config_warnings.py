"""relay.lint: a valid config's warnings (rules that never match, unused routes, IP hosts)."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import configload, lint
from tests.unit.test_config import SERVER


def route(name: str, host: str, extra: str = "") -> str:
    return f'[[routes]]\nname = "{name}"\nhost = "{host}"\n{extra}\n'


def rule(route_name: str, *patterns: str) -> str:
    listed = ", ".join(f'"{p}"' for p in patterns)
    return f'[[rules]]\nrecipients = [{listed}]\nroute = "{route_name}"\n'


def warnings(tmp_path: Path, text: str) -> list[str]:
    path = tmp_path / "relay.toml"
    path.write_text(text)
    return [str(w) for w in lint.warnings(configload.load(path))]


A, B = route("A", "a.test"), route("B", "b.test")

WARN = {
    "rule after star": (
        A + B + rule("A", "*") + rule("B", "@example.test"),
        [
            "rules[2]: can never match: '@example.test' (rules[1] '*' matches it first)",
            "routes[2] 'B': no rule that can match sends mail to it",
        ],
    ),
    "identical pattern": (
        A + B + rule("A", "@example.test") + rule("B", "@EXAMPLE.test"),
        [
            "rules[2]: can never match: '@EXAMPLE.test' (rules[1] '@example.test' matches it",
            "routes[2] 'B': no rule that can match sends mail to it",
        ],
    ),
    "address under an earlier domain": (
        A + B + rule("A", "@example.test") + rule("B", "ceo@example.test", "@other.test"),
        ["rules[2]: recipients: never matches 'ceo@example.test' (rules[1] '@example.test'"],
    ),
    "unused route": (
        A + B + rule("A", "@example.test"),
        ["routes[2] 'B': no rule that can match sends mail to it (nor [bounces] route)"],
    ),
    "ip host with validate_hostname": (
        route("A", "192.0.2.1") + rule("A", "*"),
        ["routes[1] 'A': host: '192.0.2.1' is an IP address and validate_hostname is on"],
    ),
    "ip host in a table": (
        '[[routes]]\nname = "A"\n[[routes.primary]]\nhost = "a.test"\nload = 100\n'
        '[[routes.secondary]]\nhost = "2001:db8::1"\nload = 100\n' + rule("A", "*"),
        ["routes[1] 'A': secondary[1].host: '2001:db8::1' is an IP address"],
    ),
}


@pytest.mark.parametrize(("text", "expected"), WARN.values(), ids=WARN.keys())
def test_each_warning_is_named(tmp_path: Path, text: str, expected: list[str]) -> None:
    found = warnings(tmp_path, SERVER + text)
    for wanted in expected:
        assert any(wanted in line for line in found), f"{wanted!r} not in {found}"
    assert len(found) == len(expected), found


OFF = "require_tls = false\nrequire_ca_signed = false\nvalidate_hostname = false"

# The good neighbours: one step away from a warning, and clean.
CLEAN = {
    "star last": A + B + rule("B", "@example.test") + rule("A", "*"),
    "address before its domain": A + B + rule("B", "ceo@example.test") + rule("A", "@example.test"),
    "other domain after a domain": A + B + rule("A", "@example.test") + rule("B", "@b.example"),
    "route used only by bounces": A + B + rule("A", "*") + '[bounces]\nroute = "B"\n',
    "ip host without validate_hostname": route("A", "192.0.2.1", OFF) + rule("A", "*"),
}


@pytest.mark.parametrize("text", CLEAN.values(), ids=CLEAN.keys())
def test_good_neighbours_have_no_warning(tmp_path: Path, text: str) -> None:
    assert warnings(tmp_path, SERVER + text) == []
