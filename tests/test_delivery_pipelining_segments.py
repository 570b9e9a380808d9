"""Replies to a pipelined group that arrive in consecutive loop turns.

aiosmtplib 5.1.3's SMTPProtocol.data_received drops bytes that arrive while
a parsed reply waits to be picked up; asyncio.wait_for resumes the reader
one turn late, so relay awaits each reply directly (session._next_reply).
A server that writes one reply per command must lose none of them.
"""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol

from relay.session import pipeline

pytestmark = pytest.mark.timeout(30)


class _Transport(asyncio.Transport):
    def __init__(self, on_write):
        super().__init__()
        self._on_write = on_write
        self._closed = False

    def write(self, data):
        self._on_write(data)

    def is_closing(self):
        return self._closed

    def close(self):
        self._closed = True

    def get_extra_info(self, name, default=None):
        return default


async def test_replies_arriving_one_loop_turn_apart_are_all_read():
    loop = asyncio.get_running_loop()
    protocol = SMTPProtocol(loop=loop)
    # One TCP segment per reply, each one loop turn after the previous one.
    segments = [b"250 2.1.0 sender ok\r\n", b"250 2.1.5 rcpt ok\r\n", b"354 go ahead\r\n"]

    def arrive():
        if segments:
            protocol.data_received(segments.pop(0))
            loop.call_soon(arrive)

    transport = _Transport(lambda data: loop.call_soon(arrive))
    protocol.connection_made(transport)
    protocol._response_pending = False  # the greeting and EHLO are behind us
    smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=25)
    smtp.protocol, smtp.transport = protocol, transport
    replies = await pipeline(smtp, [b"MAIL FROM:<a@src.test>", b"RCPT TO:<b@x.test>", b"DATA"], 2)
    assert [r.code for r in replies] == [250, 250, 354]
