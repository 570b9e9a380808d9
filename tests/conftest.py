"""Fixtures shared by every test area. Area-specific fixtures live in tests/support/."""

from __future__ import annotations

from pathlib import Path

import pytest

# Fixtures shared by several modules: the delivery tests' (pki, closing) and
# the in-process relay's (dnsmasq, dsn_sink).
pytest_plugins = ["tests.support.delivery", "tests.support.integ"]


@pytest.fixture
def write_config(tmp_path: Path):
    """Write a TOML config into tmp_path and return its path."""

    def write(text: str, name: str = "relay.toml") -> Path:
        path = tmp_path / name
        path.write_text(text)
        return path

    return write
