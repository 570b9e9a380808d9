"""Daemon.reload in-process: reloads that overlap run one after the other.

Two SIGHUPs close together (a config-management run, then the sidecar)
must not both compare with the same old config: each reload diffs, audits
and swaps against the config the previous one left.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from relay import configload
from relay.app import Daemon
from tests.support.inbound import config_text
from tests.support.procs import free_port


async def test_overlapping_reloads_apply_one_change_once(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    text = config_text(tmp_path / "spool", listen=f'["127.0.0.1:{free_port()}"]')
    text += f'\n[audit]\npath = "{tmp_path / "audit.log"}"\n'
    path.write_text(text)
    daemon = Daemon(lambda: configload.load(path))
    path.write_text(text.replace('hostname = "relay.test"', 'hostname = "relay2.test"'))
    try:
        assert await asyncio.gather(daemon.reload(), daemon.reload()) == [True, True]
    finally:
        await daemon.deliverer.close()
    first, second = (json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines())
    assert first["changes"]["server"] == {"hostname": ["relay.test", "relay2.test"]}
    assert second["unchanged"] is True and second["changes"]["server"] == {}
    assert daemon.config().server.hostname == "relay2.test"
