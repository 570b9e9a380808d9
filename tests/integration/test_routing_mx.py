"""MX routes through the real resolver and a real dnsmasq: order, implicit MX, failures."""

from __future__ import annotations

import dataclasses
import random
from collections import Counter
from collections.abc import Iterator

import pytest

from relay.config import Host, Route, direct_route
from relay.dns import DnsResolver
from relay.errors import (
    DnsTemporary,
    HostUnreachable,
    NoRoute,
    NoSuchDomain,
    NullMx,
    RelayError,
    RouteMisconfigured,
)
from relay.routing import (
    PRIMARY,
    SECONDARY,
    Candidate,
    addresses_for,
    candidates,
    plan,
)
from tests.support.dnsserver import DnsServer, dnsmasq_servers

ZONE = {
    "hosts": {
        "mx1.corp.test": ["127.0.0.1", "::1"],
        "mx2.corp.test": ["127.0.0.2"],
        "mx3.corp.test": ["127.0.0.3"],
        "backup.corp.test": ["127.0.0.4"],
        "implicit.test": ["127.0.0.5"],
    },
    "mx": {
        "corp.test": [(10, "mx1.corp.test"), (20, "mx2.corp.test"), (20, "mx3.corp.test")],
        "backup.test": [(10, "backup.corp.test")],
        "shares.test": [(5, "mx1.corp.test")],
        "null.test": [(0, ".")],
        "dangling.test": [(10, "gone.dangling.test")],
        "noaddr.test": [(10, "backup.test")],
    },
    "servfail": ["broken.test"],
    "timeout": ["slow.test"],
}


@pytest.fixture(scope="module")
def zone_server() -> Iterator[DnsServer]:
    with dnsmasq_servers() as start:
        yield start(**ZONE)


@pytest.fixture
def resolver(zone_server: DnsServer) -> DnsResolver:
    return DnsResolver(zone_server.config(timeout=0.5))


def mx_route(*primary: str, secondary: tuple[str, ...] = (), port: int = 25) -> Route:
    def table(names: tuple[str, ...]) -> tuple[Host, ...]:
        return tuple(Host(name, port, 100 // len(names)) for name in names)

    return Route(
        "Corp MX",
        table(primary),
        table(secondary) if secondary else (),
        mx_lookup=True,
        single=False,
    )


async def test_mx_hosts_in_preference_order(resolver: DnsResolver) -> None:
    got = (await plan(mx_route("corp.test", port=2525), resolver, random.Random(1))).candidates
    assert got[0] == Candidate("mx1.corp.test", 2525, "corp.test", PRIMARY, "corp.test", "Corp MX")
    assert {c.host for c in got[1:]} == {"mx2.corp.test", "mx3.corp.test"}
    assert all(c.port == 2525 and c.via_mx == "corp.test" for c in got)


async def test_equal_preferences_shuffled(resolver: DnsResolver) -> None:
    rng = random.Random(3)
    seconds = Counter()
    for _ in range(40):
        got = await candidates(mx_route("corp.test"), resolver, rng)
        seconds[got[1].host] += 1
    assert set(seconds) == {"mx2.corp.test", "mx3.corp.test"}


async def test_seeded_plan_is_reproducible(resolver: DnsResolver) -> None:
    route = mx_route("corp.test", "backup.test")
    a = await plan(route, resolver, random.Random(8))
    b = await plan(route, resolver, random.Random(8))
    assert a == b


async def test_secondary_domains_after_primaries(resolver: DnsResolver) -> None:
    route = mx_route("corp.test", secondary=("backup.test",))
    got = await candidates(route, resolver, random.Random(0))
    assert [c.table for c in got] == [PRIMARY] * 3 + [SECONDARY]
    assert got[-1] == Candidate(
        "backup.corp.test", 25, "backup.test", SECONDARY, "backup.test", "Corp MX"
    )


async def test_implicit_mx_is_the_domain_itself(resolver: DnsResolver) -> None:
    got = await candidates(mx_route("implicit.test"), resolver, random.Random(0))
    assert got == [
        Candidate("implicit.test", 25, "implicit.test", PRIMARY, "implicit.test", "Corp MX")
    ]
    assert await addresses_for(got[0], resolver) == ["127.0.0.5"]


async def test_duplicate_mx_hosts_removed(resolver: DnsResolver) -> None:
    got = await candidates(mx_route("corp.test", "shares.test"), resolver, random.Random(0))
    assert [c.host for c in got].count("mx1.corp.test") == 1
    assert len(got) == 3


# --- failures: configured routes defer, implicit routes may bounce -----------

CONFIG_FAILURES = [
    ("nonexistent.test", RouteMisconfigured, "NXDOMAIN"),
    ("null.test", RouteMisconfigured, "null MX"),
    ("x.broken.test", DnsTemporary, "no nameserver answered"),
    ("slow.test", DnsTemporary, "timeout"),
]


@pytest.mark.parametrize(("domain", "error", "words"), CONFIG_FAILURES)
async def test_config_route_failures_are_temporary(
    resolver: DnsResolver, domain: str, error: type[RelayError], words: str
) -> None:
    result = await plan(mx_route(domain), resolver, random.Random(0))
    assert result.candidates == ()
    assert isinstance(result.failure, error)
    assert result.failure.reply.temporary
    assert words in result.failure.detail
    if error is RouteMisconfigured:
        assert "'Corp MX'" in result.failure.detail and repr(domain) in result.failure.detail
    with pytest.raises(error):
        await candidates(mx_route(domain), resolver, random.Random(0))


@pytest.mark.parametrize(
    ("domain", "error"),
    [
        ("nonexistent.test", NoSuchDomain),
        ("null.test", NullMx),
        ("x.broken.test", DnsTemporary),
        ("slow.test", DnsTemporary),
    ],
)
async def test_implicit_route_failures(
    resolver: DnsResolver, domain: str, error: type[RelayError]
) -> None:
    result = await plan(direct_route(domain), resolver, random.Random(0))
    assert type(result.failure) is error
    assert result.failure.reply.permanent == (error in (NoSuchDomain, NullMx))


async def test_partial_failure_keeps_working_candidates(resolver: DnsResolver) -> None:
    route = mx_route("x.broken.test", "nonexistent.test", secondary=("backup.test",))
    result = await plan(route, resolver, random.Random(0))
    assert [c.host for c in result.candidates] == ["backup.corp.test"]
    assert result.failure is None
    found = {(f.configured, f.table, type(f.error)) for f in result.dns_failures}
    assert found == {
        ("x.broken.test", PRIMARY, DnsTemporary),
        ("nonexistent.test", PRIMARY, RouteMisconfigured),
    }


async def test_temporary_wins_when_nothing_resolves(resolver: DnsResolver) -> None:
    # Permanent NXDOMAIN next to a SERVFAIL: the mail may still go later, defer.
    route = dataclasses.replace(
        mx_route("nonexistent.test", secondary=("x.broken.test",)), implicit=True
    )
    result = await plan(route, resolver, random.Random(0))
    assert [type(f.error) for f in result.dns_failures] == [NoSuchDomain, DnsTemporary]
    assert [f.table for f in result.dns_failures] == [PRIMARY, SECONDARY]
    assert isinstance(result.failure, DnsTemporary)


# --- addresses_for: the route's policy on the address lookup ------------------


async def test_addresses_for_config_route_misconfigured(resolver: DnsResolver) -> None:
    # An MX host that does not exist, and an MX host without address records.
    for domain in ("dangling.test", "noaddr.test"):
        (candidate,) = await candidates(mx_route(domain), resolver, random.Random(0))
        with pytest.raises(RouteMisconfigured, match="'Corp MX'"):
            await addresses_for(candidate, resolver)


async def test_addresses_for_implicit_route_is_permanent(resolver: DnsResolver) -> None:
    # The domain's MX names a host that does not exist: that host is
    # unreachable (other MX hosts may work), not the domain gone.
    (gone,) = await candidates(direct_route("dangling.test"), resolver, random.Random(0))
    with pytest.raises(HostUnreachable):
        await addresses_for(gone, resolver)
    (noaddr,) = await candidates(direct_route("noaddr.test"), resolver, random.Random(0))
    with pytest.raises(HostUnreachable):
        await addresses_for(noaddr, resolver)
    # The domain's own name (implicit MX) without an address: permanent.
    own = Candidate("noaddr.test", 25, via_mx="noaddr.test", implicit=True)
    with pytest.raises(NoRoute):
        await addresses_for(own, resolver)


async def test_addresses_for_single_host_route(resolver: DnsResolver) -> None:
    route = Route("Single", (Host("mx1.corp.test", 25, 100),))
    (candidate,) = await candidates(route, resolver, random.Random(0))
    assert await addresses_for(candidate, resolver) == ["::1", "127.0.0.1"]
    typo = Route("Typo", (Host("mx1.crop.test", 25, 100),))
    (candidate,) = await candidates(typo, resolver, random.Random(0))
    with pytest.raises(RouteMisconfigured, match="'Typo'.*mx1.crop.test"):
        await addresses_for(candidate, resolver)


async def test_addresses_for_temporary(resolver: DnsResolver) -> None:
    candidate = Candidate("mx.broken.test", 25, route="Single")
    with pytest.raises(DnsTemporary):
        await addresses_for(candidate, resolver)


async def test_ip_literal_host_needs_no_dns(resolver: DnsResolver) -> None:
    route = Route("Literal", (Host("127.0.0.9", 2525, 100),))
    (candidate,) = await candidates(route, resolver, random.Random(0))
    assert await addresses_for(candidate, resolver) == ["127.0.0.9"]


async def test_direct_route_to_domain_literal(resolver: DnsResolver) -> None:
    got = await candidates(direct_route("[127.0.0.7]"), resolver, random.Random(0))
    assert [c.host for c in got] == ["127.0.0.7"]
    assert await addresses_for(got[0], resolver) == ["127.0.0.7"]
