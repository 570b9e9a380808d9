"""Inbound's durable write: 451 and nothing left when it fails; writes in flight counted right."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.envelope import Envelope
from relay.groupcommit import GroupSync
from relay.spool import Spool
from relay.spoolbody import IN_MEMORY_MAX, BodyWriter
from tests.support.inbound import RawClient, make_config, running_inbound


class UnusableSpool(Spool):
    """A spool whose thread pool is gone (as at interpreter exit): put_async raises at once."""

    def put_async(
        self, envelope: Envelope, data: bytes, prefix: bytes = b"", body: BodyWriter | None = None
    ) -> object:
        raise RuntimeError("cannot schedule new futures after shutdown")


async def test_a_write_that_cannot_start_is_not_left_counted(tmp_path: Path) -> None:
    # Shutdown waits for the writes in flight: one that never started must
    # not be counted, or every stop would wait out its whole grace period.
    cfg = make_config(tmp_path)
    spool = UnusableSpool(cfg.queue.path, fsync=False)
    async with running_inbound(cfg, spool=spool) as h:
        async with await RawClient.connect(h.port) as client:
            await client.start_data()
            await client.send(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")
            code, _ = await client.reply(wait=5)
            assert code >= 400
        assert h.inbound.intake.writes_done.is_set()
        assert h.accepted == []


class FailingDirectorySync:
    def __call__(self) -> None:
        raise OSError(5, "Input/output error")


@pytest.mark.parametrize("large", [False, True], ids=["in-memory", "spilled"])
async def test_a_failed_directory_fsync_answers_451_and_leaves_nothing(
    tmp_path: Path, large: bool
) -> None:
    cfg = make_config(tmp_path, max_message_size=10_000_000)
    spool = Spool(cfg.queue.path, fsync=False)
    spool.group = GroupSync(FailingDirectorySync())
    lines = IN_MEMORY_MAX // 1000 + 10 if large else 1
    async with running_inbound(cfg, spool=spool) as h:
        async with await RawClient.connect(h.port) as client:
            await client.start_data()
            await client.send(b"Subject: hi\r\n\r\n" + (b"x" * 998 + b"\r\n") * lines + b".\r\n")
            code, _ = await client.reply(wait=10)
            assert code == 451
        assert list(spool.msg_dir.iterdir()) == []
        assert list(spool.tmp_dir.iterdir()) == []
        assert h.accepted == []
        assert h.inbound.intake.writes_done.is_set()
