"""Every config shipped in config/ (and deploy/) validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import config

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted(ROOT.glob("config/*.toml")) + sorted(ROOT.glob("deploy/**/*.toml"))


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_config_validates(path: Path) -> None:
    cfg = config.load(path)
    assert cfg.routes, "a shipped config should show at least one route"
