"""DATA read in blocks (docs/performance.md): same bytes, limits and pipelining as by line."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import errors
from relay.config import Config
from relay.content import longest_line, unstuff
from relay.datareader import DATA_BLOCK
from tests.support.inbound import Harness, RawClient, make_config, running_inbound
from tests.support.spool import read_body

HEAD = b"From: a@example.org\r\nTo: user@example.com\r\nSubject: hi\r\n\r\n"


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path, max_message_size=300_000)


async def transaction(h: Harness) -> RawClient:
    client = await RawClient.connect(h.port)
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
    assert (await client.cmd("RCPT TO:<user@example.com>"))[0] == 250
    assert (await client.cmd("DATA"))[0] == 354
    return client


def stored_body(h: Harness) -> bytes:
    (env,) = h.spooled()
    body = read_body(h.spool, env.id)
    # Our Received header comes first; the client's bytes follow it.
    return body[body.index(b"\r\n", body.index(b"Received:")) :].split(b"\r\n", 1)[1]


def test_unstuff_and_longest_line() -> None:
    assert unstuff(b"..a\r\n.b\r\nc.\r\n") == b".a\r\nb\r\nc.\r\n"
    assert unstuff(b"") == b""
    assert longest_line(b"ab\r\nabcd\r\n") == 4
    assert longest_line(b"abcdef") == 6


async def test_dot_stuffed_lines_are_restored(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        async with await transaction(h) as client:
            await client.send(HEAD + b"..leading dot\r\n...two\r\nend.\r\n.\r\n")
            assert (await client.reply())[0] == 250
        assert stored_body(h).endswith(HEAD + b".leading dot\r\n..two\r\nend.\r\n")


async def test_terminator_split_across_reads_and_pipelined_commands_after_it(cfg: Config) -> None:
    big = HEAD + (b"x" * 78 + b"\r\n") * (3 * DATA_BLOCK // 80)
    async with running_inbound(cfg) as h:
        async with await transaction(h) as client:
            await client.send(big + b"\r\n.")
            await client.send(b"\r\nNOOP\r\nQUIT\r\n")  # pipelined after the end of data
            assert (await client.reply())[0] == 250
            assert (await client.reply())[0] == 250  # NOOP, read from what was put back
            assert (await client.reply())[0] == 221
        assert stored_body(h).endswith(big + b"\r\n")


async def test_too_big_is_refused_after_the_whole_message_and_the_session_goes_on(
    cfg: Config,
) -> None:
    async with running_inbound(cfg) as h:
        async with await transaction(h) as client:
            await client.send(HEAD + (b"y" * 98 + b"\r\n") * 4000 + b".\r\n")
            assert (await client.reply())[1] == str(errors.MESSAGE_TOO_BIG)
            assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
        assert h.spooled() == []
        assert h.rejected("too_big") == 1


async def test_a_line_of_1000_octets_with_crlf_passes_and_1002_fails(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        async with await transaction(h) as client:
            await client.send(HEAD + b"a" * 998 + b"\r\n.\r\n")
            assert (await client.reply())[0] == 250
            await client.cmd("MAIL FROM:<s@example.org>")
            await client.cmd("RCPT TO:<user@example.com>")
            await client.cmd("DATA")
            await client.send(HEAD + b"a" * 1000 + b"\r\n.\r\n")
            assert (await client.reply())[1] == str(errors.LINE_TOO_LONG)
        assert len(h.spooled()) == 1
