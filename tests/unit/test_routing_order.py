"""Candidate order without DNS: weighted random order, secondaries last, MX shuffling.

Share tests draw N = 2000 first picks and allow +-8 percentage points.
The widest standard deviation of a share is sqrt(0.5 * 0.5 / 2000) = 1.12
points, so 8 points is 7.2 sigma: an unseeded run fails about once in
10**12 runs (two-sided normal tail ~6e-13 per share, a handful of shares).
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence

import pytest

from relay.config import Host, Route
from relay.routing import PRIMARY, SECONDARY, Candidate, plan, shuffle_mx, weighted_order

N = 2000
TOLERANCE = 0.08


class NoDns:
    """A Resolver for routes that must not touch the DNS: any lookup fails the test."""

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        raise AssertionError(f"unexpected MX lookup of {domain}")

    async def addresses(self, name: str) -> list[str]:
        raise AssertionError(f"unexpected address lookup of {name}")


def hosts(*loads: int) -> tuple[Host, ...]:
    return tuple(Host(f"h{i}.example.test", 25, load) for i, load in enumerate(loads))


def first_pick_shares(table: Sequence[Host], rng: random.Random) -> dict[str, float]:
    counts = Counter(weighted_order(table, rng)[0].name for _ in range(N))
    return {host.name: counts[host.name] / N for host in table}


@pytest.mark.parametrize("loads", [(70, 30), (50, 25, 25)], ids=["70-30", "50-25-25"])
@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
def test_first_pick_follows_loads(loads: tuple[int, ...], seeded: bool) -> None:
    table = hosts(*loads)
    rng = random.Random(20261128) if seeded else random.Random()
    shares = first_pick_shares(table, rng)
    for host in table:
        assert shares[host.name] == pytest.approx(host.load / 100, abs=TOLERANCE), shares


def test_seeded_order_is_reproducible() -> None:
    table = hosts(50, 25, 25)
    first = [weighted_order(table, random.Random(7)) for _ in range(3)]
    assert first[0] == first[1] == first[2]


def test_later_picks_follow_remaining_loads() -> None:
    # 50/25/25: when h1 (25) is picked first, h0 follows with 50/75 = 2/3.
    table = hosts(50, 25, 25)
    rng = random.Random(42)
    seconds = Counter(
        order[1].name
        for order in (weighted_order(table, rng) for _ in range(3 * N))
        if order[0] is table[1]
    )
    total = sum(seconds.values())
    assert total > 300
    assert seconds["h0.example.test"] / total == pytest.approx(2 / 3, abs=TOLERANCE)


def test_every_host_exactly_once() -> None:
    table = hosts(10, 20, 30, 40)
    rng = random.Random(1)
    for _ in range(50):
        assert sorted(h.name for h in weighted_order(table, rng)) == sorted(h.name for h in table)


@pytest.mark.parametrize(
    "table",
    [(), hosts(100), (Host("a.test", 25, 0), Host("b.test", 25, 100))],
    ids=["empty", "single", "zero-load-last"],
)
def test_degenerate_tables(table: tuple[Host, ...]) -> None:
    order = weighted_order(table, random.Random(3))
    assert sorted(order, key=lambda h: h.name) == sorted(table, key=lambda h: h.name)
    if len(table) == 2:
        assert order[-1].load == 0


async def test_single_host_route_is_that_host() -> None:
    route = Route("On-prem", (Host("mail.corp.test", 587, 100),))
    result = await plan(route, NoDns(), random.Random(0))
    assert result.candidates == (
        Candidate("mail.corp.test", 587, None, PRIMARY, "mail.corp.test", "On-prem", False),
    )
    assert result.dns_failures == () and result.failure is None


async def test_secondaries_only_after_every_primary() -> None:
    route = Route("Split", hosts(50, 50), (Host("b1.test", 2525, 60), Host("b2.test", 2525, 40)))
    rng = random.Random(5)
    firsts = Counter()
    for _ in range(200):
        got = (await plan(route, NoDns(), rng)).candidates
        assert [c.table for c in got] == [PRIMARY, PRIMARY, SECONDARY, SECONDARY]
        assert {c.host for c in got[:2]} == {"h0.example.test", "h1.example.test"}
        assert all(c.configured == c.host and c.via_mx is None for c in got)
        firsts[got[0].host] += 1
    assert len(firsts) == 2  # both primaries lead sometimes


async def test_same_host_and_port_kept_once() -> None:
    route = Route(
        "Dup", (Host("a.test", 25, 50), Host("b.test", 25, 50)), (Host("a.test", 25, 100),)
    )
    got = (await plan(route, NoDns(), random.Random(0))).candidates
    assert sorted(c.host for c in got) == ["a.test", "b.test"]
    assert all(c.table == PRIMARY for c in got)


def test_mx_shuffle_keeps_preference_order() -> None:
    records = [(20, "c.test"), (10, "b.test"), (10, "a.test"), (30, "d.test")]
    rng = random.Random(11)
    seen = Counter()
    for _ in range(400):
        order = shuffle_mx(records, rng)
        assert set(order[:2]) == {"a.test", "b.test"}
        assert order[2:] == ["c.test", "d.test"]
        seen[order[0]] += 1
    # Equal preferences are shuffled, evenly (RFC 5321 section 5.1).
    assert seen["a.test"] / 400 == pytest.approx(0.5, abs=0.1)


def test_mx_shuffle_does_not_depend_on_answer_order() -> None:
    records = [(10, "a.test"), (10, "b.test"), (10, "c.test")]
    assert shuffle_mx(records, random.Random(9)) == shuffle_mx(records[::-1], random.Random(9))
