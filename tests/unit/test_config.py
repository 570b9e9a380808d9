"""Config loading and validation: one case per rule, each bad case beside its good neighbour."""

from __future__ import annotations

import textwrap
import tomllib
from pathlib import Path

import pytest

from relay import config, configdiff, configload, configvalues
from relay.config import Host, Listen, TlsPolicy
from relay.configload import ConfigError
from tests.support.paths import ROOT

SERVER = """
[server]
hostname = "relay.test"
domains = ["example.test"]
"""

SINGLE = """
[[routes]]
name = "R"
host = "mx.example.test"
port = 25
"""

RULE = """
[[rules]]
recipients = ["@example.test"]
route = "R"
"""


def load(tmp_path: Path, text: str) -> config.Config:
    path = tmp_path / "relay.toml"
    path.write_text(textwrap.dedent(text))
    return configload.load(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    return [str(p) for p in info.value.problems]


def test_minimal_config_gets_every_default(tmp_path: Path) -> None:
    cfg = load(tmp_path, SERVER + SINGLE + RULE)
    route = cfg.routes[0]
    assert route.tls == TlsPolicy(True, True, True)
    assert route.mx_lookup is False
    assert route.primary == (Host("mx.example.test", 25, 100),)
    assert route.single and not route.implicit
    assert cfg.server.listen == (Listen("127.0.0.1", 2525),)
    assert cfg.server.max_message_size == 36_700_160
    assert cfg.server.max_recipients == 100
    assert cfg.queue.max_lifetime == 5 * 86400
    assert cfg.queue.min_backoff == 60 and cfg.queue.max_backoff == 3600
    assert cfg.delivery.hold_down == 30 and cfg.delivery.max_hold_down == 600
    assert cfg.queue.path == (tmp_path / "var/spool").resolve()
    assert cfg.audit.path == (tmp_path / "var/audit.log").resolve()
    assert cfg.metrics.listen == Listen("127.0.0.1", 9325)
    assert cfg.dns.nameservers == ()
    assert cfg.log.format == "text"
    assert cfg.bounces.route == ""
    assert cfg.bounces.notify == ()
    assert len(cfg.sha256) == 64


def test_bounce_notify_addresses(tmp_path: Path) -> None:
    text = '[bounces]\nnotify = ["postmaster@example.com", "ops@example.com", "ops@example.com"]'
    cfg = load(tmp_path, SERVER + SINGLE + RULE + text)
    assert cfg.bounces.notify == ("postmaster@example.com", "ops@example.com")


def test_multiple_host_route(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        SERVER
        + """
        [[routes]]
        name = "R"
        [[routes.primary]]
        host = "mx1.example.test"
        load = 70
        [[routes.primary]]
        host = "192.0.2.7"
        port = 587
        load = 30
        [[routes.secondary]]
        host = "backup.example.test"
        port = 2525
        load = 100
        """
        + RULE,
    )
    route = cfg.routes[0]
    assert not route.single
    assert route.primary == (Host("mx1.example.test", 25, 70), Host("192.0.2.7", 587, 30))
    assert route.secondary == (Host("backup.example.test", 2525, 100),)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("4h", 14400), ("5d", 432000), ("500ms", 0.5), ("1.5h", 5400)],
)
def test_durations(text: str, seconds: float) -> None:
    assert configvalues.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "m5", "-1s", "5 days"])
def test_bad_durations(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        configvalues.parse_duration(text)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "etc"
    sub.mkdir()
    (sub / "ca.pem").write_text("x")
    path = sub / "relay.toml"
    path.write_text(
        textwrap.dedent(
            SERVER
            + """
            [queue]
            path = "spool"
            [audit]
            path = "/var/tmp/audit.log"
            [tls]
            ca_file = "ca.pem"
            """
            + SINGLE
        )
    )
    cfg = configload.load(path)
    assert cfg.queue.path == sub / "spool"
    assert cfg.audit.path == Path("/var/tmp/audit.log")
    assert cfg.tls.ca_file == sub / "ca.pem"


# Each case: a config fragment that is wrong in exactly one way, and the
# text the problem must contain (route/table and field included).
BAD = {
    "missing name": (SERVER + '[[routes]]\nhost = "a.test"', ["routes[1]: name: is required"]),
    "empty name": (SERVER + '[[routes]]\nname = " "\nhost = "a.test"', ["name: is required"]),
    "duplicate name": (
        SERVER + SINGLE + SINGLE,
        ["routes[2] 'R': name: duplicate: routes[1]"],
    ),
    "single and multiple": (
        SERVER + SINGLE + '[[routes.primary]]\nhost = "b.test"\nload = 100',
        ["routes[1] 'R': has host and port beside [[routes.primary]] tables: a route has either"],
    ),
    "neither": (SERVER + '[[routes]]\nname = "R"', ["routes[1] 'R': has no host: give host"]),
    "secondary without primary": (
        SERVER + '[[routes]]\nname = "R"\n[[routes.secondary]]\nhost = "b.test"\nload = 100',
        ["routes[1] 'R': has [[routes.secondary]] but no [[routes.primary]]"],
    ),
    "loads not 100": (
        SERVER
        + '[[routes]]\nname = "R"\n[[routes.primary]]\nhost = "a.test"\nload = 50\n'
        + '[[routes.primary]]\nhost = "b.test"\nload = 40',
        ["routes[1] 'R': primary: loads must add up to 100, got 50 + 40 = 90"],
    ),
    "load zero": (
        SERVER + '[[routes]]\nname = "R"\n[[routes.primary]]\nhost = "a.test"\nload = 0',
        ["primary[1].load: must be a whole number from 1 to 100, got 0"],
    ),
    "load not whole": (
        SERVER + '[[routes]]\nname = "R"\n[[routes.primary]]\nhost = "a.test"\nload = 99.5',
        ["primary[1].load: must be a whole number"],
    ),
    "load missing": (
        SERVER + '[[routes]]\nname = "R"\n[[routes.secondary]]\nhost = "a.test"\n'
        '[[routes.primary]]\nhost = "b.test"',
        ["primary[1].load", "secondary[1].load"],
    ),
    "port 465": (
        SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nport = 465',
        ["port: port 465 (implicit TLS) is not supported; use 587 or 25"],
    ),
    "port 80": (
        SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nport = 80',
        ["port: port 80 is not allowed; use 25, 587, or 1024-65535"],
    ),
    "port 70000": (
        SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nport = 70000',
        ["port 70000 is not allowed"],
    ),
    "port string": (
        SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nport = "25"',
        ["port: '25' is not a whole number"],
    ),
    "table port 465": (
        SERVER + '[[routes]]\nname = "R"\n[[routes.primary]]\nhost = "a.test"\nport = 465\n'
        "load = 100",
        ["primary[1].port: port 465"],
    ),
    "bad host": (SERVER + '[[routes]]\nname = "R"\nhost = "a..test"', ["host: 'a..test' is not"]),
    "host with underscore": (
        SERVER + '[[routes]]\nname = "R"\nhost = "a_b.test"',
        ["host: 'a_b.test' is not a valid host name"],
    ),
    "mx lookup on an IP": (
        SERVER + '[[routes]]\nname = "R"\nhost = "192.0.2.1"\nmx_lookup = true',
        ["host: '192.0.2.1' is an IP address; with mx_lookup it must be a domain"],
    ),
    "ca_signed without tls": (
        SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nrequire_tls = false\n'
        "validate_hostname = false",
        ["require_ca_signed: is on (the default) but needs require_tls = true"],
    ),
    "hostname without ca_signed": (
        SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nrequire_ca_signed = false',
        ["validate_hostname: is on (the default) but needs require_ca_signed = true"],
    ),
    "option not boolean": (
        SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nrequire_tls = "yes"',
        ["require_tls: must be true or false"],
    ),
    "unknown route key": (
        SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nrequre_tls = false',
        ["routes[1] 'R': requre_tls: unknown key; did you mean 'require_tls'?"],
    ),
    "unknown host key": (
        SERVER + '[[routes]]\nname = "R"\n[[routes.primary]]\nhost = "a.test"\nlaod = 100',
        ["primary[1].laod: unknown key; did you mean 'load'?"],
    ),
    "unknown table": (SERVER + "[serverr]\n", ["serverr: unknown key; did you mean 'server'?"]),
    "unknown server key": (SERVER + "domian = 1\n", ["server: domian: unknown key"]),
    "rule names no route": (
        SERVER + SINGLE + '[[rules]]\nrecipients = ["*"]\nroute = "Q"',
        ["rules[1]: route: no route is named 'Q'"],
    ),
    "rule route typo": (
        SERVER + SINGLE.replace('"R"', '"Exchange"') + '[[rules]]\nrecipients = ["*"]\n'
        'route = "Exchang"',
        ["did you mean 'Exchange'?"],
    ),
    "rule bad pattern": (
        SERVER + SINGLE + '[[rules]]\nrecipients = ["user@"]\nroute = "R"',
        ["rules[1]: recipients: 'user@' is not an address"],
    ),
    "rule no patterns": (
        SERVER + SINGLE + '[[rules]]\nrecipients = []\nroute = "R"',
        ["rules[1]: recipients: must list at least one pattern"],
    ),
    "no domains": (
        "[server]\ndomains = []\n" + SINGLE,
        ["server: domains: must list at least one domain"],
    ),
    "domains missing": ("[server]\n" + SINGLE, ["server: domains: must list at least one"]),
    "bad listen": (SERVER + 'listen = ["127.0.0.1"]\n', ["server: listen: '127.0.0.1' is not"]),
    "bad listen port": (SERVER + 'listen = ["127.0.0.1:99999"]\n', ["port must be a number"]),
    "ipv6 listen without brackets": (SERVER + 'listen = ["::1:25"]\n', ["in brackets"]),
    "bad network": (
        SERVER + 'relay_networks = ["10.0.0.0/33"]\n',
        ["server: relay_networks: '10.0.0.0/33' is not a network"],
    ),
    "bad duration": (
        SERVER + SINGLE + '[queue]\nmax_lifetime = "5 days"',
        ["queue: max_lifetime: '5 days' is not a duration"],
    ),
    "backoff order": (
        SERVER + SINGLE + '[queue]\nmin_backoff = "2h"\nmax_backoff = "1h"',
        ["queue: min_backoff: must not be longer than max_backoff"],
    ),
    "hold-down order": (
        SERVER + SINGLE + '[delivery]\nhold_down = "1h"\nmax_hold_down = "10m"',
        ["delivery: hold_down: must not be longer than max_hold_down"],
    ),
    "zero hold-down": (
        SERVER + SINGLE + '[delivery]\nhold_down = "0s"',
        ["delivery: hold_down: must be longer than zero"],
    ),
    "missing cert file": (
        SERVER + 'tls_cert = "nope.crt"\ntls_key = "nope.key"\n' + SINGLE,
        ["server: tls_cert: file", "server: tls_key: file"],
    ),
    "cert without key": (
        SERVER + 'tls_cert = "relay.toml"\n' + SINGLE,
        ["server: tls_key: tls_cert and tls_key go together"],
    ),
    "missing ca file": (SERVER + SINGLE + '[tls]\nca_file = "ca.pem"', ["tls: ca_file: file"]),
    "bad nameserver": (
        SERVER + SINGLE + '[dns]\nnameservers = ["dns.example"]',
        ["dns: nameservers: 'dns.example' is not an IP address or ip:port"],
    ),
    "bad metrics listen": (SERVER + SINGLE + '[metrics]\nlisten = "9325"', ["metrics: listen"]),
    "bad log format": (SERVER + SINGLE + '[log]\nformat = "xml"', ["log: format: 'xml'"]),
    "bounce route unknown": (
        SERVER + SINGLE + '[bounces]\nroute = "Q"',
        ["bounces: route: no route is named 'Q'"],
    ),
    "max_recipients zero": (SERVER + "max_recipients = 0\n" + SINGLE, ["max_recipients: must be"]),
    "notify not a list": (
        SERVER + SINGLE + '[bounces]\nnotify = "postmaster@example.com"',
        ["bounces: notify: must be a list"],
    ),
    "notify not addresses": (
        SERVER + SINGLE + '[bounces]\nnotify = ["postmaster", "<pm@example.com>", "pm@bad_host"]',
        [
            "bounces: notify: 'postmaster' is not a mail address",
            "bounces: notify: '<pm@example.com>' is not a mail address",
            "bounces: notify: 'pm@bad_host' is not a mail address",
        ],
    ),
}


@pytest.mark.parametrize(("text", "expected"), BAD.values(), ids=BAD.keys())
def test_each_problem_is_named(tmp_path: Path, text: str, expected: list[str]) -> None:
    found = problems(tmp_path, text)
    for wanted in expected:
        assert any(wanted in line for line in found), f"{wanted!r} not in {found}"


# The good neighbours: one step away from a bad case, and valid.
GOOD = {
    "port 25": SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nport = 25',
    "port 587": SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nport = 587',
    "port 1024": SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nport = 1024',
    "port 65535": SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nport = 65535',
    "ipv4 literal": SERVER + '[[routes]]\nname = "R"\nhost = "192.0.2.1"',
    "ipv6 literal": SERVER + '[[routes]]\nname = "R"\nhost = "2001:db8::1"',
    "mx lookup domain": SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nmx_lookup = true',
    "all tls off": SERVER
    + '[[routes]]\nname = "R"\nhost = "a.test"\nrequire_tls = false\n'
    + "require_ca_signed = false\nvalidate_hostname = false",
    "tls without ca": SERVER
    + '[[routes]]\nname = "R"\nhost = "a.test"\nrequire_ca_signed = false\n'
    + "validate_hostname = false",
    "ca without hostname": SERVER
    + '[[routes]]\nname = "R"\nhost = "a.test"\nvalidate_hostname = false',
    "loads 100": SERVER
    + '[[routes]]\nname = "R"\n[[routes.primary]]\nhost = "a.test"\nload = 60\n'
    + '[[routes.primary]]\nhost = "b.test"\nload = 40',
    "ipv6 listen": SERVER + 'listen = ["[::1]:2525", "127.0.0.1:2526"]\n' + SINGLE,
    "metrics off": SERVER + SINGLE + '[metrics]\nlisten = ""',
    "nameserver with port": SERVER + SINGLE + '[dns]\nnameservers = ["127.0.0.1:5353", "::1"]',
    "address rule": SERVER + SINGLE + '[[rules]]\nrecipients = ["a@example.test"]\nroute = "R"',
    "star rule": SERVER + SINGLE + '[[rules]]\nrecipients = ["*"]\nroute = "R"',
}


@pytest.mark.parametrize("text", GOOD.values(), ids=GOOD.keys())
def test_good_neighbours_are_valid(tmp_path: Path, text: str) -> None:
    load(tmp_path, text)


def test_all_problems_reported_at_once(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """
        [server]
        domains = []
        [[routes]]
        name = "A"
        host = "a.test"
        port = 465
        [[routes]]
        name = "B"
        [[routes.primary]]
        host = "b.test"
        load = 30
        [[rules]]
        recipients = ["*"]
        route = "C"
        [log]
        format = "xml"
        """,
    )
    assert len(found) == 5, found


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    found = problems(tmp_path, "[server\nhostname = 1\n")
    assert len(found) == 1
    assert "TOML syntax error" in found[0] and "line 1" in found[0] and "column" in found[0]


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        configload.load(tmp_path / "nope.toml")
    assert "cannot read config file" in str(info.value)


def test_rule_matching_first_match_wins(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        SERVER
        + SINGLE
        + SINGLE.replace('"R"', '"S"')
        + """
        [[rules]]
        recipients = ["boss@example.test"]
        route = "S"
        [[rules]]
        recipients = ["@example.test"]
        route = "R"
        [[rules]]
        recipients = ["*"]
        route = "S"
        """,
    )
    assert cfg.route_for("Boss@Example.test", "").name == "S"  # type: ignore[union-attr]
    assert cfg.route_for("other@example.test", "").name == "R"  # type: ignore[union-attr]
    assert cfg.route_for("x@elsewhere.test", "").name == "S"  # type: ignore[union-attr]


def test_direct_route_is_opportunistic_mx() -> None:
    route = config.direct_route("sender.test")
    assert route.mx_lookup and route.implicit
    assert route.tls == TlsPolicy(False, False, False)
    assert route.primary == (Host("sender.test", 25, 100),)


@pytest.mark.parametrize("section", [*configdiff.DIFF_SECTIONS, "admin"])
def test_every_field_of_a_section_is_a_key_the_file_accepts(tmp_path: Path, section: str) -> None:
    # The known keys come from the dataclass fields: each one is read (a
    # value of the wrong type is a problem of that key), none is unknown.
    cls = type(getattr(config.Config(Path("x"), "", config.ServerConfig()), section))
    # (Without the rest of [server] here, its domains are missing too.)
    head = "" if section == "server" else SERVER
    for key in config.toml_keys(cls):
        text = head + f"[{section}]\n{key} = {{ x = 1 }}\n" + SINGLE + RULE
        found = problems(tmp_path, text)
        assert [p for p in found if p.startswith(f"{section}: {key}: ")], (key, found)
        assert not [p for p in found if "unknown key" in p], (key, found)


def test_every_route_key_is_known(tmp_path: Path) -> None:
    for key in config.toml_keys(config.Route):
        if key not in ("name", "host", "port"):
            found = problems(tmp_path, SERVER + SINGLE + f"{key} = [0]\n" + RULE)
            assert [p for p in found if f"'R': {key}" in p], (key, found)
            assert not [p for p in found if "unknown key" in p], (key, found)


def test_embedded_default_is_config_relay_toml_as_packaged() -> None:
    root = ROOT
    assert configload.embedded_text() == (root / "config/relay.toml").read_text()
    # ... and a wheel carries it (pip install . without -e).
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert "default.toml" in project["tool"]["setuptools"]["package-data"]["relay"]
