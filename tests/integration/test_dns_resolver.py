"""DnsResolver against a real dnsmasq on loopback: answers and failure classes."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator

import pytest

from relay.addresses import ip_literal
from relay.config import DnsConfig
from relay.dns import DnsResolver
from relay.errors import DnsTemporary, NoRoute, NoSuchDomain, NullMx
from tests.support.dnsserver import DnsServer, dns_server, dnsmasq_servers  # noqa: F401

ZONE = {
    "hosts": {
        "mx1.example.test": ["192.0.2.1", "2001:db8::1"],
        "mx2.example.test": ["192.0.2.2"],
        "dual.example.test": ["192.0.2.10", "192.0.2.11", "2001:db8::10", "2001:db8::11"],
        "v4.example.test": ["192.0.2.20"],
        "v6.example.test": ["2001:db8::20"],
        "nomx.test": ["192.0.2.30"],
    },
    "mx": {
        "example.test": [(20, "MX2.example.test"), (10, "mx1.example.test")],
        "null.test": [(0, ".")],
        "mixednull.test": [(0, "."), (10, "mx1.example.test")],
        "mxonly.test": [(10, "mx1.example.test")],
    },
    "servfail": ["broken.test"],
    "timeout": ["slow.test"],
}


@pytest.fixture(scope="module")
def zone_server() -> Iterator[DnsServer]:
    """One dnsmasq for the module: the zone is read-only."""
    with dnsmasq_servers() as start:
        yield start(**ZONE)


@pytest.fixture
def resolver(zone_server: DnsServer) -> DnsResolver:
    return DnsResolver(zone_server.config(timeout=1.0))


def closed_udp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_mx_in_preference_order_lower_case(resolver: DnsResolver) -> None:
    assert await resolver.mx("example.test") == [
        (10, "mx1.example.test"),
        (20, "mx2.example.test"),
    ]


@pytest.mark.parametrize("name", ["EXAMPLE.test", "example.test."])
async def test_mx_name_forms(resolver: DnsResolver, name: str) -> None:
    assert [host for _, host in await resolver.mx(name)] == ["mx1.example.test", "mx2.example.test"]


async def test_mx_empty_when_domain_has_no_mx(resolver: DnsResolver) -> None:
    assert await resolver.mx("nomx.test") == []


async def test_mx_nxdomain(resolver: DnsResolver) -> None:
    with pytest.raises(NoSuchDomain):
        await resolver.mx("nonexistent.test")


async def test_null_mx(resolver: DnsResolver) -> None:
    with pytest.raises(NullMx) as info:
        await resolver.mx("null.test")
    assert info.value.reply.status == (5, 1, 10)


async def test_root_exchange_next_to_real_mx_is_skipped(resolver: DnsResolver) -> None:
    assert await resolver.mx("mixednull.test") == [(10, "mx1.example.test")]


async def test_mx_of_ip_literal_is_empty_without_query() -> None:
    # Pointed at nothing: a query would fail, so [] proves none was made.
    resolver = DnsResolver(DnsConfig((("127.0.0.1", closed_udp_port()),), timeout=0.3))
    assert await resolver.mx("[192.0.2.1]") == []


@pytest.mark.parametrize("lookup", ["mx", "addresses"])
async def test_servfail_is_temporary(resolver: DnsResolver, lookup: str) -> None:
    with pytest.raises(DnsTemporary) as info:
        await getattr(resolver, lookup)("host.broken.test")
    assert info.value.reply.code == 451


@pytest.mark.parametrize("lookup", ["mx", "addresses"])
async def test_timeout_is_temporary_and_bounded(zone_server: DnsServer, lookup: str) -> None:
    resolver = DnsResolver(zone_server.config(timeout=0.5))
    started = time.monotonic()
    with pytest.raises(DnsTemporary, match="timeout"):
        await asyncio.wait_for(getattr(resolver, lookup)("slow.test"), 5)
    assert time.monotonic() - started < 3


async def test_unreachable_nameserver_is_temporary() -> None:
    resolver = DnsResolver(DnsConfig((("127.0.0.1", closed_udp_port()),), timeout=0.5))
    with pytest.raises(DnsTemporary):
        await asyncio.wait_for(resolver.mx("example.test"), 5)


async def test_addresses_interleave_ipv6_first(resolver: DnsResolver) -> None:
    assert await resolver.addresses("dual.example.test") == [
        "2001:db8::10",
        "192.0.2.10",
        "2001:db8::11",
        "192.0.2.11",
    ]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mx1.example.test", ["2001:db8::1", "192.0.2.1"]),
        ("v4.example.test", ["192.0.2.20"]),
        ("v6.example.test", ["2001:db8::20"]),
    ],
)
async def test_addresses_families(resolver: DnsResolver, name: str, expected: list[str]) -> None:
    assert await resolver.addresses(name) == expected


async def test_addresses_nxdomain(resolver: DnsResolver) -> None:
    with pytest.raises(NoSuchDomain):
        await resolver.addresses("nonexistent.test")


async def test_addresses_no_records_is_no_route(resolver: DnsResolver) -> None:
    # mxonly.test exists (it has MX) but has neither A nor AAAA.
    with pytest.raises(NoRoute):
        await resolver.addresses("mxonly.test")


@pytest.mark.parametrize(
    ("literal", "expected"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("[192.0.2.1]", "192.0.2.1"),
        ("2001:DB8::1", "2001:db8::1"),
        ("[IPv6:2001:db8::1]", "2001:db8::1"),
    ],
)
async def test_ip_literal_passthrough_without_query(literal: str, expected: str) -> None:
    resolver = DnsResolver(DnsConfig((("127.0.0.1", closed_udp_port()),), timeout=0.3))
    assert await resolver.addresses(literal) == [expected]


@pytest.mark.parametrize("name", ["mx.example.test", "[not-an-ip]", "300.1.1.1", "[IPv6:x]"])
def test_ip_literal_rejects_names(name: str) -> None:
    assert ip_literal(name) is None


async def test_invalid_name_cannot_exist(resolver: DnsResolver) -> None:
    with pytest.raises(NoSuchDomain):
        await resolver.mx("a" * 64 + ".test")


def test_system_resolver_builds_without_query() -> None:
    # Empty [dns] nameservers: /etc/resolv.conf (or none, if unreadable).
    assert DnsResolver(DnsConfig()).config.nameservers == ()


async def test_large_answer_retried_over_tcp(dns_server) -> None:  # noqa: F811
    # 120 A records do not fit a 512-byte UDP answer: dnsmasq truncates,
    # the resolver retries over TCP (dnsmasq listens on both).
    v4 = [f"127.0.{i // 250}.{i % 250 + 1}" for i in range(120)]
    server = dns_server(hosts={"big.test": v4})
    found = await DnsResolver(server.config()).addresses("big.test")
    assert sorted(found) == sorted(v4)


@pytest.mark.parametrize(("ttl", "cached"), [(60, True), (0, False)])
async def test_answers_are_kept_for_their_ttl(ttl: int, cached: bool) -> None:
    with dnsmasq_servers() as factory:
        server = factory(hosts={"mx1.example.test": ["192.0.2.1"]}, ttl=ttl)
        resolver = DnsResolver(server.config(timeout=0.5))
        assert await resolver.addresses("mx1.example.test") == ["192.0.2.1"]
    # The server is gone: only a cached answer can still come back.
    if cached:
        assert await resolver.addresses("MX1.example.test") == ["192.0.2.1"]
    else:
        with pytest.raises(DnsTemporary):
            await resolver.addresses("mx1.example.test")
