"""The error limits: slower replies after soft_error_limit errors, 421 at hard_error_limit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from relay import errors
from tests.support.inbound import RawClient, make_config, running_inbound

MSG = b"Subject: hi\r\n\r\nHallo.\r\n"


def limits(soft: int, hard: int, delay: str = "1ms") -> str:
    return f'soft_error_limit = {soft}\nhard_error_limit = {hard}\nerror_delay = "{delay}"'


async def test_harvesting_session_is_closed_at_the_hard_limit(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra_server=limits(soft=2, hard=5))
    async with running_inbound(cfg) as h, await RawClient.connect(h.port) as client:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
        for n in range(4):
            assert (await client.cmd(f"RCPT TO:<nobody{n}@example.net>"))[0] == 550
        # Four errors: the session is still open.
        assert (await client.cmd("NOOP"))[0] == 250
        # The fifth error is answered, then the session is closed.
        assert (await client.cmd("RCPT TO:<nobody5@example.net>"))[0] == 550
        assert await client.reply() == (421, str(errors.TOO_MANY_ERRORS))
        assert await client.reader.read() == b""
        assert h.rejected("too_many_errors") == 1
        assert h.rejected("no_route") == 5


async def test_every_kind_of_error_counts(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra_server=limits(soft=5, hard=5))
    async with running_inbound(cfg) as h, await RawClient.connect(h.port) as client:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert (await client.cmd("MAIL FROM:<bad address>"))[0] == 501  # syntax
        assert (await client.cmd("XYZZY"))[0] == 500  # unknown command
        assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
        assert (await client.cmd("RCPT TO:<user@other.test>"))[0] == 550  # relaying denied
        assert (await client.cmd("RCPT TO:<other@example.net>"))[0] == 550  # unknown user
        assert (await client.cmd("RCPT TO:<user%x@example.com>"))[0] == 550
        assert (await client.reply())[0] == 421


async def test_pipelined_commands_after_the_limit_do_not_run(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra_server=limits(soft=1, hard=1))
    async with running_inbound(cfg) as h, await RawClient.connect(h.port) as client:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        await client.send(
            b"RCPT TO:<a@example.com>\r\nMAIL FROM:<s@example.org>\r\n"
            b"RCPT TO:<user@example.com>\r\nDATA\r\n" + MSG + b".\r\n"
        )
        assert (await client.reply())[0] == 503
        assert (await client.reply())[0] == 421
        assert await client.reader.read() == b""
        assert h.spooled() == []


async def test_a_queued_message_resets_the_count(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra_server=limits(soft=3, hard=3))
    async with running_inbound(cfg) as h, await RawClient.connect(h.port) as client:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        for _ in range(2):
            assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
            assert (await client.cmd("RCPT TO:<other@example.net>"))[0] == 550
            assert (await client.cmd("RCPT TO:<x@other.test>"))[0] == 550
            assert (await client.cmd("RCPT TO:<user@example.com>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            await client.send(MSG + b".\r\n")
            assert (await client.reply())[0] == 250
        assert (await client.cmd("QUIT"))[0] == 221
        assert len(h.spooled()) == 2


async def test_error_replies_past_the_soft_limit_are_delayed(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra_server=limits(soft=2, hard=20, delay="1h"))
    async with running_inbound(cfg) as h, await RawClient.connect(h.port) as client:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
        for n in range(2):
            assert (await client.cmd(f"RCPT TO:<nobody{n}@example.net>"))[0] == 550
        await client.send(b"RCPT TO:<nobody3@example.net>\r\n")
        # The third error reply waits error_delay (an hour): not here soon.
        with pytest.raises(TimeoutError):
            await client.reply(wait=0.5)
    # Stopping the server ended the sleeping session (421 4.3.2 or EOF).
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        while True:
            await client.reply()


def test_soft_limit_above_hard_limit_is_a_config_problem(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="soft_error_limit") as info:
        make_config(tmp_path, extra_server=limits(soft=30, hard=20))
    assert "hard_error_limit" in str(info.value)
