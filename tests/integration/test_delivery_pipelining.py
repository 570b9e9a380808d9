"""RFC 2920 command pipelining to next hops that offer it, observed at a real sink.

With PIPELINING, MAIL, every RCPT and DATA (after an RSET on a reused
session) go out as one group: two round trips per message instead of five
(docs/performance.md). Without it, the relay stays in lock-step.
"""

from __future__ import annotations

import asyncio

import aiosmtplib
import pytest
from aiosmtplib.protocol import SMTPProtocol

from relay import errors
from relay.session import pipeline
from tests.support.delivery import (
    BODY,
    OPPORTUNISTIC,
    addresses,
    candidate,
    deliverer,
    envelope,
    make_config,
    route,
)
from tests.support.sink import Sink

pytestmark = pytest.mark.timeout(60)


async def _send(d, sink, n, *rcpts):
    attempts = []
    for i in range(n):
        env = envelope("a@src.test", *rcpts, qid=f"Q{i}")
        attempts.append(
            await d.deliver(
                route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
            )
        )
    return attempts


async def test_commands_go_as_one_group_and_the_body_arrives_intact():
    async with Sink(pipelining=True) as sink:
        d = deliverer(make_config())
        try:
            attempts = await _send(d, sink, 3, "b@x.test", "c@x.test")
        finally:
            await d.close()
    assert all(a.outcome("c@x.test") == errors.DELIVERED for a in attempts)
    assert sink.connections == 1
    assert [m.data for m in sink.messages] == [BODY] * 3
    # Each command but DATA had the next one already waiting behind it;
    # reused sessions start the group with RSET.
    assert sink.grouped == ["MAIL", "RCPT", "RCPT"] + ["RSET", "MAIL", "RCPT", "RCPT"] * 2
    assert sink.lines.count("RSET") == 2


async def test_without_pipelining_each_command_waits_for_its_reply():
    async with Sink() as sink:
        d = deliverer(make_config())
        try:
            attempts = await _send(d, sink, 2, "b@x.test", "c@x.test")
        finally:
            await d.close()
    assert all(a.outcome("b@x.test") == errors.DELIVERED for a in attempts)
    assert sink.grouped == []
    assert len(sink.messages) == 2


async def test_body_is_the_same_with_and_without_pipelining():
    bodies = []
    for pipelining in (False, True):
        async with Sink(pipelining=pipelining) as sink:
            d = deliverer(make_config())
            try:
                await _send(d, sink, 1)
            finally:
                await d.close()
        bodies.append(sink.messages[0].data)
    assert bodies == [BODY, BODY]


async def test_a_refused_recipient_in_the_group_leaves_the_others_delivered():
    async with Sink(pipelining=True, replies={"RCPT bad@x.test": "550 5.1.1 no such user"}) as sink:
        d = deliverer(make_config())
        try:
            (attempt,) = await _send(d, sink, 1, "b@x.test", "bad@x.test", "c@x.test")
        finally:
            await d.close()
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert attempt.outcome("c@x.test") == errors.DELIVERED
    assert attempt.outcome("bad@x.test") == errors.BOUNCED
    assert attempt.last("bad@x.test").code == 550
    assert sink.messages[0].rcpt_tos == ["b@x.test", "c@x.test"]


async def test_every_recipient_refused_then_the_session_is_still_usable():
    # DATA was in the group; the server refuses it (no valid recipient) and
    # no body is sent. The next transaction's RSET clears the session.
    async with Sink(pipelining=True, replies={"RCPT": ["550 5.1.1 no such user"]}) as sink:
        d = deliverer(make_config())
        try:
            refused, delivered = await _send(d, sink, 2)
        finally:
            await d.close()
    assert refused.outcome("b@x.test") == errors.BOUNCED
    assert refused.last("b@x.test").code == 550
    assert delivered.outcome("b@x.test") == errors.DELIVERED
    assert delivered.hosts[0].reused and sink.connections == 1
    assert len(sink.messages) == 1


async def test_a_refused_sender_fails_the_host():
    async with Sink(pipelining=True, replies={"MAIL": "451 4.3.0 try later"}) as sink:
        d = deliverer(make_config())
        try:
            (attempt,) = await _send(d, sink, 1)
        finally:
            await d.close()
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    assert attempt.last("b@x.test").code == 451
    assert sink.messages == []


async def test_a_temporary_reply_to_data_in_the_group_defers():
    async with Sink(pipelining=True, replies={"DATA": "452 4.3.1 full"}) as sink:
        d = deliverer(make_config())
        try:
            (attempt,) = await _send(d, sink, 1)
        finally:
            await d.close()
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    assert attempt.last("b@x.test").code == 452


@pytest.mark.parametrize("how", ["closed", "drops at RSET"])
async def test_a_dead_pooled_session_is_replaced_without_a_failure(how):
    replies = {"RSET": "drop"} if how == "drops at RSET" else {}
    async with Sink(pipelining=True, replies=replies) as sink:
        d = deliverer(make_config())
        try:
            await _send(d, sink, 1)
            if how == "closed":
                sink.kill_connections()
                await asyncio.sleep(0.05)
            (attempt,) = await _send(d, sink, 1)
        finally:
            await d.close()
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    (host,) = attempt.hosts
    assert host.failure is None and not host.reused
    assert sink.connections == 2 and len(sink.messages) == 2


async def test_replies_that_arrive_in_one_packet_are_all_read():
    # aiosmtplib parses one reply per read; a server that answers a whole
    # group in one write leaves the rest in its buffer (relay/session.py
    # reads them from there; this guards that private part of aiosmtplib).
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        pending = 0
        while line := await reader.readline():
            seen.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-raw.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb in (b"MAIL", b"RCPT", b"RSET"):
                pending += 1
            elif verb == b"DATA":
                writer.write(b"250 2.0.0 ok\r\n" * pending + b"354 go ahead\r\n")
                pending = 0
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        d = deliverer(make_config())
        try:
            attempts = []
            for i in range(2):
                env = envelope("a@src.test", "b@x.test", "c@x.test", qid=f"Q{i}")
                attempts.append(
                    await asyncio.wait_for(
                        d.deliver(
                            route(OPPORTUNISTIC), env, addresses(env), BODY,
                            [candidate("mx1.test", port)],
                        ),
                        10,
                    )
                )  # fmt: skip
        finally:
            await d.close()
    finally:
        server.close()
        await server.wait_closed()
    assert all(a.outcome("c@x.test") == errors.DELIVERED for a in attempts)
    assert attempts[1].hosts[0].reused
    assert [line.split(b":")[0] for line in seen[1:5]] == [
        b"MAIL FROM",
        b"RCPT TO",
        b"RCPT TO",
        b"DATA\r\n",
    ]


async def _raw_server(reply_gap_turns: int, seen: list[bytes], data_reply: bytes = b"354 go ahead"):
    """A pipelining server that answers each command as it reads it, one
    write per reply, ``reply_gap_turns`` event-loop turns apart (a server
    without output buffering, or a network cutting a reply burst into
    segments). Its RCPT replies are long (about 90 bytes)."""

    async def pause() -> None:
        for _ in range(reply_gap_turns):
            await asyncio.sleep(0)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 raw.test ESMTP\r\n")
        while line := await reader.readline():
            seen.append(line)
            verb = line[:4].upper()
            if verb == b"EHLO":
                writer.write(b"250-raw.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT":
                address = line.split(b":", 1)[1].strip()
                writer.write(b"250 2.1.5 " + address + b" recipient ok, will be delivered\r\n")
                await pause()
            elif verb in (b"MAIL", b"RSET"):
                writer.write(b"250 2.0.0 ok\r\n")
                await pause()
            elif verb == b"DATA":
                writer.write(data_reply + b"\r\n")
                if data_reply.startswith(b"354"):
                    await reader.readuntil(b"\r\n.\r\n")
                    writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                break
        writer.close()

    return await asyncio.start_server(serve, "127.0.0.1", 0)


async def _deliver_raw(rcpts: list[str], gap: int = 0, data_reply: bytes = b"354 go ahead"):
    """One delivery of BODY to ``rcpts`` through :func:`_raw_server`: (attempt, lines seen)."""
    seen: list[bytes] = []
    server = await _raw_server(gap, seen, data_reply)
    port = server.sockets[0].getsockname()[1]
    try:
        d = deliverer(make_config(command_timeout=3.0))
        try:
            env = envelope("a@src.test", *rcpts, qid="Q1")
            attempt = await asyncio.wait_for(
                d.deliver(route(OPPORTUNISTIC), env, rcpts, BODY, [candidate("mx1.test", port)]),
                20,
            )
        finally:
            await d.close()
    finally:
        server.close()
        await server.wait_closed()
    return attempt, seen


@pytest.mark.parametrize("gap", [0, 1, 2, 3])
async def test_replies_written_one_turn_apart_are_none_of_them_lost(gap):
    # aiosmtplib drops bytes that arrive while a parsed reply waits to be
    # picked up; relay must pick each reply up before the next can arrive.
    rcpts = [f"r{i}@x.test" for i in range(5)]
    attempt, _ = await _deliver_raw(rcpts, gap)
    assert all(attempt.outcome(r) == errors.DELIVERED for r in rcpts), attempt


async def test_a_long_recipient_list_goes_in_groups_that_fit_the_reply_buffer():
    # 600 recipients: their replies (about 55 KB, written as fast as the
    # server reads) would overflow aiosmtplib's 32 KiB reply buffer if all
    # were sent at once ("Response too long", a 5xx: every recipient
    # bounced). relay sends at most PIPELINE_GROUP_MAX commands per group.
    rcpts = [f"recipient-with-a-long-name-{i:04d}@x.test" for i in range(600)]
    attempt, seen = await _deliver_raw(rcpts)
    assert {attempt.outcome(r) for r in rcpts} == {errors.DELIVERED}, attempt.last(rcpts[0])
    assert sum(line.startswith(b"RCPT TO:") for line in seen) == 600


@pytest.mark.parametrize("answer", [b"250 2.0.0 ok", b"334 what?"])
async def test_a_reply_to_data_other_than_354_or_an_error_defers(answer):
    # A 2xx/3xx that is not 354 says the server is confused or out of step:
    # no body was sent, so the recipients must not be taken as delivered.
    attempt, _ = await _deliver_raw(["b@x.test"], data_reply=answer)
    assert attempt.outcome("b@x.test") == errors.DEFERRED


# A pooled session whose RSET is answered 421 (the server's idle timeout fired
# as the group went out) is replaced like a closed one, as the lock-step
# liveness check does: not a host failure.
@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_pooled_session_answering_rset_with_421_is_replaced(pipelining):
    async with Sink(pipelining=pipelining, replies={"RSET": ["421 4.4.2 idle timeout"]}) as sink:
        d = deliverer(make_config())
        try:
            await _send(d, sink, 1)
            (attempt,) = await _send(d, sink, 1)
        finally:
            await d.close()
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert all(h.failure is None for h in attempt.hosts)


# A recipient refused for good (550) keeps its 550 when the connection is lost
# later in the same transaction: each RCPT reply is recorded as it arrives (in
# lock-step and in a pipelined group), so it is bounced, not retried.
@pytest.mark.parametrize(
    ("pipelining", "third"),
    [(False, "421 4.3.2 shutting down"), (True, "drop")],
)
async def test_a_550_before_a_lost_connection_still_bounces(pipelining, third):
    replies = {"RCPT bad@x.test": "550 5.1.1 no such user", "RCPT c@x.test": third}
    async with Sink(pipelining=pipelining, replies=replies) as sink:
        d = deliverer(make_config())
        try:
            (attempt,) = await _send(d, sink, 1, "bad@x.test", "b@x.test", "c@x.test", "e@x.test")
        finally:
            await d.close()
    assert attempt.outcome("bad@x.test") == errors.BOUNCED


# Replies to a pipelined group that arrive in consecutive loop turns.
#
# aiosmtplib 5.1.3's SMTPProtocol.data_received drops bytes that arrive while
# a parsed reply waits to be picked up; asyncio.wait_for resumes the reader
# one turn late, so relay awaits each reply directly (session._next_reply).
# A server that writes one reply per command must lose none of them.


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


@pytest.mark.timeout(30)
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
