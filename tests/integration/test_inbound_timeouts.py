"""The idle timer around DATA: per data line, and never during the spool write.

aiosmtpd resets [server] timeout per command only; RFC 5321 section
4.5.3.2 times each data block (3 minutes) and lets the client wait 10
minutes for the reply to the final dot.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from relay import errors
from relay.envelope import Envelope
from relay.spool import Spool
from relay.spoolbody import BodyWriter
from tests.support.inbound import RawClient, make_config, running_inbound
from tests.support.spool import read_body


class SlowSpool(Spool):
    """A real spool whose writes take ``delay`` seconds (a slow disk's fsync)."""

    def __init__(self, path: Path, delay: float) -> None:
        super().__init__(path, fsync=False)
        self.delay = delay

    def _place(
        self,
        envelope: Envelope,
        data: bytes,
        prefix: bytes = b"",
        writer: BodyWriter | None = None,
    ) -> list[str]:
        time.sleep(self.delay)  # in the spool's thread, as a slow fsync would be
        return super()._place(envelope, data, prefix, writer)


async def test_slow_data_longer_than_the_timeout_is_accepted(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, timeout="1s")
    async with running_inbound(cfg) as h:
        async with await RawClient.connect(h.port) as client:
            await client.start_data()
            await client.send(b"Subject: slow\r\n\r\n")
            # 2.4 s of DATA in all, a line every 0.3 s: each line is activity.
            for i in range(8):
                await asyncio.sleep(0.3)
                await client.send(b"line %d\r\n" % i)
            await client.send(b".\r\n")
            code, text = await client.reply()
        assert code == 250, text
        [env] = h.spooled()
        assert read_body(h.spool, env.id).endswith(b"line 7\r\n")


async def test_stalled_data_still_times_out(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, timeout="500ms")
    async with running_inbound(cfg) as h:
        async with await RawClient.connect(h.port) as client:
            await client.start_data()
            await client.send(b"Subject: stalled\r\n\r\n")
            _, text = await client.reply(wait=5)
        assert text == str(errors.IDLE_TIMEOUT)
        assert h.spooled() == []


async def test_timer_is_off_during_the_spool_write_and_back_after(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, timeout="500ms")
    spool = SlowSpool(cfg.queue.path, delay=1.5)
    async with running_inbound(cfg, spool=spool) as h:
        async with await RawClient.connect(h.port) as client:
            await client.start_data()
            await client.send(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")
            # The write takes three timeouts: the client gets its 250, not a
            # 421 for a message that is queued anyway (and then resent).
            code, text = await client.reply(wait=5)
            assert code == 250, text
            # And the timer runs again once the reply is out (no command
            # came since to restart it).
            started = time.monotonic()
            _, text = await client.reply(wait=5)
            assert text == str(errors.IDLE_TIMEOUT)
            assert time.monotonic() - started < 3
        assert len(h.spooled()) == 1


async def test_client_gone_during_the_spool_write_still_schedules_the_message(
    tmp_path: Path,
) -> None:
    # The session is cancelled when the client disconnects; the write goes
    # on and lands, so the message is durable and must be scheduled now
    # (not only at the next start), although no 250 was sent.
    cfg = make_config(tmp_path)
    spool = SlowSpool(cfg.queue.path, delay=0.5)
    async with running_inbound(cfg, spool=spool) as h:
        async with await RawClient.connect(h.port) as client:
            await client.start_data()
            await client.send(b"Subject: hi\r\n\r\nHello.\r\n.\r\n")
            await asyncio.sleep(0.1)
        for _ in range(50):
            if h.accepted:
                break
            await asyncio.sleep(0.05)
        assert [e.id for e in h.accepted] == [e.id for e in h.spooled()]
        assert len(h.accepted) == 1
