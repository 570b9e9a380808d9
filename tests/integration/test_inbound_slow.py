"""Slow clients: a DATA phase that trickles is cut off at [server] data_timeout."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay import errors
from tests.support.inbound import RawClient, make_config, running_inbound


async def trickle_until_closed(client: RawClient, chunk: bytes, pause: float, limit: int) -> None:
    """Send ``chunk`` every ``pause`` seconds (at most ``limit`` times) until
    the server answers; that answer must be the DATA deadline's 421."""
    for _ in range(limit):
        try:
            reply = await client.reply(wait=pause)
        except TimeoutError:
            await client.send(chunk)
            continue
        assert reply == (421, str(errors.DATA_TIMEOUT))
        assert await client.reader.read() == b""
        return
    pytest.fail("the trickling client was never cut off")


@pytest.mark.parametrize("head", [b"", b"X-Big: " + b"x" * 900 + b"\r\n"])
async def test_trickling_data_is_cut_off_at_data_timeout(tmp_path: Path, head: bytes) -> None:
    # The idle timeout (5 s) never fires: a byte comes every 0.1 s.
    cfg = make_config(
        tmp_path, timeout="5s", max_message_size=10_000_000, extra_server='data_timeout = "1s"'
    )
    async with running_inbound(cfg) as h:
        async with await RawClient.connect(h.port) as client:
            await client.start_data()
            await client.send(b"Subject: slow\r\n")
            # With head, 300 KiB first: the message is already in a temp file.
            await client.send(head * 330)
            await trickle_until_closed(client, b"x", pause=0.1, limit=300)
        assert h.rejected("data_timeout") == 1
        assert h.spooled() == []
        await asyncio.sleep(0)
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []


async def test_a_trickled_command_line_is_cut_off_at_timeout(tmp_path: Path) -> None:
    # Bytes keep coming, but no complete command: the per-command timeout.
    cfg = make_config(tmp_path, timeout="500ms")
    async with running_inbound(cfg) as h, await RawClient.connect(h.port) as client:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        for _ in range(100):
            try:
                reply = await client.reply(wait=0.1)
            except TimeoutError:
                await client.send(b"N")
                continue
            assert reply == (421, str(errors.IDLE_TIMEOUT))
            break
        else:
            pytest.fail("the trickled command was never cut off")
