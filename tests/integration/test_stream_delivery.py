"""A large spooled body is sent from its file in pieces (docs/performance.md), byte-exact,
over real SMTP to in-process sinks on 127.0.0.1."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import os
import tracemalloc
from collections.abc import Iterator
from pathlib import Path
from typing import cast

import pytest

from relay import errors
from relay.session import SEND_CHUNK
from relay.spool import Spool
from relay.spoolbody import IN_MEMORY_MAX, BodyFile
from tests.support import configs
from tests.support.delivery import (
    OPPORTUNISTIC,
    STRICT,
    addresses,
    candidate,
    deliverer,
    envelope,
    make_config,
    route,
)
from tests.support.dnsserver import dnsmasq_servers
from tests.support.inbound import RawClient, running_inbound
from tests.support.inbound import make_config as inbound_config
from tests.support.integ import InProcessRelay, dsn_parts, integration_toml
from tests.support.sink import Sink
from tests.support.spool import body_path
from tests.support.stream import HEAD, DigestSink, big_body, stuff
from tests.support.wait import until

pytestmark = pytest.mark.timeout(60)

MIB = 1 << 20
#: Dots at piece starts, and a line start one byte after a piece end (the
#: piece would end between CR and LF: it is cut one byte short).
BOUNDARIES = (SEND_CHUNK, 2 * SEND_CHUNK + 1, 3 * SEND_CHUNK - 1, 5 * SEND_CHUNK + 2)


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.open()
    return spool


@pytest.fixture
def body_file(spool: Spool) -> Iterator[tuple[bytes, BodyFile]]:
    body = big_body(3 * MIB, dots_at=BOUNDARIES)
    yield body, spooled(spool, body)


def spooled(spool: Spool, body: bytes, qid: str = "Q1") -> BodyFile:
    spool.put(envelope(qid=qid), body)
    opened = spool.open_body(qid, IN_MEMORY_MAX)
    assert isinstance(opened, BodyFile)
    return opened


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_large_body_arrives_byte_exact(closing, body_file, pipelining) -> None:
    body, file = body_file
    with file:
        async with Sink(pipelining=pipelining) as sink:
            d = deliverer(make_config())
            closing(d)
            env = envelope()
            attempt = await d.deliver(
                route(OPPORTUNISTIC), env, addresses(env), file, [candidate("mx1.test", sink.port)]
            )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    (msg,) = sink.messages
    assert msg.data == body
    assert f"SIZE={len(body)}" in msg.mail_options


async def test_a_large_body_over_verified_tls(closing, pki, body_file) -> None:
    body, file = body_file
    with file:
        async with Sink(tls_context=pki.server_context("mx1.test")) as sink:
            d = deliverer(make_config(pki.ca_file))
            closing(d)
            env = envelope()
            attempt = await d.deliver(
                route(STRICT), env, addresses(env), file, [candidate("mx1.test", sink.port)]
            )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert sink.messages[0].data == body and sink.messages[0].tls


async def test_a_body_without_a_final_crlf_gets_one(closing, spool) -> None:
    body = big_body(IN_MEMORY_MAX + 10)[:-2] + b".last line, no CRLF"
    with spooled(spool, body) as file:
        async with Sink() as sink:
            d = deliverer(make_config())
            closing(d)
            env = envelope()
            attempt = await d.deliver(
                route(OPPORTUNISTIC), env, addresses(env), file, [candidate("mx1.test", sink.port)]
            )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert sink.messages[0].data == body + b"\r\n"


@pytest.mark.parametrize("offset", [SEND_CHUNK - 1, SEND_CHUNK, SEND_CHUNK + 1])
@pytest.mark.parametrize("bare", [b"\n", b"\r"], ids=["LF", "CR"])
async def test_a_bare_line_ending_at_a_piece_boundary_is_refused(
    closing, spool, offset, bare
) -> None:
    line = b"x" * 98 + b"\r\n"
    before = line * (offset // len(line)) + b"y" * (offset % len(line))
    body = before + bare + b"z\r\n" + line * (SEND_CHUNK // len(line))
    assert body[offset : offset + 1] == bare
    with spooled(spool, body) as file:
        async with Sink() as sink:
            d = deliverer(make_config())
            closing(d)
            env = envelope()
            attempt = await d.deliver(
                route(OPPORTUNISTIC), env, addresses(env), file, [candidate("mx1.test", sink.port)]
            )
    assert attempt.outcome("b@x.test") == errors.BOUNCED
    assert attempt.last("b@x.test") == errors.BARE_LINE_ENDING
    assert sink.connections == 0


@pytest.mark.parametrize("script", ["drop", "stall"])
async def test_lost_reply_after_the_dot_defers_without_failover(closing, body_file, script):
    _, file = body_file
    with file:
        async with Sink(replies={"DATA": script}) as one, Sink() as two:
            d = deliverer(make_config(data_timeout=0.5))
            closing(d)
            env = envelope()
            cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
            attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), file, cands)
    (result,) = attempt.results["b@x.test"]
    assert isinstance(result, errors.ReplyLost)
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    assert two.connections == 0 and not two.messages


@pytest.mark.parametrize(
    ("reply", "outcome"),
    [("554 5.6.0 content refused", errors.BOUNCED), ("451 4.3.0 try later", errors.DELIVERED)],
)
async def test_a_refusal_after_the_dot_is_kept(closing, body_file, reply, outcome):
    body, file = body_file
    with file:
        async with Sink(replies={"DATA": reply}) as one, Sink() as two:
            d = deliverer(make_config())
            closing(d)
            env = envelope()
            cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
            attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), file, cands)
    assert attempt.outcome("b@x.test") == outcome
    assert attempt.hosts[0].reply is not None and str(attempt.hosts[0].reply) == reply
    # A 4xx to the dot moves on to the next host (the body is read again).
    assert [m.data for m in two.messages] == ([body] if outcome == errors.DELIVERED else [])


async def test_the_scheduler_sends_a_large_body_and_closes_its_file(tmp_path) -> None:
    body = big_body(2 * MIB, dots_at=BOUNDARIES[:2])
    fds = len(os.listdir("/proc/self/fd"))
    with dnsmasq_servers() as start:
        server = start(hosts={"mx1.corp.test": ["127.0.0.1"]})
        async with Sink() as sink:
            routes = configs.route("Corp", "mx1.corp.test", sink.port)
            toml = integration_toml(tmp_path, server, routes, configs.rule("Corp", "@corp.test"))
            async with InProcessRelay(tmp_path, toml) as relay:
                await relay.send_and_settle(
                    "alice@sender.test", ["bob@corp.test"], body, when=lambda: sink.messages
                )
                assert relay.spooled() == []
        assert sink.messages[0].data == body
    gc.collect()
    assert len(os.listdir("/proc/self/fd")) <= fds


async def test_a_dsn_for_a_large_message_quotes_its_headers(tmp_path) -> None:
    body = big_body(2 * MIB)
    hosts = {"mx1.corp.test": ["127.0.0.1"], "mx.sender.test": ["127.0.0.1"]}
    with dnsmasq_servers() as start:
        server = start(hosts=hosts, mx={"sender.test": [(10, "mx.sender.test")]})
        refusing = Sink(replies={"RCPT bob@corp.test": "550 5.1.1 no such user"})
        async with refusing as sink, Sink() as dsn_sink:
            routes = configs.route("Corp", "mx1.corp.test", sink.port) + configs.route(
                "Senders", "sender.test", dsn_sink.port, mx_lookup=True
            )
            rules = configs.rule("Corp", "@corp.test") + configs.rule("Senders", "@sender.test")
            async with InProcessRelay(
                tmp_path, integration_toml(tmp_path, server, routes, rules)
            ) as relay:
                await relay.send_and_settle(
                    "alice@sender.test", ["bob@corp.test"], body, when=lambda: dsn_sink.messages
                )
    message, _, recipients = dsn_parts(dsn_sink.messages[0].data)
    assert recipients[0]["status"] == "5.1.1"
    assert b"Subject: big" in dsn_sink.messages[0].data
    assert len(dsn_sink.messages[0].data) < 64 * 1024


# --- memory ------------------------------------------------------------------


async def test_relaying_a_large_message_takes_far_less_memory_than_its_size(tmp_path) -> None:
    """In and out: SMTP into a real spool, then the real scheduler and
    deliverer to a sink that keeps only a digest. Python's peak allocation
    during the relay stays a small fraction of the message size."""
    size = 12 * MIB
    content = big_body(size)
    wire = stuff(content) + b".\r\n"
    digests: list[tuple[str, int]] = []
    loop = asyncio.get_running_loop()
    sink = await loop.create_server(lambda: DigestSink(digests), "127.0.0.1", 0)
    port = sink.sockets[0].getsockname()[1]
    cfg = inbound_config(tmp_path, max_message_size=2 * size)
    with dnsmasq_servers() as start:
        server = start(hosts={"mx1.corp.test": ["127.0.0.1"]})
        route_text = configs.route("Corp", "mx1.corp.test", port)
        toml = integration_toml(tmp_path, server, route_text, configs.rule("Corp", "@example.com"))
        relay = InProcessRelay(tmp_path, toml)
        tracemalloc.start()
        try:
            async with (
                relay,
                running_inbound(cfg, spool=relay.spool) as h,
                await RawClient.connect(h.port) as client,
            ):
                assert (await client.cmd("EHLO client.test"))[0] == 250
                assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
                assert (await client.cmd("RCPT TO:<user@example.com>"))[0] == 250
                assert (await client.cmd("DATA"))[0] == 354
                view = memoryview(wire)
                for at in range(0, len(wire), 1 << 16):
                    await client.send(view[at : at + (1 << 16)])  # type: ignore[arg-type]
                assert (await client.reply(wait=30))[0] == 250
                (env,) = h.accepted
                with body_path(relay.spool, env.id).open("rb") as fh:
                    head = fh.read(4096)
                relay.scheduler.add(env)
                await until(lambda: digests, within=30)
                _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
            sink.close()
            await sink.wait_closed()
    # What went out is our Received header and the client's content, stuffed.
    stored = head[: head.index(HEAD)] + content
    assert env.size == len(stored)
    assert digests == [(hashlib.sha256(stuff(stored)).hexdigest(), len(stuff(stored)))]
    # The in-memory path held several copies of the message: here well under one.
    assert peak < size / 4, f"peak {peak / MIB:.1f} MiB for a {size / MIB:.0f} MiB message"


class _HangUpInData(asyncio.Protocol):
    """A next hop that takes DATA, then closes the connection at the first body bytes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Any loop's transport: uvloop's are not asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        self.in_data = False
        self.transport.write(b"220 hangup.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        if self.in_data:
            self.transport.close()
            return
        for line in data.split(b"\r\n"):
            if not line:
                continue
            if line.upper() == b"DATA":
                self.in_data = True
                self.transport.write(b"354 go ahead\r\n")
            else:
                self.transport.write(b"250 ok\r\n")


async def test_a_connection_lost_before_the_dot_fails_over(closing, body_file) -> None:
    """Before the final dot the next hop cannot have the message: not a lost
    reply, so the next candidate gets it in the same attempt."""
    body, file = body_file
    loop = asyncio.get_running_loop()
    hangup = await loop.create_server(_HangUpInData, "127.0.0.1", 0)
    try:
        with file:
            async with Sink() as two:
                d = deliverer(make_config(data_timeout=5))
                closing(d)
                env = envelope()
                cands = [
                    candidate("mx1.test", hangup.sockets[0].getsockname()[1]),
                    candidate("mx2.test", two.port),
                ]
                attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), file, cands)
    finally:
        hangup.close()
        await hangup.wait_closed()
    first, second = attempt.results["b@x.test"]
    assert isinstance(first, errors.ConnectionLost), first
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert [m.data for m in two.messages] == [body]
