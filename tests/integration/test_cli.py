"""The relay command line through a real subprocess: exit codes and messages."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from relay import version as relay_version
from tests.support.paths import ROOT
from tests.unit.test_config import RULE, SERVER, SINGLE


def relay(*args: str, env: dict[str, str] | None = None, cwd: Path = ROOT):
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )


def test_check_config_valid_prints_summary(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(SERVER + SINGLE + RULE)
    result = relay("check-config", "--config", str(path))
    assert result.returncode == 0, result.stderr
    assert "valid, 1 route(s), 1 rule(s)" in result.stdout
    assert (
        "route 'R': require_tls=on require_ca_signed=on validate_hostname=on on_tls_failure=bounce"
        in result.stdout
    )
    assert "host mx.example.test port 25" in result.stdout


def test_check_config_invalid_lists_every_problem(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(SERVER + '[[routes]]\nname = "R"\nhost = "a.test"\nport = 465\nmx = 1\n')
    result = relay("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "2 problem(s)" in result.stderr
    assert "routes[1] 'R': port: port 465 (implicit TLS) is not supported" in result.stderr
    assert "routes[1] 'R': mx: unknown key; did you mean 'mx_lookup'?" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_syntax_error_no_traceback(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[server]\nhostname = "a\n')
    result = relay("check-config", "--config", str(path))
    assert result.returncode == 2
    assert "TOML syntax error" in result.stderr and "line 2" in result.stderr
    assert "Traceback" not in result.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    result = relay("check-config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert "cannot read config file: No such file or directory" in result.stderr


def test_config_from_environment_then_default(tmp_path: Path) -> None:
    path = tmp_path / "env.toml"
    path.write_text(SERVER + SINGLE + RULE)
    result = relay("check-config", env={"RELAY_CONFIG": str(path)})
    assert result.returncode == 0 and str(path) in result.stdout
    # Without --config or $RELAY_CONFIG: config/relay.toml in the current folder.
    env = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert "config/relay.toml: valid" in result.stdout


def test_reload_without_daemon_says_how_to_start(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(SERVER + SINGLE + RULE)
    result = relay("reload", "--config", str(path))
    assert result.returncode == 1
    assert "no running relay found" in result.stderr


def test_usage_error_exit_2() -> None:
    result = relay("frobnicate")
    assert result.returncode == 2


def test_version() -> None:
    result = relay("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"relay {relay_version()}"


def in_folder(folder: Path, *args: str, env: dict[str, str] | None = None):
    """``relay ARGS`` run in ``folder`` with no $RELAY_CONFIG unless ``env`` sets one."""
    clean = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    return subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=folder,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
    )


# Every command that reads a config; test-tls gets a route no host serves
# (connection refused at once on loopback), so it exits 1 but has resolved.
COMMANDS = [
    ("check-config",),
    ("reload",),
    ("audit",),
    ("queue", "list"),
    ("queue", "flush"),
    ("queue", "show", "NOSUCHID"),
    ("test-tls", "Local sink"),
]


def test_every_command_falls_back_to_the_embedded_default(tmp_path: Path) -> None:
    for command in COMMANDS:
        result = in_folder(tmp_path, *command)
        assert result.returncode in (0, 1), (command, result.stderr)
        assert "relay: using config (embedded default)" in result.stderr.splitlines(), command
        assert "No such file" not in result.stderr, command
        # Never a --config naming the embedded default as a file.
        assert "--config" not in result.stdout + result.stderr, command
    checked = in_folder(tmp_path, "check-config")
    assert checked.stdout.startswith("(embedded default): valid, 1 route(s), 1 rule(s)")


def test_every_command_resolves_flag_then_environment_then_config_folder(tmp_path: Path) -> None:
    text = (
        SERVER
        + '[[routes]]\nname = "Local sink"\nhost = "127.0.0.1"\nport = 9\n'
        + RULE.replace('"R"', '"Local sink"')
    )
    (tmp_path / "config").mkdir()
    folder_config = tmp_path / "config" / "relay.toml"
    folder_config.write_text(text)
    env_config = tmp_path / "env.toml"
    env_config.write_text(text)
    flag_config = tmp_path / "flag.toml"
    flag_config.write_text(text)
    for command in COMMANDS:
        said = in_folder(tmp_path, *command).stderr.splitlines()
        assert f"relay: using config {folder_config}" in said, command
        said = in_folder(tmp_path, *command, env={"RELAY_CONFIG": str(env_config)}).stderr
        assert f"relay: using config {env_config}" in said.splitlines(), command
        argv = (*command, "--config", str(flag_config))
        said = in_folder(tmp_path, *argv, env={"RELAY_CONFIG": str(env_config)}).stderr
        assert f"relay: using config {flag_config}" in said.splitlines(), command
