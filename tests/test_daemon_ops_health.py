"""Operations at the daemon level: /healthz follows whether the spool is really writable.

The spool lives on a small tmpfs the test mounts (tests run as root;
skipped where mounting is not allowed) and remounts read-only while
``relay run`` keeps running, then read-write again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import errors
from tests.support import configs
from tests.support.fs import tmpfs
from tests.support.inbound import RawClient
from tests.support.opsd import http_get, samples, send, value
from tests.support.procs import RelayProcess, free_port


@pytest.fixture
def spool_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "fs", "1m") as mount:
        yield mount


async def remount(mount: Path, mode: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "mount", "-o", f"remount,{mode}", str(mount), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()


async def test_healthz_503_while_spool_is_read_only_then_200_again(
    tmp_path: Path, spool_fs: Path
) -> None:
    smtp, metrics = free_port(), free_port()
    path = tmp_path / "relay.toml"
    text = configs.daemon_toml(
        tmp_path, smtp, metrics, ["example.com"],
        configs.route("Sink", port=free_port()), configs.rule("Sink", "@example.com"),
        queue={"path": spool_fs / "spool", "min_backoff": "1h"},
    )  # fmt: skip
    path.write_text(text)
    proc = RelayProcess(path, cwd=tmp_path).start(wait_for="event=started")
    try:
        assert await http_get(metrics, "/healthz") == (200, "ok\n")
        await remount(spool_fs, "ro")
        try:
            assert await http_get(metrics, "/healthz") == (503, "spool not writable\n")
            # Not just a flag: the spool really cannot take mail now.
            async with await RawClient.connect(smtp) as client:
                await client.cmd("EHLO client.test")
                await client.cmd("MAIL FROM:<s@sender.test>")
                await client.cmd("RCPT TO:<a@example.com>")
                assert (await client.cmd("DATA"))[0] == 354
                await client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
                assert await client.reply() == (451, str(errors.SPOOL_FAILED))
        finally:
            await remount(spool_fs, "rw")
        assert await http_get(metrics, "/healthz") == (200, "ok\n")
        await send(smtp, "s@sender.test", ["a@example.com"])
        _, text = await http_get(metrics, "/metrics")
        parsed = samples(text)
        assert value(parsed, "relay_messages_received_total") == 1
        assert value(parsed, "relay_messages_rejected_total", reason="spool_error") == 1
    finally:
        proc.stop()
