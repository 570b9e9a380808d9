"""The examples in tests/data/bad_configs/ and warning_configs/ through `relay check-config`.

An invalid example exits 2 naming every problem; a valid one with warnings
exits 0 listing each under ``warnings:``. A case is a folder with
relay.toml and expected.txt (one expected line fragment per line; each
must appear in the output, and the count must equal the number of lines).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import DATA, ROOT

CASES = sorted((DATA / "bad_configs").iterdir())


@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_check_config_names_every_problem(case: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "--config", str(case / "relay.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    expected = [line for line in (case / "expected.txt").read_text().splitlines() if line]
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for fragment in expected:
        assert fragment in result.stderr, f"{fragment!r} missing from:\n{result.stderr}"
    assert f"{len(expected)} problem(s)" in result.stderr, result.stderr


WARNING_CASES = sorted((DATA / "warning_configs").iterdir())


@pytest.mark.parametrize("case", WARNING_CASES, ids=lambda p: p.name)
def test_check_config_warns_and_exits_0(case: Path) -> None:
    """A valid config with warnings: exit 0, each warning listed under ``warnings:``."""
    result = subprocess.run(
        [sys.executable, "-m", "relay", "check-config", "--config", str(case / "relay.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )
    expected = [line for line in (case / "expected.txt").read_text().splitlines() if line]
    assert result.returncode == 0, result.stdout + result.stderr
    head, _, listed = result.stdout.partition("\nwarnings:\n")
    assert f", {len(expected)} warning(s)" in head.splitlines()[0]
    lines = listed.splitlines()
    assert len(lines) == len(expected), listed
    for fragment, line in zip(expected, lines, strict=True):
        assert line.startswith(f"  - {fragment}"), line
