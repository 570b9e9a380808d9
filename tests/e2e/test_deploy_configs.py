"""Every config shipped under deploy/ (TOML files and the ConfigMap) validates."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import configload
from tests.support.deploy import DEPLOY, ROOT, k8s_by_kind

TOML_FILES = sorted(DEPLOY.glob("**/*.toml"))


def test_there_are_deploy_configs() -> None:
    names = {p.relative_to(DEPLOY).as_posix() for p in TOML_FILES}
    assert {"systemd/relay.toml", "docker/relay.toml"} <= names


@pytest.mark.parametrize("path", TOML_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_deploy_toml_loads(path: Path) -> None:
    cfg = configload.load(path)
    assert cfg.routes and cfg.rules
    # Production configs keep state in the service's state directory, not
    # relative to wherever the file happens to be.
    assert cfg.queue.path.is_absolute() and str(cfg.queue.path).startswith("/var/lib/relay/")
    assert str(cfg.audit.path).startswith("/var/lib/relay/")


def test_configmap_relay_toml_loads(tmp_path: Path) -> None:
    (configmap,) = k8s_by_kind("ConfigMap")
    path = tmp_path / "relay.toml"
    path.write_text(configmap["data"]["relay.toml"])
    cfg = configload.load(path)
    assert cfg.routes
    assert str(cfg.queue.path) == "/var/lib/relay/spool"
