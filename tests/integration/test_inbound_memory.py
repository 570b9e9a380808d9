"""[server] max_memory: past it, DATA goes to the spool's temp file at once."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.support.inbound import Harness, RawClient, make_config, running_inbound
from tests.support.spool import read_body


def body(size: int, tag: bytes) -> bytes:
    line = tag + b" " + b"x" * 70 + b"\r\n"
    return b"Subject: " + tag + b"\r\n\r\n" + line * (size // len(line))


def held(h: Harness) -> float:
    return h.metrics.registry.get_sample_value("relay_inbound_memory_bytes") or 0.0


async def send(client: RawClient, data: bytes) -> str:
    await client.send(data + b".\r\n")
    code, text = await client.reply()
    assert code == 250, text
    return text.rsplit(" ", 1)[1]


async def test_over_the_budget_a_message_under_256k_goes_to_disk(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, max_message_size=10_000_000, extra_server="max_memory = 1000")
    async with running_inbound(cfg) as h, await RawClient.connect(h.port) as client:
        await client.start_data()
        # More than one 64 KiB read, far below the 256 KiB spill threshold.
        data = body(150_000, b"small")
        queue_id = await send(client, data)
        # Spilled: the scheduler got no body in memory, the spool has it all.
        assert h.handed[queue_id] == b""
        assert read_body(h.spool, queue_id).endswith(data)
        assert held(h) == 0


async def test_sessions_share_the_budget(tmp_path: Path) -> None:
    extra = "max_memory = 300000"
    cfg = make_config(tmp_path, max_message_size=10_000_000, extra_server=extra)
    async with running_inbound(cfg) as h:
        first = await RawClient.connect(h.port)
        second = await RawClient.connect(h.port)
        async with first, second:
            await first.start_data()
            await first.send(body(200_000, b"first"))
            for _ in range(500):  # until the server has read it (bounded)
                if held(h) >= 190_000:
                    break
                await asyncio.sleep(0.01)
            assert 190_000 <= held(h) <= 300_000
            # 200 KB held, under 256 KiB: the first keeps it in memory; the
            # second's 150 KB would pass 300 KB, so it goes to disk.
            await second.start_data()
            second_id = await send(second, body(150_000, b"second"))
            assert h.handed[second_id] == b""
            first_id = await send(first, b"")
            assert h.handed[first_id].endswith(b"first " + b"x" * 70 + b"\r\n")
            assert held(h) == 0
            # The budget is free again: a new message stays in memory.
            assert (await second.cmd("MAIL FROM:<s@example.org>"))[0] == 250
            assert (await second.cmd("RCPT TO:<user@example.com>"))[0] == 250
            assert (await second.cmd("DATA"))[0] == 354
            third_id = await send(second, body(150_000, b"third"))
            assert h.handed[third_id] != b""
