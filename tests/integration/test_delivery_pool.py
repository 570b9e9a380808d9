"""Connection reuse per next hop (docs/tls.md), observed at the sink."""

from __future__ import annotations

import asyncio

import pytest

from relay import errors
from tests.support.delivery import (
    BODY,
    OPPORTUNISTIC,
    STRICT,
    addresses,
    candidate,
    deliverer,
    envelope,
    make_config,
    route,
)
from tests.support.pki import Pki
from tests.support.sink import Sink

pytestmark = pytest.mark.timeout(60)


async def _send(d, sink, n, policy=OPPORTUNISTIC, host="mx1.test"):
    attempts = []
    for i in range(n):
        env = envelope(qid=f"Q{i}")
        attempts.append(
            await d.deliver(route(policy), env, addresses(env), BODY, [candidate(host, sink.port)])
        )
    return attempts


async def test_many_messages_few_connections():
    async with Sink() as sink:
        d = deliverer(make_config())
        try:
            attempts = await _send(d, sink, 20)
        finally:
            await d.close()
    assert all(a.outcome("b@x.test") == errors.DELIVERED for a in attempts)
    assert len(sink.messages) == 20 and sink.connections == 1
    # RSET before each reused transaction (RFC 5321 section 4.1.1.5).
    assert sink.lines.count("RSET") == 19
    assert [a.hosts[0].reused for a in attempts] == [False] + [True] * 19
    # close() said goodbye.
    assert sink.lines[-1] == "QUIT"


async def test_reuse_keeps_tls_and_verification(tmp_path):
    pki = Pki(tmp_path)
    async with Sink(tls_context=pki.server_context("mx1.test")) as sink:
        d = deliverer(make_config(pki.ca_file))
        try:
            attempts = await _send(d, sink, 5, STRICT)
        finally:
            await d.close()
    assert sink.connections == 1
    assert all(m.tls for m in sink.messages)
    assert all(a.hosts[0].verified for a in attempts)


async def test_dead_pooled_connection_is_replaced():
    async with Sink() as sink:
        d = deliverer(make_config())
        try:
            await _send(d, sink, 1)
            sink.kill_connections()
            await asyncio.sleep(0.05)
            (attempt,) = await _send(d, sink, 1)
        finally:
            await d.close()
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    (host,) = attempt.hosts
    assert host.failure is None and not host.reused
    assert sink.connections == 2 and len(sink.messages) == 2


async def test_pooled_connection_dead_at_rset_is_replaced():
    # The server forgets the connection without closing it from our view:
    # the RSET gets no answer but a drop; the attempt still succeeds.
    async with Sink(replies={"RSET": "drop"}) as sink:
        d = deliverer(make_config())
        try:
            first, second = await _send(d, sink, 2)
        finally:
            await d.close()
    assert second.outcome("b@x.test") == errors.DELIVERED
    assert second.hosts[0].failure is None and not second.hosts[0].reused
    assert sink.connections == 2


async def test_idle_session_expires():
    async with Sink() as sink:
        d = deliverer(make_config(idle_timeout=0.1))
        try:
            await _send(d, sink, 1)
            await asyncio.sleep(0.3)
            await _send(d, sink, 1)
        finally:
            await d.close()
    assert sink.connections == 2
    assert "QUIT" in sink.lines


async def test_different_policy_is_a_different_next_hop():
    async with Sink() as sink:
        d = deliverer(make_config())
        try:
            await _send(d, sink, 1, OPPORTUNISTIC)
            await _send(d, sink, 1, OPPORTUNISTIC.__class__(False, False, False))
            await _send(d, sink, 1, OPPORTUNISTIC, host="mx2.test")
        finally:
            await d.close()
    # Same (ip, port, policy) but another server_hostname: a new connection.
    assert sink.connections == 2


async def test_hop_limit_is_never_exceeded_while_waiters_are_woken():
    # A release wakes every waiter; while they are between "woken" and
    # "holding", the hop's gate must not be dropped, or the next arrival
    # would get a fresh gate and the limit would count twice.
    from relay.config import TlsPolicy
    from relay.hop import Hop
    from relay.pool import Pool as _Pool

    pool = _Pool()
    key = Hop("127.0.0.1", 25, TlsPolicy(), "mx.test")
    active = peak = 0

    async def user(i: int) -> None:
        nonlocal active, peak
        await asyncio.sleep(i * 0.001)
        async with pool.slot(key, lambda: 2):
            active += 1
            peak = max(peak, active)
            await asyncio.sleep(0.004)
            active -= 1

    await asyncio.gather(*(user(i) for i in range(60)))
    assert peak <= 2
    assert pool.hops == 0
