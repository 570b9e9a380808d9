"""relay_config() writes configs the real loader accepts, for every route shape."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import configload
from tests.support import configs
from tests.support.configs import TLS_LEVELS
from tests.support.procs import relay_config


@pytest.mark.parametrize("tls", ["opportunistic", "required", "ca", "full"])
def test_single_host_route_with_each_tls_level(tmp_path: Path, tls: str) -> None:
    path = relay_config(tmp_path, configs.route("Down", "127.0.0.1", 2526, **TLS_LEVELS[tls]))
    cfg = configload.load(path)
    (loaded,) = cfg.routes
    assert (loaded.primary[0].name, loaded.primary[0].port) == ("127.0.0.1", 2526)
    policy = loaded.tls
    levels = [policy.require_tls, policy.require_ca_signed, policy.validate_hostname]
    assert sum(levels) == ["opportunistic", "required", "ca", "full"].index(tls)
    assert cfg.route_for("anyone@example.org", "") == loaded
    assert cfg.queue.path == tmp_path / "relay-spool"
    assert cfg.queue.min_backoff == 1.0


def test_multiple_hosts_rules_and_section_overrides(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("placeholder\n")
    primary = [("127.0.0.1", p, w) for p, w in ((2527, 70), (2528, 30))]
    secondary = [("127.0.0.1", 2529, 100)]
    split = configs.route("Split", primary=primary, secondary=secondary)
    path = relay_config(
        tmp_path,
        configs.route("Down", port=2526) + split,
        rules=configs.rule("Down", "@example.org") + configs.rule("Split", "*"),
        domains=("example.org", "example.net"),
        port=2600,
        server={"max_recipients": 5},
        tls={"ca_file": str(ca)},
    )
    cfg = configload.load(path)
    assert [h.load for h in cfg.routes[1].primary] == [70, 30]
    assert cfg.routes[1].secondary[0].port == 2529
    assert cfg.route_for("x@example.net", "").name == "Split"
    assert cfg.server.listen[0].port == 2600
    assert cfg.server.max_recipients == 5
    assert cfg.tls.ca_file == ca
