"""The client's name in Received: forward-confirmed reverse DNS through the test DNS server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.content import received_header
from relay.dns import DnsResolver, confirmed_name
from tests.support.dnsserver import DnsmasqFactory, DnsServer, dnsmasq_servers
from tests.support.inbound import make_config, running_inbound
from tests.support.spool import read_body

MSG = b"Subject: hi\r\n\r\nHallo.\r\n"


@pytest.fixture
def dns() -> Iterator[DnsmasqFactory]:
    with dnsmasq_servers() as factory:
        yield factory


def records(dns: DnsmasqFactory) -> DnsServer:
    return dns(
        # host-record: A and the PTR back; confirmed.
        hosts={"client.test": ["127.0.0.2"], "elsewhere.test": ["127.0.0.9"]},
        ptr={
            "127.0.0.3": "liar.test",  # no address record at all
            "127.0.0.4": "elsewhere.test",  # its A is another address
            "127.0.0.7": "127.0.0.7",  # a PTR that pretends to be an address
        },
        timeout=["slow.test"],
    )


async def test_confirmed_name_follows_ptr_then_a_back(dns: DnsmasqFactory) -> None:
    resolver = DnsResolver(records(dns).config(timeout=2.0))
    assert await confirmed_name(resolver, "127.0.0.2", 2.0) == "client.test"
    assert await confirmed_name(resolver, "127.0.0.3", 2.0) is None
    assert await confirmed_name(resolver, "127.0.0.4", 2.0) is None
    assert await confirmed_name(resolver, "127.0.0.5", 2.0) is None  # no PTR
    assert await confirmed_name(resolver, "127.0.0.7", 2.0) is None


async def send_from(port: int, source: str) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    for line in (
        b"",
        b"EHLO helo.test\r\n",
        b"MAIL FROM:<s@example.org>\r\n",
        b"RCPT TO:<user@example.com>\r\n",
        b"DATA\r\n",
        MSG + b".\r\n",
        b"QUIT\r\n",
    ):
        writer.write(line)
        while True:
            reply = await asyncio.wait_for(reader.readline(), 10)
            assert reply[:1] in b"23", reply
            if reply[3:4] != b"-":
                break
    writer.close()


async def test_received_names_the_client_as_postfix_does(
    tmp_path: Path, dns: DnsmasqFactory
) -> None:
    resolver = DnsResolver(records(dns).config(timeout=2.0))
    async with running_inbound(make_config(tmp_path), resolver=resolver) as h:
        for source in ("127.0.0.2", "127.0.0.3", "127.0.0.4"):
            await send_from(h.port, source)
        lines = sorted(read_body(h.spool, e.id).split(b"\r\n", 1)[0] for e in h.spooled())
    assert lines == [
        b"Received: from helo.test (client.test [127.0.0.2])",
        b"Received: from helo.test (unknown [127.0.0.3])",
        b"Received: from helo.test (unknown [127.0.0.4])",
    ]


async def test_without_a_resolver_loopback_is_localhost(tmp_path: Path) -> None:
    async with running_inbound(make_config(tmp_path)) as h:
        await send_from(h.port, "127.0.0.2")
        [env] = h.spooled()
        head = read_body(h.spool, env.id).split(b"\r\n", 1)[0]
    assert head == b"Received: from helo.test (localhost [127.0.0.2])"


def test_received_header_unknown_and_ipv6() -> None:
    header = received_header(
        helo="h.test",
        client_ip="2001:db8::1",
        hostname="relay.test",
        protocol="ESMTP",
        queue_id="Q",
        recipients=[],
        when=0.0,
    )
    assert header.startswith(b"Received: from h.test (unknown [IPv6:2001:db8::1])\r\n")


async def test_a_silent_dns_server_costs_at_most_reverse_dns_timeout(
    tmp_path: Path, dns: DnsmasqFactory
) -> None:
    # PTR queries for 127.0.0.6 go to a server that never answers; the
    # resolver itself would wait 30 s, the session at most 300 ms (the
    # test's replies wait 10 s).
    server = dns(timeout=["6.0.0.127.in-addr.arpa"])
    resolver = DnsResolver(server.config(timeout=30.0))
    cfg = make_config(tmp_path, extra_server='reverse_dns_timeout = "300ms"')
    async with running_inbound(cfg, resolver=resolver) as h:
        await send_from(h.port, "127.0.0.6")
        [env] = h.spooled()
        head = read_body(h.spool, env.id).split(b"\r\n", 1)[0]
    assert head == b"Received: from helo.test (unknown [127.0.0.6])"
