"""configdiff.diff: what changed between two configs, route by route."""

from __future__ import annotations

import json
from pathlib import Path

from relay import configdiff
from tests.support.ops import BASE, load_text


def test_identical_configs_have_an_empty_diff(tmp_path: Path) -> None:
    old = load_text(tmp_path, BASE)
    new = load_text(tmp_path, BASE)
    changes = configdiff.diff(old, new)
    assert configdiff.diff_is_empty(changes)
    assert changes["routes"] == {"added": [], "removed": [], "changed": {}}
    assert changes["rules"] == {"added": [], "removed": [], "changed": {}}
    assert changes["server"] == {}
    assert set(changes) == {"routes", "rules", *configdiff.DIFF_SECTIONS}


def test_changed_port_and_tls_option_of_a_single_host_route(tmp_path: Path) -> None:
    old = load_text(tmp_path, BASE)
    new = load_text(
        tmp_path,
        BASE.replace("port = 25\n", "port = 587\nvalidate_hostname = false\n"),
    )
    changes = configdiff.diff(old, new)
    assert changes["routes"]["changed"] == {
        "On-prem": {"port": [25, 587], "validate_hostname": [True, False]}
    }
    assert not configdiff.diff_is_empty(changes)


def test_route_added_removed_and_host_table_changed(tmp_path: Path) -> None:
    old = load_text(tmp_path, BASE)
    text = BASE.replace('name = "On-prem"', 'name = "Exchange"').replace(
        'route = "On-prem"', 'route = "Exchange"'
    )
    text = text.replace("load = 50\n[[routes.primary]]", "load = 70\n[[routes.primary]]", 1)
    text = text.replace('mx2.corp.example.com"\nload = 50', 'mx2.corp.example.com"\nload = 30')
    new = load_text(tmp_path, text)
    changes = configdiff.diff(old, new)
    assert changes["routes"]["added"] == ["Exchange"]
    assert changes["routes"]["removed"] == ["On-prem"]
    assert changes["routes"]["changed"] == {
        "Split": {
            "primary": [
                ["mx1.corp.example.com:25 load 50", "mx2.corp.example.com:25 load 50"],
                ["mx1.corp.example.com:25 load 70", "mx2.corp.example.com:25 load 30"],
            ]
        }
    }
    assert changes["rules"]["changed"] == {"rules[1]": {"route": ["On-prem", "Exchange"]}}


def test_rules_are_compared_by_position(tmp_path: Path) -> None:
    old = load_text(tmp_path, BASE)
    new = load_text(tmp_path, BASE + '\n[[rules]]\nrecipients = ["*"]\nroute = "Split"\n')
    changes = configdiff.diff(old, new)
    assert changes["rules"]["added"] == ["rules[2]"]
    back = configdiff.diff(new, old)
    assert back["rules"]["removed"] == ["rules[2]"]


def test_server_and_section_fields_are_stringified(tmp_path: Path) -> None:
    old = load_text(tmp_path, BASE)
    text = BASE.replace('["127.0.0.0/8"]', '["127.0.0.0/8", "::1"]').replace(
        'path = "spool"', 'path = "spool2"\nmax_lifetime = "1d"'
    )
    text += '\n[dns]\nnameservers = ["127.0.0.1:5353", "[::1]:53"]\n'
    new = load_text(tmp_path, text)
    changes = configdiff.diff(old, new)
    assert changes["server"] == {
        "relay_networks": [["127.0.0.0/8"], ["127.0.0.0/8", "::1/128"]],
    }
    assert changes["queue"] == {
        "path": [str(tmp_path / "spool"), str(tmp_path / "spool2")],
        "max_lifetime": [432000.0, 86400.0],
    }
    assert changes["dns"] == {"nameservers": [[], ["127.0.0.1:5353", "[::1]:53"]]}


def test_diff_is_json_serialisable_and_deterministic(tmp_path: Path) -> None:
    old = load_text(tmp_path, BASE)
    new = load_text(tmp_path, BASE.replace("port = 25", "port = 2525"))
    first = json.dumps(configdiff.diff(old, new), sort_keys=False)
    assert first == json.dumps(configdiff.diff(old, new), sort_keys=False)
    assert json.loads(first) == configdiff.diff(old, new)


def test_single_route_becoming_multiple_shows_both_shapes(tmp_path: Path) -> None:
    old = load_text(tmp_path, BASE)
    text = BASE.replace(
        'host = "mail.corp.example.com"\nport = 25\n',
        '[[routes.primary]]\nhost = "mail.corp.example.com"\nload = 100\n',
    )
    new = load_text(tmp_path, text)
    fields = configdiff.diff(old, new)["routes"]["changed"]["On-prem"]
    assert fields == {
        "host": ["mail.corp.example.com", None],
        "port": [25, None],
        "primary": [None, ["mail.corp.example.com:25 load 100"]],
        "secondary": [None, []],
    }
