"""A flush after the next hop came back delivers everything at once, not one probe's worth.

A flush ends every hold-down and makes every message due; the first
attempt probes the held-down host and every other one waits for that
probe's outcome instead of being deferred for ``min_backoff``
(docs/queue.md "flush"). Real SMTP on loopback: a host that answers 421
to every greeting until it is healed, then forwards to a healthy sink.
``min_backoff`` (and the hold-down) are 300 s, and every wait is bounded
well below that: a message deferred behind the probe would not arrive in time.
While they wait, those messages hold no delivery slot: a wedged host's probe
(a whole connect timeout) leaves ``max_concurrency`` to the other routes.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from relay.envelope import Envelope
from tests.support import configs
from tests.support.hosts import SickHost
from tests.support.integ import InProcessRelay, idle, integration_toml
from tests.support.sink import Sink
from tests.support.wait import until

pytestmark = pytest.mark.timeout(90)

MESSAGES = 20
BACKOFF = 300.0


def flush_toml(tmp_path: Path, port: int) -> str:
    dns = SimpleNamespace(ip="127.0.0.1", port=53)  # IP-literal hosts: never asked
    return integration_toml(
        tmp_path,
        dns,  # type: ignore[arg-type]
        configs.route("Corp", "127.0.0.1", port),
        configs.rule("Corp", "@corp.test"),
        min_backoff=f"{BACKOFF:g}s",
        max_backoff="1h",
    )


async def queued_behind_a_down_host(relay: InProcessRelay) -> list[Envelope]:
    """MESSAGES messages, each tried once and deferred, the host held down."""
    for n in range(MESSAGES):
        relay.put("alice@sender.test", [f"user{n}@corp.test"])
    await until(
        lambda: all(e.attempts == 1 for e in relay.spooled()),
        what="every message tried once",
    )
    await idle(relay)
    stored = relay.spooled()
    assert len(stored) == MESSAGES
    assert all(e.next_attempt > relay.clock() + BACKOFF / 2 for e in stored)
    return stored


async def test_a_flush_after_the_host_is_back_delivers_every_message_at_once(
    tmp_path: Path,
) -> None:
    async with (
        Sink() as good,
        SickHost("421", good.port) as host,
        InProcessRelay(tmp_path, flush_toml(tmp_path, host.port)) as relay,
    ):
        await queued_behind_a_down_host(relay)
        host.heal()
        relay.flush()
        await until(
            lambda: len(good.messages) == MESSAGES,
            within=BACKOFF / 10,
            what="every flushed message delivered",
        )
        await until(lambda: not relay.spooled(), what="the spool emptied")
    assert sorted(m.rcpt_tos[0] for m in good.messages) == sorted(
        f"user{n}@corp.test" for n in range(MESSAGES)
    )


async def test_a_failed_probe_defers_the_messages_that_waited_for_it(tmp_path: Path) -> None:
    async with (
        SickHost("421") as host,
        InProcessRelay(tmp_path, flush_toml(tmp_path, host.port)) as relay,
    ):
        await queued_behind_a_down_host(relay)
        before = host.connections
        relay.flush()
        await until(
            lambda: all(e.attempts == 2 for e in relay.spooled()),
            what="every flushed message tried again",
        )
        await idle(relay)
        stored = relay.spooled()
    # One probe, and no retry loop: each message deferred once more, for
    # min_backoff again (the flush restarted the backoff).
    assert host.connections - before == 1
    assert len(stored) == MESSAGES
    assert all(e.attempts == 2 for e in stored)
    assert all(e.next_attempt > relay.clock() + BACKOFF / 2 for e in stored)
    assert all(str(e.recipients[0].last_reply).startswith("451 4.4.1") for e in stored)


async def test_messages_waiting_for_a_probe_leave_the_delivery_slots_to_other_routes(
    tmp_path: Path,
) -> None:
    # A wedged host's probe lasts a whole connect timeout; the messages
    # waiting for it must not hold max_concurrency slots meanwhile.
    async with Sink() as good, SickHost("421") as host:
        routes = configs.route("Corp", "127.0.0.1", host.port) + configs.route(
            "Other", "127.0.0.1", good.port
        )
        rules = configs.rule("Corp", "@corp.test") + configs.rule("Other", "@other.test")
        dns = SimpleNamespace(ip="127.0.0.1", port=53)  # IP-literal hosts: never asked
        toml = integration_toml(
            tmp_path,
            dns,  # type: ignore[arg-type]
            routes,
            rules,
            min_backoff=f"{BACKOFF:g}s",
            max_backoff="1h",
            max_concurrency=2,
        ).replace('connect_timeout = "3s"', 'connect_timeout = "60s"')
        async with InProcessRelay(tmp_path, toml) as relay:
            await queued_behind_a_down_host(relay)
            host.mode = "wedged"  # accepts, never greets: the probe hangs
            before = host.connections
            relay.flush()
            key = ("127.0.0.1", host.port)
            await until(lambda: relay.deliverer.health.probing(key), what="the probe under way")
            for n in range(10):
                relay.put("alice@sender.test", [f"user{n}@other.test"])
            await until(lambda: len(good.messages) == 10, within=30, what="the other route's mail")
            assert relay.deliverer.health.probing(key)  # still waiting for a greeting
            assert host.connections - before == 1
            waiting = [e for e in relay.spooled() if e.recipients[0].address.endswith("corp.test")]
            # Waiting, not deferred: no attempt counted, nothing written.
            assert len(waiting) == MESSAGES
            assert all(e.attempts == 1 for e in waiting)
