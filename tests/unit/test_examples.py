"""Every config shipped in config/ (and deploy/) validates."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from relay import configdiff, configload
from tests.support.paths import ROOT

SHIPPED = sorted(ROOT.glob("config/*.toml")) + sorted(ROOT.glob("deploy/**/*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_validates(path: Path) -> None:
    cfg = configload.load(path)
    assert cfg.routes, "a shipped config should show at least one route"


def test_reference_config_shows_the_defaults() -> None:
    """config/relay.example.toml: every uncommented setting is its default.

    Exceptions: domains (required, no default) and the two paths, which
    the file sets relative to itself so that they land in the checkout's
    var/. An option whose default is none or computed is a commented-out
    example there.
    """
    example = configload.load(ROOT / "config/relay.example.toml")
    differs = []
    for section in configdiff.DIFF_SECTIONS:
        shown = getattr(example, section)
        default = type(shown)(hostname=shown.hostname) if section == "server" else type(shown)()
        for field in dataclasses.fields(shown):
            if (section, field.name) in {
                ("server", "domains"),
                ("queue", "path"),
                ("audit", "path"),
            }:
                continue
            if getattr(shown, field.name) != getattr(default, field.name):
                differs.append(f"[{section}] {field.name}")
    assert differs == []
