"""Inbound.relisten: what a reload that changes ``[server] listen`` does to the listeners.

In-process (the daemon-level behaviour is in test_daemon_ops_reload.py):
the edge cases a subprocess cannot reach cheaply.
"""

from __future__ import annotations

import dataclasses
import socket
from pathlib import Path

import pytest

from relay.config import Listen
from tests.support.inbound import RawClient, make_config, running_inbound
from tests.support.procs import free_port


def listening(port: int) -> Listen:
    return Listen("127.0.0.1", port)


async def test_failed_bind_puts_the_removed_listener_back(tmp_path: Path) -> None:
    first = free_port()
    cfg = make_config(tmp_path)
    cfg = dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, listen=(listening(first),))
    )
    async with running_inbound(cfg) as h:
        with socket.socket() as busy:
            busy.bind(("127.0.0.1", 0))
            busy.listen()
            taken = busy.getsockname()[1]
            with pytest.raises(OSError):
                await h.inbound.relisten([listening(taken)])
        assert h.inbound.addresses == [("127.0.0.1", first)]
        async with await RawClient.connect(first) as client:
            assert (await client.cmd("EHLO client.test"))[0] == 250


async def test_relisten_keeps_unchanged_addresses_bound(tmp_path: Path) -> None:
    first, second = free_port(), free_port()
    cfg = make_config(tmp_path)
    cfg = dataclasses.replace(
        cfg, server=dataclasses.replace(cfg.server, listen=(listening(first),))
    )
    async with running_inbound(cfg) as h:
        [kept] = h.inbound.servers
        added, removed = await h.inbound.relisten([listening(first), listening(second)])
        assert (added, removed) == ([listening(second)], [])
        assert h.inbound.servers[0] is kept
        added, removed = await h.inbound.relisten([listening(second)])
        assert (added, removed) == ([], [listening(first)])
        assert h.inbound.addresses == [("127.0.0.1", second)]
        with pytest.raises(ConnectionRefusedError):
            await RawClient.connect(first)
