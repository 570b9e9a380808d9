"""Large DATA goes to the spool temp file as it comes (docs/performance.md), every check kept."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay import errors
from relay.config import Config
from relay.content import MessageCheck, check_message, unstuff
from relay.datareader import read_data
from relay.intake import SPILL_THRESHOLD
from relay.spool import Spool
from tests.support.fs import tmpfs
from tests.support.inbound import Harness, RawClient, make_config, running_inbound
from tests.support.spool import read_body
from tests.support.stream import (
    HEAD,
    CollectingSpill,
    ScriptedReader,
    big_body,
    stuff,
    tmp_files,
)

MIB = 1 << 20
#: A small spill threshold for the reader tests: every few lines spill.
SMALL = 16
LINE_LIMIT = 1001


async def read_blocks(blocks: list[bytes], threshold: int = SMALL, size_limit: int = 0) -> tuple:
    spill = CollectingSpill(threshold)
    reader = ScriptedReader(blocks)
    raw, refusal = await read_data(reader, size_limit or None, LINE_LIMIT, spill)
    # What was put back, then the blocks not read yet.
    rest = bytes(reader._buffer) + b"".join(reader.blocks)  # type: ignore[attr-defined]
    return raw, refusal, spill, rest


def in_blocks(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def splits(data: bytes, around: int, width: int = 8) -> list[list[bytes]]:
    """``data`` in blocks with a block boundary at every offset within
    ``width`` of ``around`` (small blocks before it, so pieces spill first)."""
    cuts = range(max(1, around - width), min(len(data), around + width + 1))
    return [[*in_blocks(data[:cut], 20), data[cut:]] for cut in cuts]


# --- the DATA reader, block by block ---------------------------------------


def spilled_content(raw: bytes | None, spill: CollectingSpill) -> bytes:
    """What read_data delivered: spilled pieces then (if nothing spilled) raw."""
    assert raw is not None
    assert (raw == b"") == bool(spill.pieces) or raw == b""
    return b"".join(spill.pieces) + raw


async def test_pieces_are_whole_lines_and_add_up_to_the_content() -> None:
    content = HEAD + b"line one\r\n.dot\r\n..two\r\nx\r\n" * 20
    stream = stuff(content) + b".\r\nNOOP\r\n"
    for size in range(1, 60):
        raw, refusal, spill, rest = await read_blocks(in_blocks(stream, size))
        assert (raw, refusal, rest) == (b"", None, b"NOOP\r\n"), size
        assert b"".join(spill.pieces) == stuff(content)
        assert all(p.endswith(b"\r\n") for p in spill.pieces)
        assert b"".join(unstuff(p) for p in spill.pieces) == content
        assert spill.check.result() is None


async def test_terminator_split_at_every_offset() -> None:
    content = HEAD + b"a\r\n" * 40
    stream = stuff(content) + b".\r\nQUIT\r\n"
    end = len(stuff(content))
    for blocks in splits(stream, end + 2, width=6):
        raw, refusal, spill, rest = await read_blocks(blocks)
        assert refusal is None and rest == b"QUIT\r\n"
        assert spilled_content(raw, spill) == stuff(content)


async def test_a_crlf_dot_split_across_blocks_is_unstuffed() -> None:
    body = HEAD + b"x" * 30 + b"\r\n" + b".hidden\r\n" + b"tail\r\n" * 10
    stream = stuff(body) + b".\r\n"
    at = stream.index(b"\r\n..hidden")
    for blocks in splits(stream, at + 2):
        raw, refusal, spill, _ = await read_blocks(blocks)
        assert refusal is None and raw == b""
        assert b"".join(unstuff(p) for p in spill.pieces) == body


@pytest.mark.parametrize(
    "bare", [b"ab\ncd", b"ab\rcd", b"ab\r\rcd", b"ab\n\ncd", b"a\x00b"], ids=repr
)
async def test_bare_cr_lf_or_nul_split_across_blocks_is_found(bare: bytes) -> None:
    body = HEAD + b"y" * 40 + b"\r\n" + bare + b"\r\n" + b"tail\r\n" * 10
    expected = check_message(body)
    assert expected is not None
    stream = stuff(body) + b".\r\n"
    at = stream.index(bare)
    for blocks in splits(stream, at + 2, width=4):
        raw, refusal, spill, _ = await read_blocks(blocks)
        assert refusal is None and raw == b""
        assert spill.check.result() == expected, blocks


async def test_header_checks_span_pieces() -> None:
    received = b"Received: from a by b; Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    cases = {
        "loop": received * 31 + b"\r\nbody\r\n",
        "bad_header": HEAD[:-2] + b"X" * 60 + b"\r\nno colon here\r\n\r\nbody\r\n",
        "folded_first": b" continuation first\r\nA: b\r\n\r\nbody\r\n",
        "ok": received * 30 + b"\r\n" + b"body\r\n" * 50,
        "no_headers": b"\r\nbody only\r\n",
        "headers_only": HEAD[:-2],
    }
    for name, body in cases.items():
        raw, _, spill, _ = await read_blocks(in_blocks(stuff(body) + b".\r\n", 7), threshold=8)
        assert raw == b""
        assert spill.check.result() == check_message(body), name
        check = MessageCheck()
        for line in body.splitlines(keepends=True):
            check.feed(line)  # one line per piece: the smallest pieces there are
        assert check.result() == check_message(body), name


async def test_size_limit_refuses_and_abandons_the_spill() -> None:
    stream = stuff(HEAD + b"z" * 50 + b"\r\n" * 200) + b".\r\nNOOP\r\n"
    raw, refusal, spill, rest = await read_blocks(
        [stream[i : i + 40] for i in range(0, len(stream), 40)], size_limit=150
    )
    assert raw is None and refusal == errors.MESSAGE_TOO_BIG
    assert spill.abandoned and rest == b"NOOP\r\n"


async def test_line_too_long_refuses_and_abandons_the_spill() -> None:
    stream = stuff(HEAD + b"x" * 2000 + b"\r\nend\r\n") + b".\r\nNOOP\r\n"
    raw, refusal, spill, rest = await read_blocks(
        [stream[i : i + 100] for i in range(0, len(stream), 100)]
    )
    assert raw is None and refusal == errors.LINE_TOO_LONG
    assert spill.abandoned and rest == b"NOOP\r\n"


async def test_below_the_threshold_nothing_spills() -> None:
    stream = stuff(HEAD + b"small\r\n") + b".\r\n"
    raw, refusal, spill, _ = await read_blocks([stream], threshold=SPILL_THRESHOLD)
    assert raw == stuff(HEAD + b"small\r\n") and spill.pieces == []


# --- real SMTP into a real spool --------------------------------------------


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path, max_message_size=8 * MIB)


async def transaction(h: Harness) -> RawClient:
    client = await RawClient.connect(h.port)
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
    assert (await client.cmd("RCPT TO:<user@example.com>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    return client


async def send_in_blocks(client: RawClient, data: bytes, block: int = 1 << 16) -> None:
    for start in range(0, len(data), block):
        await client.send(data[start : start + block])


async def test_a_large_message_is_spooled_byte_exact(cfg: Config) -> None:
    body = big_body(3 * MIB, dots_at=(SPILL_THRESHOLD - 1, SPILL_THRESHOLD, 2 * SPILL_THRESHOLD))
    async with running_inbound(cfg) as h:
        async with await transaction(h) as client:
            await send_in_blocks(client, stuff(body) + b".\r\n", block=100_003)
            code, text = await client.reply()
            assert code == 250, text
            assert (await client.cmd("NOOP"))[0] == 250
        stored = read_body(h.spool, h.spooled()[0].id)
        assert stored.startswith(b"Received: from client.test")
        assert stored.endswith(body) and b"\r\n\r\n" not in stored[: stored.index(b"From: a@")]
        assert tmp_files(cfg.queue.path) == []
        (env,) = h.accepted
        assert env.size == len(stored)
        assert f"id {env.id}".encode() in stored[:400]


async def test_a_refused_large_message_leaves_no_temp_file(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, max_message_size=1 * MIB)
    async with running_inbound(cfg) as h:
        async with await transaction(h) as client:
            await send_in_blocks(client, stuff(big_body(2 * MIB)) + b".\r\n")
            assert (await client.reply()) == (552, str(errors.MESSAGE_TOO_BIG))
            assert (await client.cmd("NOOP"))[0] == 250
        assert h.spooled() == [] and tmp_files(cfg.queue.path) == []


async def test_a_refused_check_after_the_threshold_leaves_no_temp_file(cfg: Config) -> None:
    body = big_body(1 * MIB) + b"bare\nline feed\r\n" + big_body(MIB // 2, seed=2)[len(HEAD) :]
    async with running_inbound(cfg) as h:
        async with await transaction(h) as client:
            await send_in_blocks(client, stuff(body) + b".\r\n")
            assert (await client.reply())[0] == errors.BARE_LINE_ENDING.code
        assert h.spooled() == [] and tmp_files(cfg.queue.path) == []
        assert h.rejected("bare_line_ending") == 1


async def test_a_client_gone_mid_spill_leaves_no_temp_file(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        client = await transaction(h)
        await send_in_blocks(client, stuff(big_body(2 * MIB)))  # no final dot
        async with asyncio.timeout(5):
            while not tmp_files(cfg.queue.path):  # noqa: ASYNC110 - a file appearing
                await asyncio.sleep(0.01)
        await client.close()
        async with asyncio.timeout(5):
            while tmp_files(cfg.queue.path):  # noqa: ASYNC110 - a file going away
                await asyncio.sleep(0.01)
        assert h.spooled() == [] and h.accepted == []


async def test_a_full_disk_mid_spill_is_452_and_loses_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", "1m") as disk:
        cfg = make_config(disk, max_message_size=8 * MIB)
        async with running_inbound(cfg, spool=Spool(cfg.queue.path, fsync=True)) as h:
            async with await transaction(h) as client:
                await client.send(stuff(HEAD + b"first\r\n") + b".\r\n")
                assert (await client.reply())[0] == 250
                assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
                assert (await client.cmd("RCPT TO:<user@example.com>"))[0] == 250
                assert (await client.cmd("DATA"))[0] == 354
                await send_in_blocks(client, stuff(big_body(3 * MIB)) + b".\r\n")
                assert (await client.reply()) == (452, str(errors.DISK_FULL))
                assert tmp_files(cfg.queue.path) == []
                # The space is free again: the session goes on.
                assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
                assert (await client.cmd("RCPT TO:<user@example.com>"))[0] == 250
                assert (await client.cmd("DATA"))[0] == 354
                await client.send(stuff(HEAD + b"third\r\n") + b".\r\n")
                assert (await client.reply())[0] == 250
            spooled = h.spooled()
            assert len(spooled) == 2 and h.rejected("disk_full") == 1
            ends = sorted(read_body(h.spool, e.id)[-7:] for e in spooled)
            assert ends == [b"first\r\n", b"third\r\n"]
            assert tmp_files(cfg.queue.path) == []
