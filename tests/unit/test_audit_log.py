"""The audit log: JSON lines of start, reload and refused reload, and `relay audit`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from relay import cli
from relay.audit import AuditLog, format_entry
from relay.configload import ConfigError, Problem
from tests.support.ops import BASE, load_text

T0 = 1_795_861_200.0  # 2026-11-28T10:20:00Z


def fixed_clock(start: float = T0):
    ticks = iter(range(1000))
    return lambda: start + 60 * next(ticks)


def test_first_start_records_every_route_and_rule_as_added(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE)
    log = AuditLog(cfg.audit.path, clock=fixed_clock())
    log.record_start(cfg)
    (entry,) = list(log.entries())
    assert entry["event"] == "start"
    assert entry["time"] == "2026-11-28T10:20:00Z"
    assert entry["path"] == str(cfg.source)
    assert entry["sha256"] == cfg.sha256
    assert entry["summary"] == {"routes": ["On-prem", "Split"], "rules": 1}
    assert entry["changes"]["routes"]["added"] == ["On-prem", "Split"]
    assert entry["changes"]["rules"]["added"] == ["rules[1]"]
    assert entry["changes"]["server"] == {}


def test_reload_records_hashes_and_route_changes(tmp_path: Path) -> None:
    old = load_text(tmp_path, BASE)
    new = load_text(tmp_path, BASE.replace("port = 25\n", "port = 587\n"))
    log = AuditLog(tmp_path / "audit.log", clock=fixed_clock())
    log.record_reload(old, new)
    (entry,) = list(log.entries())
    assert entry["event"] == "reload"
    assert entry["trigger"] == "SIGHUP"
    assert (entry["sha256_old"], entry["sha256_new"]) == (old.sha256, new.sha256)
    assert entry["unchanged"] is False
    assert entry["changes"]["routes"]["changed"] == {"On-prem": {"port": [25, 587]}}


def test_reload_without_changes_is_recorded_as_unchanged(tmp_path: Path) -> None:
    old = load_text(tmp_path, BASE)
    new = load_text(tmp_path, BASE + "\n# only a comment\n")
    log = AuditLog(tmp_path / "audit.log")
    log.record_reload(old, new, trigger="relay reload")
    (entry,) = list(log.entries())
    assert entry["unchanged"] is True
    assert entry["sha256_old"] != entry["sha256_new"]
    assert format_entry(entry)[0].endswith("by relay reload unchanged")


def test_refused_reload_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(
        BASE.replace("port = 25\n", "port = 465\n").replace('route = "On', 'route = "X')
    )
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, path.read_text())
    log = AuditLog(tmp_path / "audit.log")
    log.record_refused(path, caught.value.problems)
    (entry,) = list(log.entries())
    assert entry["event"] == "reload_refused"
    assert entry["path"] == str(path)
    assert entry["problems"] == [str(p) for p in caught.value.problems]
    assert len(entry["problems"]) == 2
    assert "snapshot" not in entry


def test_start_diffs_against_the_last_audited_state(tmp_path: Path) -> None:
    first = load_text(tmp_path, BASE)
    log = AuditLog(first.audit.path)
    log.record_start(first)
    second = load_text(tmp_path, BASE.replace("port = 25\n", "port = 2525\n"))
    log.record_reload(first, second)
    log.record_refused(first.source, [Problem("server", "domains", "bad")])
    # Edited while the daemon was down, then started again.
    third = load_text(tmp_path, BASE.replace("port = 25\n", "port = 587\n"))
    log.record_start(third)
    entries = list(log.entries())
    assert [e["event"] for e in entries] == ["start", "reload", "reload_refused", "start"]
    assert entries[-1]["changes"]["routes"] == {
        "added": [],
        "removed": [],
        "changed": {"On-prem": {"port": [2525, 587]}},
    }


def test_torn_last_line_is_skipped_and_the_next_entry_starts_cleanly(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE)
    log = AuditLog(cfg.audit.path)
    log.record_start(cfg)
    with open(log.path, "ab") as handle:  # a crash in the middle of a write
        handle.write(b'{"time": "2026-11-28T10:21:00Z", "event": "rel')
    assert [e["event"] for e in log.entries()] == ["start"]
    log.record_reload(cfg, cfg)
    assert [e["event"] for e in log.entries()] == ["start", "reload"]
    lines = log.path.read_bytes().split(b"\n")
    assert lines[-1] == b""
    assert json.loads(lines[-2])["event"] == "reload"


def test_entries_of_a_missing_log_is_empty(tmp_path: Path) -> None:
    assert list(AuditLog(tmp_path / "nope" / "audit.log").entries()) == []


def test_log_is_created_with_its_folder_and_only_appended(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE)
    log = AuditLog(tmp_path / "var" / "audit.log")
    log.record_start(cfg)
    before = log.path.read_bytes()
    log.record_reload(cfg, cfg)
    after = log.path.read_bytes()
    assert after.startswith(before)
    assert after.count(b"\n") == 2


# --- relay audit ------------------------------------------------------------


def test_cli_audit_prints_entries_readably_newest_last(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old = load_text(tmp_path, BASE)
    log = AuditLog(old.audit.path, clock=fixed_clock())
    log.record_start(old)
    new = load_text(tmp_path, BASE.replace("port = 25\n", "port = 587\n"))
    log.record_reload(old, new)
    log.record_refused(new.source, [Problem('routes[1] "On-prem"', "port", "bad port")])
    assert cli.main(["audit", "--config", str(new.source)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"2026-11-28T10:20:00Z start sha256 {old.sha256[:8]}… {old.source}"
    assert '  route "On-prem": added' in out
    assert "  rules[1]: added" in out
    reload_head = (
        f"2026-11-28T10:21:00Z reload sha256 {old.sha256[:8]}…→{new.sha256[:8]}… by SIGHUP"
    )
    assert reload_head in out
    assert '  route "On-prem": changed port: 25 → 587' in out
    assert out.index(reload_head) < out.index('  route "On-prem": changed port: 25 → 587')
    assert out[-2].startswith("2026-11-28T10:22:00Z reload refused by SIGHUP")
    assert out[-1] == '  problem: routes[1] "On-prem": port: bad port'


def test_cli_audit_json_passes_entries_through(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_text(tmp_path, BASE)
    log = AuditLog(cfg.audit.path)
    log.record_start(cfg)
    log.record_reload(cfg, cfg)
    assert cli.main(["audit", "--json", "--config", str(cfg.source)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line) for line in lines] == list(log.entries())


def test_cli_audit_without_a_log_says_so_and_succeeds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load_text(tmp_path, BASE)
    assert cli.main(["audit", "--config", str(cfg.source)]) == 0
    assert "nothing recorded" in capsys.readouterr().out
