"""The error limits: slower replies after soft_error_limit errors, 421 at hard_error_limit."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.support.inbound import RawClient, make_config, running_inbound


def limits(soft: int, hard: int, delay: str = "1ms") -> str:
    return f'soft_error_limit = {soft}\nhard_error_limit = {hard}\nerror_delay = "{delay}"'


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
