"""Connection limits: max_connections in total, max_connections_per_ip per client."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay import errors
from relay.admission import LOG_INTERVAL, RefusalLog, client_key
from tests.support.inbound import Harness, RawClient, make_config, running_inbound

MSG = b"Subject: hi\r\n\r\nHallo.\r\n"


async def connect(port: int, source: str = "127.0.0.1") -> tuple[RawClient, tuple[int, str]]:
    """A connection from ``source`` and its first line (the greeting or a refusal)."""
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 5
    )
    client = RawClient(reader, writer)
    return client, await client.reply()


async def open_sessions(port: int, source: str, count: int) -> list[RawClient]:
    clients = []
    for _ in range(count):
        client, (code, _) = await connect(port, source)
        assert code == 220
        clients.append(client)
    return clients


async def refused(port: int, source: str, reply: errors.Reply) -> None:
    client, first = await connect(port, source)
    async with client:
        assert first == (421, str(reply))
        # Closed at once, no session: nothing more comes.
        assert await client.reader.read() == b""


async def settle(h: Harness, total: int) -> None:
    """Wait (bounded) until the server has seen connections close."""
    for _ in range(200):
        if h.inbound.counts.total == total:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{h.inbound.counts.total} sessions open, expected {total}")


@contextlib.asynccontextmanager
async def closing(clients: list[RawClient]) -> AsyncIterator[list[RawClient]]:
    try:
        yield clients
    finally:
        for client in clients:
            await client.close()


def refusals(h: Harness, reason: str) -> float:
    value = h.metrics.registry.get_sample_value(
        "relay_connections_refused_total", {"reason": reason}
    )
    return value or 0.0


async def test_max_connections_is_enforced_at_its_value(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra_server="max_connections = 4")
    async with running_inbound(cfg) as h:
        # From several addresses: the limit is over all clients.
        first = await open_sessions(h.port, "127.0.0.2", 2)
        second = await open_sessions(h.port, "127.0.0.3", 2)
        async with closing(first + second):
            await refused(h.port, "127.0.0.4", errors.TOO_MANY_CONNECTIONS)
            assert refusals(h, "max_connections") == 1
            gauge = h.metrics.registry.get_sample_value("relay_inbound_connections")
            assert gauge == 4
            await first[0].close()
            await settle(h, 3)
            # One closed: one more gets a session, and sends mail.
            client, (code, _) = await connect(h.port, "127.0.0.4")
            async with client:
                assert code == 220
                await client.start_data()
                await client.send(MSG + b".\r\n")
                assert (await client.reply())[0] == 250


async def test_max_connections_per_ip_is_enforced_per_address(tmp_path: Path) -> None:
    extra = 'max_connections_per_ip = 3\nrelay_networks = ["127.0.0.9/32"]'
    cfg = make_config(tmp_path, extra_server=extra)
    async with (
        running_inbound(cfg) as h,
        closing(await open_sessions(h.port, "127.0.0.2", 3)) as clients,
    ):
        await refused(h.port, "127.0.0.2", errors.TOO_MANY_FROM_YOU)
        # Other addresses have their own count.
        async with closing(await open_sessions(h.port, "127.0.0.3", 3)):
            await refused(h.port, "127.0.0.3", errors.TOO_MANY_FROM_YOU)
            # relay_networks are exempt from the per-client limit.
            async with closing(await open_sessions(h.port, "127.0.0.9", 5)):
                assert refusals(h, "max_connections_per_ip") == 2
        await clients[0].close()
        await settle(h, 2)
        async with closing(await open_sessions(h.port, "127.0.0.2", 1)):
            await refused(h.port, "127.0.0.2", errors.TOO_MANY_FROM_YOU)


async def test_a_refused_client_is_logged_once_per_minute(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    cfg = make_config(tmp_path, extra_server="max_connections_per_ip = 1")
    async with running_inbound(cfg) as h:
        async with closing(await open_sessions(h.port, "127.0.0.2", 1)):
            for _ in range(5):
                await refused(h.port, "127.0.0.2", errors.TOO_MANY_FROM_YOU)
            async with closing(await open_sessions(h.port, "127.0.0.3", 1)):
                await refused(h.port, "127.0.0.3", errors.TOO_MANY_FROM_YOU)
        assert refusals(h, "max_connections_per_ip") == 6
    lines = [r.fields for r in caplog.records if r.msg == "connection_refused"]  # type: ignore[attr-defined]
    assert [(line["client"], line["reason"]) for line in lines] == [
        ("127.0.0.2", "max_connections_per_ip"),
        ("127.0.0.3", "max_connections_per_ip"),
    ]


def test_ipv6_clients_are_counted_per_64() -> None:
    assert (
        client_key("2001:db8:1:2::1") == client_key("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    )
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:192.0.2.1") == client_key("192.0.2.1") == "192.0.2.1"


async def test_when_full_the_longest_idle_session_makes_room(tmp_path: Path) -> None:
    extra = 'max_connections = 3\nbusy_timeout = "200ms"'
    cfg = make_config(tmp_path, extra_server=extra)
    async with running_inbound(cfg) as h:
        # The oldest session is in DATA: busy, however long it is quiet.
        in_data = await RawClient.connect(h.port)
        await in_data.start_data()
        async with closing([in_data, *await open_sessions(h.port, "127.0.0.2", 2)]) as clients:
            await asyncio.sleep(0.3)  # (at least) past busy_timeout
            assert (await clients[2].cmd("NOOP"))[0] == 250  # just active again
            newcomer, (code, _) = await connect(h.port, "127.0.0.3")
            async with newcomer:
                assert code == 220
                await newcomer.start_data()
                await newcomer.send(MSG + b".\r\n")
                assert (await newcomer.reply())[0] == 250
            # The session idle longest between commands was closed for it.
            assert await clients[1].reply() == (421, str(errors.BUSY_TIMEOUT))
            assert await clients[1].reader.read() == b""
            assert h.rejected("busy_timeout") == 1
            # The others carry on.
            await in_data.send(MSG + b".\r\n")
            assert (await in_data.reply())[0] == 250
            assert (await clients[2].cmd("NOOP"))[0] == 250
            assert refusals(h, "max_connections") == 0


async def test_a_thousand_idle_connections_do_not_stop_mail(tmp_path: Path) -> None:
    # The defaults (max_connections 1000, 20 per address), from 50
    # addresses; only busy_timeout is short, for the test's sake.
    cfg = make_config(tmp_path, extra_server='busy_timeout = "1s"')
    async with running_inbound(cfg) as h:
        if resource.getrlimit(resource.RLIMIT_NOFILE)[0] < 2100:
            pytest.skip("2000 descriptors needed (client and server side of 1000 connections)")
        idle: list[RawClient] = []
        async with closing(idle):
            for n in range(50):
                batch = await asyncio.gather(
                    *(connect(h.port, f"127.0.1.{n + 1}") for _ in range(20))
                )
                idle += [client for client, _ in batch]
                assert [first[0] for _, first in batch] == [220] * 20
            assert len(idle) == 1000
            assert h.inbound.counts.total == 1000
            await asyncio.sleep(1.1)
            client, (code, _) = await connect(h.port, "127.0.2.1")
            async with client:
                assert code == 220
                await client.start_data()
                await client.send(MSG + b".\r\n")
                assert (await client.reply())[0] == 250
            assert len(h.spooled()) == 1
            assert h.rejected("busy_timeout") == 1


def test_the_refusal_log_speaks_again_after_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    now = [1000.0]
    log = RefusalLog(clock=lambda: now[0])
    for _ in range(3):
        log.refused("192.0.2.1", "192.0.2.1", "max_connections_per_ip", 20)
    now[0] += LOG_INTERVAL
    log.refused("192.0.2.1", "192.0.2.1", "max_connections_per_ip", 20)
    lines = [r.fields for r in caplog.records if r.msg == "connection_refused"]  # type: ignore[attr-defined]
    assert [line["refused_since_last"] for line in lines] == [0, 2]


async def test_start_raises_the_soft_open_files_limit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="relay")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"hard open-files limit {hard} is below max_connections + 1024")
    resource.setrlimit(resource.RLIMIT_NOFILE, (512, hard))
    try:
        async with running_inbound(make_config(tmp_path)):
            raised = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert raised == hard if hard != resource.RLIM_INFINITY else raised >= 2024
    [line] = [r.fields for r in caplog.records if r.msg == "fd_limit_raised"]  # type: ignore[attr-defined]
    assert line["soft_before"] == 512
