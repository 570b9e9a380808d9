"""deploy/systemd/relay.service: hardened, reloadable, and accepted by systemd-analyze."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from relay import configload
from tests.support.deploy import DEPLOY, UNIT, unit_directives


def values(key: str) -> list[str]:
    return [v for _, k, v in unit_directives() if k == key]


def one(key: str) -> str:
    found = values(key)
    assert len(found) == 1, f"{key}: {found}"
    return found[0]


def test_runs_the_relay_with_the_etc_config() -> None:
    assert one("ExecStart") == "/usr/local/bin/relay run --config /etc/relay/relay.toml"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one("Restart") == "on-failure"
    assert one("WantedBy") == "multi-user.target"


def test_stop_leaves_time_for_in_flight_deliveries() -> None:
    timeout = one("TimeoutStopSec")
    assert timeout.endswith("s") and int(timeout[:-1]) >= 90


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("DynamicUser", "yes"),
        ("StateDirectory", "relay"),
        ("ConfigurationDirectory", "relay"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("NoNewPrivileges", "yes"),
        ("AmbientCapabilities", "CAP_NET_BIND_SERVICE"),
        ("CapabilityBoundingSet", "CAP_NET_BIND_SERVICE"),
    ],
)
def test_hardening(key: str, value: str) -> None:
    assert one(key) == value


def test_the_shipped_config_keeps_state_in_the_state_directory() -> None:
    # StateDirectory=relay is /var/lib/relay, the only place the service may write.
    cfg = configload.load(DEPLOY / "systemd" / "relay.toml")
    state = Path("/var/lib") / one("StateDirectory")
    assert cfg.queue.path.is_relative_to(state)
    assert cfg.audit.path.is_relative_to(state)
    assert cfg.pid_file.is_relative_to(state)


# Optional: systemd-analyze lints the unit as systemd would; a machine
# without systemd (a container) still runs the structural tests above.
needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="optional: systemd-analyze is not installed (Debian package systemd)",
)


def _verifiable_copy(tmp_path: Path) -> Path:
    """The unit with ExecStart's binary swapped for one that exists here.

    systemd-analyze verify rejects a unit whose ExecStart is not executable
    on this machine, and relay is not installed at /usr/local/bin in the
    test environment; everything else is checked as shipped.
    """
    true = shutil.which("true")
    assert true
    copy = tmp_path / "relay.service"
    copy.write_text(UNIT.read_text().replace("/usr/local/bin/relay", true))
    return copy


@needs_systemd_analyze
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    unit = _verifiable_copy(tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stderr.strip() == "", done.stderr


@needs_systemd_analyze
def test_systemd_analyze_security_exposure_is_low(tmp_path: Path) -> None:
    unit = _verifiable_copy(tmp_path)
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=25", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in done.stderr or "--threshold" in done.stderr:
        pytest.skip(f"systemd-analyze too old: {done.stderr.strip()}")
    # Exposure is 0-10 (--threshold counts tenths): 2.5 or less is "OK".
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr
