"""Host health: next hops that fail to connect or greet are held down, skipped, probed back.

Real sockets on loopback: a wedged host (accepts, never greets), a refusing
host (a closed port), a host answering 421 to every greeting, and healthy
sinks. Shares are checked over N = 2000 plans with +-8 points, as in
tests/unit/test_routing_order.py (7.2 sigma for an unseeded run).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import pytest

from relay import errors, routing
from relay.attempt import Attempt
from relay.config import Config, Host, Route
from relay.delivery import Deliverer
from relay.errors import HostUnreachable
from relay.health import Health
from relay.metrics import Metrics
from relay.routing import Candidate
from tests.support import logs
from tests.support.delivery import OPPORTUNISTIC, addresses, envelope, make_config
from tests.support.hosts import SickHost, closed_port
from tests.support.sink import Sink, StaticResolver

pytestmark = pytest.mark.timeout(60)

N = 2000
TOLERANCE = 0.08
NAMES = {"mx1.test": ["127.0.0.1"], "mx2.test": ["127.0.0.1"], "mx3.test": ["127.0.0.1"]}
BODY = b"From: a@src.test\r\nSubject: health\r\n\r\nhello\r\n"


def settings(**delivery: float) -> Config:
    values: dict[str, float] = {"connect_timeout": 0.5, "hold_down": 30.0}
    values.update(delivery)
    return make_config(**values)


def two_tier(primary: tuple[str, int], secondary: tuple[str, int], name: str = "r1") -> Route:
    return Route(
        name=name,
        primary=(Host(*primary),),
        secondary=(Host(*secondary),),
        tls=OPPORTUNISTIC,
    )


def single(host: tuple[str, int], name: str = "r1") -> Route:
    return Route(name=name, primary=(Host(*host),), tls=OPPORTUNISTIC)


class DelivererHarness:
    """A Deliverer over StaticResolver names, with a config that can be swapped."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.deliverer = Deliverer(lambda: self.config, StaticResolver(NAMES), self.metrics)

    def use(self, route: Route) -> None:
        """Put ``route`` in the config (as a reload would): its hosts get metrics."""
        if route not in self.config.routes:
            others = tuple(r for r in self.config.routes if r.name != route.name)
            self.config = dataclasses.replace(self.config, routes=(*others, route))
            self.deliverer.health.reconfigure(self.config)

    async def send(self, route: Route, qid: str = "Q1") -> Attempt:
        self.use(route)
        env = envelope(qid=qid)
        return await self.deliverer.deliver(route, env, addresses(env), BODY)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.metrics.registry.get_sample_value(name, labels)


@asynccontextmanager
async def relay(config: Config) -> AsyncIterator[DelivererHarness]:
    r = DelivererHarness(config)
    try:
        yield r
    finally:
        await r.deliverer.close()


@asynccontextmanager
async def sick(mode: str, backend: int | None = None) -> AsyncIterator[tuple[SickHost | None, int]]:
    """(the host or None for a refusing one, its port)."""
    if mode == "refusing":
        yield None, closed_port()
        return
    async with SickHost(mode, backend) as host:
        yield host, host.port


SICK = ["wedged", "refusing", "421"]


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    """relay's events while the test runs."""
    with logs.captured(logs.records) as kept:
        yield kept


# --- what marks a host down, and skipping it ----------------------------------


@pytest.mark.parametrize("mode", SICK)
async def test_a_sick_primary_is_held_down_and_skipped(mode, logged):
    async with (
        Sink() as good,
        sick(mode) as (host, port),
        relay(settings()) as r,
    ):
        route = two_tier(("mx1.test", port), ("mx2.test", good.port))
        first = await r.send(route, "Q1")
        assert first.outcome("b@x.test") == errors.DELIVERED
        assert [h.candidate.host for h in first.hosts] == ["mx1.test", "mx2.test"]
        seen = host.connections if host else 0
        for n in range(5):
            again = await r.send(route, f"Q{n + 2}")
            assert again.outcome("b@x.test") == errors.DELIVERED
            # Straight to the secondary: the held-down primary is not tried.
            assert [h.candidate.host for h in again.hosts] == ["mx2.test"]
        assert (host.connections if host else 0) == seen
        assert len(good.messages) == 6
        assert r.metric("relay_host_up", route="r1", host="mx1.test") == 0
        assert r.metric("relay_host_up", route="r1", host="mx2.test") == 1
        changes = "relay_host_state_changes_total"
        assert r.metric(changes, route="r1", host="mx1.test", state="down") == 1
    downs = [rec for rec in logged if rec.getMessage() == "host_down"]
    assert len(downs) == 1  # one line per state change, none per skipped message
    fields = downs[0].fields  # type: ignore[attr-defined]
    assert fields["host"] == "mx1.test" and fields["port"] == port
    assert fields["hold_down"] == "30s" and fields["reason"]


async def test_tls_policy_and_transaction_replies_do_not_mark_down():
    # No STARTTLS under require_tls (a policy verdict), then a 451 to MAIL.
    strict = dataclasses.replace(OPPORTUNISTIC, require_tls=True)
    async with (
        Sink() as plain,
        Sink(replies={"MAIL": "451 4.3.0 busy"}) as busy,
        relay(settings()) as r,
    ):
        tls_route = Route(name="tls", primary=(Host("mx1.test", plain.port),), tls=strict)
        mail_route = single(("mx2.test", busy.port), name="mail")
        for route in (tls_route, mail_route):
            for n in range(3):
                attempt = await r.send(route, f"Q{n}")
                assert attempt.hosts, "the host was tried every time"
        assert plain.connections == 3 and busy.connections >= 1
        assert not r.deliverer.health.is_down(("127.0.0.1", plain.port))
        assert not r.deliverer.health.is_down(("127.0.0.1", busy.port))


# --- every host down ------------------------------------------------------------


@pytest.mark.parametrize("mode", SICK)
async def test_all_hosts_down_defers_without_connecting(mode):
    async with (
        sick(mode) as (host, port),
        relay(settings()) as r,
    ):
        route = single(("mx1.test", port))
        first = await r.send(route)
        assert first.outcome("b@x.test") == errors.DEFERRED and first.hosts
        seen = host.connections if host else 0
        for n in range(20):
            attempt = await r.send(route, f"Q{n}")
            assert attempt.outcome("b@x.test") == errors.DEFERRED
            assert attempt.hosts == ()  # nothing tried, nothing connected
            (result,) = attempt.results["b@x.test"]
            assert isinstance(result, HostUnreachable) and "held down" in result.detail
        assert (host.connections if host else 0) == seen


async def test_waiting_behind_a_host_that_goes_down_does_not_connect_again():
    # One connection slot: the second attempt queues behind the first one's
    # connect timeout; once the host is known down it moves on at once.
    async with (
        Sink() as good,
        SickHost("wedged") as wedged,
        relay(settings(max_per_host=1)) as r,
    ):
        route = two_tier(("mx1.test", wedged.port), ("mx2.test", good.port))
        one, two = await asyncio.gather(r.send(route, "Q1"), r.send(route, "Q2"))
        assert one.outcome("b@x.test") == two.outcome("b@x.test") == errors.DELIVERED
        assert wedged.connections == 1
        assert len(good.messages) == 2


async def test_a_wedged_host_keeps_only_the_attempts_already_on_it():
    # Two connection slots at the wedged host: the first two attempts take
    # them and wait for a greeting that never comes; the next four go to the
    # other primary at once, while the wedged host is not even known down.
    async with (
        Sink() as good,
        SickHost("wedged") as wedged,
        relay(settings(max_per_host=2, connect_timeout=5.0)) as r,
    ):
        route = single(("mx1.test", wedged.port))
        cands = [
            Candidate("mx1.test", wedged.port, configured="mx1.test", addresses=("127.0.0.1",)),
            Candidate("mx2.test", good.port, configured="mx2.test", addresses=("127.0.0.1",)),
        ]
        r.use(route)
        tasks = []
        for n in range(6):
            env = envelope(qid=f"Q{n}")
            tasks.append(
                asyncio.create_task(r.deliverer.deliver(route, env, addresses(env), BODY, cands))
            )
            await asyncio.sleep(0)  # each one starts before the next
        done: set[asyncio.Task[Attempt]] = set()
        pending = set(tasks)
        while len(done) < 4:
            finished, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            done |= finished
        assert not r.deliverer.health.is_down(("127.0.0.1", wedged.port))
        assert wedged.connections == 2
        assert all(t.result().outcome("b@x.test") == errors.DELIVERED for t in done)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


# --- probing back ----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["wedged", "421"])
async def test_one_probe_brings_the_host_back(mode, logged):
    async with (
        Sink() as good,
        SickHost(mode, backend=good.port) as host,
        relay(settings(hold_down=0.2, max_hold_down=10.0)) as r,
    ):
        route = single(("mx1.test", host.port))
        assert (await r.send(route)).outcome("b@x.test") == errors.DEFERRED
        key = ("127.0.0.1", host.port)
        await asyncio.sleep(0.3)  # the hold-down ends
        # Due for a probe: of three attempts at once, exactly one tries it.
        attempts = await asyncio.gather(*(r.send(route, f"P{n}") for n in range(3)))
        assert host.connections == 2
        assert sum(1 for a in attempts if a.hosts) == 1
        # The probe failed: held down twice as long.
        assert r.deliverer.health.describe(key)["hold_down"] == pytest.approx(0.4)
        host.heal()
        await asyncio.sleep(0.5)
        back = await r.send(route, "Q9")
        assert back.outcome("b@x.test") == errors.DELIVERED
        assert not r.deliverer.health.is_down(key)
        assert r.metric("relay_host_up", route="r1", host="mx1.test") == 1
        up = "relay_host_state_changes_total"
        assert r.metric(up, route="r1", host="mx1.test", state="up") == 1
        # Back in the rotation: the next message goes straight to it.
        assert (await r.send(route, "Q10")).outcome("b@x.test") == errors.DELIVERED
    assert [rec.getMessage() for rec in logged if rec.getMessage().startswith("host_")] == [
        "host_down",
        "host_probe_failed",
        "host_up",
    ]


async def test_an_unused_probe_claim_is_released():
    async with (
        Sink() as good,
        SickHost("wedged") as wedged,
        relay(settings(hold_down=0.2)) as r,
    ):
        # The sick host is the secondary: planned (and claimed) for its
        # probe, but the primary takes every message first.
        route = two_tier(("mx2.test", good.port), ("mx1.test", wedged.port))
        key = ("127.0.0.1", wedged.port)
        r.deliverer.health.failed(key, "mx1.test", "r1", "mx1.test", HostUnreachable("test: down"))
        await asyncio.sleep(0.3)
        assert (await r.send(route)).outcome("b@x.test") == errors.DELIVERED
        assert r.deliverer.health.available(key)  # still free for the next attempt


async def test_with_no_other_host_an_attempt_waits_for_the_running_probe():
    async with Sink() as good, SickHost("421") as host, relay(settings()) as r:
        key = ("127.0.0.1", host.port)
        health = r.deliverer.health
        health.failed(key, "mx1.test", "r1", "mx1.test", HostUnreachable("test: down"))
        health.end_hold_downs()  # a flush
        assert health.claim(key, "probe")  # another attempt is probing it now
        # Another host that is up still takes the mail at once.
        other = await r.send(two_tier(("mx1.test", host.port), ("mx2.test", good.port)))
        assert other.outcome("b@x.test") == errors.DELIVERED and not other.probes
        # Alone, nothing is tried: the attempt carries the probe to wait for.
        alone = await r.send(single(("mx1.test", host.port)), "Q2")
        assert not alone.hosts and alone.outcome("b@x.test") == errors.DEFERRED
        (probe,) = alone.probes
        assert not probe.done()
        health.failed(key, "mx1.test", "r1", "mx1.test", HostUnreachable("test: down"), "probe")
        assert probe.result() is True and health.is_down(key)  # it tried the host
        # The probe failed: no probe runs, so the next attempt defers at once.
        again = await r.send(single(("mx1.test", host.port)), "Q3")
        assert not again.hosts and not again.probes
        assert again.outcome("b@x.test") == errors.DEFERRED
        # A probe claimed and released untried says so: nobody needs to hurry.
        health.end_hold_downs()
        assert health.claim(key, "unused")
        (untried,) = (await r.send(single(("mx1.test", host.port)), "Q4")).probes
        health.release("unused")
        assert untried.result() is False and health.available(key)
    assert host.connections == 0


# --- shares over the live primaries ----------------------------------------------


def _health(config: Config) -> Health:
    return Health(lambda: config, Metrics())


def _down(health: Health, key: tuple[str, int]) -> None:
    health.failed(key, key[0], "r1", key[0], HostUnreachable("test: refused"))


@pytest.mark.parametrize("seeded", [True, False], ids=["seeded", "unseeded"])
async def test_shares_renormalise_over_live_primaries(seeded):
    route = Route(
        name="r1",
        primary=(
            Host("127.0.0.1", 2501, 70),
            Host("127.0.0.1", 2502, 20),
            Host("127.0.0.1", 2503, 10),
        ),
        tls=OPPORTUNISTIC,
    )
    health = _health(settings())
    _down(health, ("127.0.0.1", 2501))
    rng = random.Random(20261202) if seeded else random.Random()
    firsts: Counter[int] = Counter()
    for _ in range(N):
        plan = await routing.plan(route, StaticResolver(), rng, health)
        assert [c.port for c in plan.candidates if c.port == 2501] == []
        firsts[plan.candidates[0].port] += 1
        health.release(plan.token)
    assert firsts[2502] / N == pytest.approx(2 / 3, abs=TOLERANCE), firsts
    assert firsts[2503] / N == pytest.approx(1 / 3, abs=TOLERANCE), firsts


async def test_secondaries_when_every_primary_is_down():
    route = Route(
        name="r1",
        primary=(Host("127.0.0.1", 2501, 50), Host("127.0.0.1", 2502, 50)),
        secondary=(Host("127.0.0.1", 2503, 100),),
        tls=OPPORTUNISTIC,
    )
    health = _health(settings())
    _down(health, ("127.0.0.1", 2501))
    _down(health, ("127.0.0.1", 2502))
    plan = await routing.plan(route, StaticResolver(), random.Random(1), health)
    assert [(c.port, c.table) for c in plan.candidates] == [(2503, routing.SECONDARY)]
    _down(health, ("127.0.0.1", 2503))
    plan = await routing.plan(route, StaticResolver(), random.Random(1), health)
    assert plan.candidates == () and isinstance(plan.failure, HostUnreachable)


@pytest.mark.parametrize("implicit", [False, True], ids=["mx_route", "implicit_route"])
async def test_mx_hosts_that_are_down_are_skipped(implicit):
    resolver = StaticResolver(
        {"mx1.corp.test": ["127.0.0.11"], "mx2.corp.test": ["127.0.0.12"]},
        mx={"corp.test": [(10, "mx1.corp.test"), (10, "mx2.corp.test")]},
    )
    if implicit:
        from relay.config import direct_route

        route = direct_route("corp.test")
    else:
        route = Route(
            name="r1", primary=(Host("corp.test", 25),), mx_lookup=True, tls=OPPORTUNISTIC
        )
    health = _health(settings())
    _down(health, ("127.0.0.11", 25))
    for seed in range(20):
        plan = await routing.plan(route, resolver, random.Random(seed), health)
        assert [c.host for c in plan.candidates] == ["mx2.corp.test"]
        assert plan.candidates[0].addresses == ("127.0.0.12",)


# --- reload ----------------------------------------------------------------------


async def test_state_survives_a_reload_for_kept_hosts_only():
    async with (
        relay(settings()) as r,
    ):
        one, two = closed_port(), closed_port()
        route = Route(
            name="r1",
            primary=(Host("mx1.test", one, 50), Host("mx2.test", two, 50)),
            tls=OPPORTUNISTIC,
        )
        r.config = dataclasses.replace(r.config, routes=(route,))
        r.deliverer.health.reconfigure(r.config)
        assert (await r.send(route)).outcome("b@x.test") == errors.DEFERRED
        health = r.deliverer.health
        assert health.is_down(("127.0.0.1", one)) and health.is_down(("127.0.0.1", two))
        kept = dataclasses.replace(route, primary=(Host("mx1.test", one, 100),))
        r.config = dataclasses.replace(r.config, routes=(kept,))
        health.reconfigure(r.config)
        assert health.is_down(("127.0.0.1", one))
        assert not health.is_down(("127.0.0.1", two))
        assert r.metric("relay_host_up", route="r1", host="mx1.test") == 0
        assert r.metric("relay_host_up", route="r1", host="mx2.test") is None


# --- the hold-down arithmetic (an injected clock, no sockets) ----------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_hold_down_doubles_per_failed_probe_up_to_the_cap_and_resets():
    clock = Clock()
    config = settings(hold_down=30.0, max_hold_down=100.0)
    health = Health(lambda: config, Metrics(), clock=clock)
    key = ("127.0.0.1", 2525)
    fail = HostUnreachable("refused")
    health.failed(key, "mx", "r1", "mx", fail, token="first")
    assert health.describe(key)["hold_down"] == 30
    # A straggler that was connecting before the host went down: same outage.
    health.failed(key, "mx", "r1", "mx", fail, token="straggler")
    assert health.describe(key)["hold_down"] == 30
    for expected in (60, 100, 100):
        assert not health.claim(key, "early")
        clock.now += health.describe(key)["hold_down"]
        assert health.claim(key, "probe") and not health.claim(key, "other")
        health.failed(key, "mx", "r1", "mx", fail, token="probe")
        assert health.describe(key)["hold_down"] == expected
    clock.now += 100
    assert health.claim(key, "probe")
    health.succeeded(key, "mx", "r1", "mx")
    assert not health.is_down(key) and health.claim(key, "anyone")
    health.failed(key, "mx", "r1", "mx", fail, token="later")
    assert health.describe(key)["hold_down"] == 30
