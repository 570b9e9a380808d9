"""Spool failures answer 451/452 and leave nothing behind (a real tiny file system)."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import errors
from relay.config import Config, QueueConfig
from relay.spool import Spool
from tests.support.fs import tmpfs
from tests.support.inbound import RawClient, make_config, running_inbound
from tests.support.spool import read_body

MSG = b"From: a@example.org\r\nSubject: hi\r\n\r\n" + b"x" * 900 + b"\r\n"


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 256 KiB tmpfs: writes fail for real with ENOSPC, or EROFS once remounted."""
    with tmpfs(tmp_path / "fs", "256k") as mount:
        yield mount


def fill(mount: Path) -> None:
    with open(mount / "filler", "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass


def spool_config(tmp_path: Path, spool_dir: Path) -> Config:
    cfg = make_config(tmp_path)
    return dataclasses.replace(cfg, queue=QueueConfig(path=spool_dir))


async def send_one(port: int) -> str:
    client = await RawClient.connect(port)
    async with client:
        await client.cmd("EHLO client.test")
        await client.cmd("MAIL FROM:<s@example.org>")
        await client.cmd("RCPT TO:<user@example.com>")
        assert (await client.cmd("DATA"))[0] == 354
        await client.send(MSG + b".\r\n")
        _, text = await client.reply()
    return text


def leftovers(spool: Spool) -> list[str]:
    return sorted(p.name for d in (spool.msg_dir, spool.tmp_dir) for p in d.iterdir())


async def test_disk_full_answers_452_and_leaves_nothing(tmp_path: Path, tiny_fs: Path) -> None:
    cfg = spool_config(tmp_path, tiny_fs / "spool")
    spool = Spool(cfg.queue.path)  # fsync on, as in production
    async with running_inbound(cfg, spool=spool) as h:
        assert (await send_one(h.port)).startswith("250 ")
        fill(tiny_fs)
        text = await send_one(h.port)
        assert text == str(errors.DISK_FULL)
        assert h.rejected("disk_full") == 1
        assert len(leftovers(spool)) == 1  # only the first message (one file)
        assert len(h.accepted) == 1


async def test_read_only_spool_answers_451_and_leaves_nothing(
    tmp_path: Path, tiny_fs: Path
) -> None:
    cfg = spool_config(tmp_path, tiny_fs / "spool")
    spool = Spool(cfg.queue.path)
    async with running_inbound(cfg, spool=spool) as h:
        remount = await asyncio.create_subprocess_exec("mount", "-o", "remount,ro", str(tiny_fs))
        assert await asyncio.wait_for(remount.wait(), 10) == 0
        text = await send_one(h.port)
        assert text == str(errors.SPOOL_FAILED)
        assert h.rejected("spool_error") == 1
        assert leftovers(spool) == []
        assert not spool.writable()


async def test_the_scheduler_is_handed_the_body_as_spooled(tmp_path: Path) -> None:
    # The first attempt of a just-accepted message uses these bytes instead
    # of reading the spool: they must be the stored body, Received included.
    async with running_inbound(make_config(tmp_path)) as h:
        text = await send_one(h.port)
        assert text.startswith("250 2.0.0 Ok: queued as ")
        [env] = h.accepted
        assert h.handed[env.id] == read_body(h.spool, env.id)
        assert h.handed[env.id].startswith(b"Received: ")
        assert h.handed[env.id].endswith(MSG)
