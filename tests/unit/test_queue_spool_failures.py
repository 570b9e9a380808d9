"""The scheduler when the spool misbehaves: failed state writes, deletes mid-attempt.

docs/queue.md: no recipient is delivered twice by a retry once the next hop
accepted it, and a full disk loses nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path

from relay.attempt import Attempt
from relay.config import Config, Host, Route, Rule
from relay.envelope import Envelope, RcptState
from relay.errors import SpoolFull
from relay.spool import Spool
from relay.spoolbody import Body
from tests.support.queue import (
    PERM,
    TEMP,
    FakeDeliverer,
    harness,
    make_config,
    running,
    settle,
    spool_message,
)
from tests.support.spool import body_path
from tests.support.wait import until


class FillingSpool(Spool):
    """A spool whose disk fills up (and frees up) when the test says so."""

    update_full = False
    put_full = False

    async def update_async(self, envelope: Envelope) -> bool:
        if self.update_full:
            raise SpoolFull(f"cannot update {envelope.id}: [Errno 28] No space left on device")
        return await super().update_async(envelope)

    def put(self, envelope: Envelope, data: bytes) -> None:
        if self.put_full:
            raise SpoolFull(f"cannot spool {envelope.id}: [Errno 28] No space left on device")
        super().put(envelope, data)


class SlowRoute:
    """A Deliverer: route ``slow`` is held until ``gate`` is set; records finished attempts."""

    def __init__(self, inner: FakeDeliverer, slow: str) -> None:
        self.inner = inner
        self.slow = slow
        self.gate = asyncio.Event()
        self.finished: list[str] = []

    async def deliver(
        self, route: Route, envelope: Envelope, recipients: Sequence[str], body: bytes
    ) -> Attempt:
        if route.name == self.slow:
            await self.gate.wait()
        attempt = await self.inner.deliver(route, envelope, recipients, body)
        self.finished.extend(recipients)
        return attempt


def _two_routes(tmp_path: Path) -> Config:
    return make_config(
        tmp_path / "spool",
        rules=(Rule(("@example.com",), "Corp"), Rule(("@other.test",), "Other")),
        routes=(
            Route("Corp", (Host("mx.corp.test", 25),)),
            Route("Other", (Host("mx.other.test", 25),)),
        ),
    )


async def test_failed_write_neither_cancels_other_routes_nor_redelivers(tmp_path) -> None:
    spool = FillingSpool(tmp_path / "spool", fsync=False)
    deliverer = SlowRoute(FakeDeliverer(), slow="Other")
    h = harness(tmp_path, deliverer, _two_routes(tmp_path), spool=spool)
    env = spool_message(spool, ["bob@example.com", "carol@other.test"])
    spool.update_full = True
    async with running(h.scheduler):
        h.scheduler.add(env)
        # bob is delivered and his state write fails while carol's transaction runs.
        await until(lambda: "bob@example.com" in deliverer.finished)
        await asyncio.sleep(0.05)
        deliverer.gate.set()
        await settle(h.scheduler)
        assert deliverer.finished == ["bob@example.com", "carol@other.test"]
        spool.update_full = False
        for _ in range(3):
            h.clock.advance(4000)
            await settle(h.scheduler)
    assert deliverer.inner.calls_for("bob@example.com") == 1
    assert deliverer.inner.calls_for("carol@other.test") == 1
    assert h.spooled() == []
    assert len(h.scheduler) == 0


async def test_state_held_in_memory_is_written_before_the_next_attempt(tmp_path) -> None:
    spool = FillingSpool(tmp_path / "spool", fsync=False)
    h = harness(tmp_path, FakeDeliverer(script={"dave@example.com": [TEMP]}), spool=spool)
    env = spool_message(spool, ["bob@example.com", "dave@example.com"])
    spool.update_full = True
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
        assert h.deliverer.calls_for("bob@example.com") == 1
        # The disk is behind: it still says bob is pending.
        (stored,) = spool.load_all()
        assert stored.recipients[0].state is RcptState.PENDING
        assert len(h.scheduler) == 1
        # Still full at the retry: the write is retried, nothing is attempted.
        h.clock.advance(61)
        await settle(h.scheduler)
        assert len(h.deliverer.calls) == 1
        assert len(h.scheduler) == 1
        # Space again: the state is written, then dave (only) is tried again.
        spool.update_full = False
        h.clock.advance(61)
        await settle(h.scheduler)
        h.clock.advance(120)
        await settle(h.scheduler)
    assert h.deliverer.calls_for("bob@example.com") == 1
    assert h.deliverer.calls_for("dave@example.com") == 2
    assert h.spooled() == []
    assert len(h.scheduler) == 0


async def test_delete_during_an_attempt_leaves_nothing_behind(tmp_path) -> None:
    gate = asyncio.Event()
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [TEMP]}, gate=gate))
    env = spool_message(h.spool, ["bob@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await until(lambda: h.deliverer.running == 1)
        assert h.spool.delete(env.id)  # `relay queue delete` while the attempt runs
        gate.set()
        await settle(h.scheduler)
    assert list(h.spool.msg_dir.iterdir()) == []
    assert len(h.scheduler) == 0
    assert h.sample("relay_queue_messages") == 0


async def test_an_envelope_without_its_body_is_removed(tmp_path) -> None:
    h = harness(tmp_path)
    env = spool_message(h.spool, ["bob@example.com"])
    body_path(h.spool, env.id).unlink()
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert h.deliverer.calls == []
    assert list(h.spool.msg_dir.iterdir()) == []
    assert len(h.scheduler) == 0


async def test_bounced_recipient_is_counted_once_the_dsn_is_spooled(tmp_path) -> None:
    spool = FillingSpool(tmp_path / "spool", fsync=False)
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [PERM, PERM]}), spool=spool)
    env = spool_message(spool, ["bob@example.com"])
    spool.put_full = True  # the DSN cannot be spooled at the first attempt
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
        assert h.sample("relay_recipients_total", route="Corp", outcome="bounced") == 0
        assert h.sample("relay_recipients_total", route="Corp", outcome="deferred") == 1
        spool.put_full = False
        h.clock.advance(100)
        await settle(h.scheduler)
    assert h.deliverer.calls_for("bob@example.com") == 2
    assert h.sample("relay_recipients_total", route="Corp", outcome="bounced") == 1
    assert h.sample("relay_bounces_total", reason="remote_permanent") == 1


class CountingSpool(Spool):
    """Counts the scheduler's reads and state writes; deletes fail while ``delete_fails``."""

    delete_fails = False

    def __init__(self, path: Path) -> None:
        super().__init__(path, fsync=False)
        self.reads = 0
        self.updates = 0
        self.deletes = 0

    async def open_async(self, queue_id: str, inline_max: int) -> tuple[Envelope, Body]:
        self.reads += 1
        return await super().open_async(queue_id, inline_max)

    async def update_async(self, envelope: Envelope) -> bool:
        self.updates += 1
        return await super().update_async(envelope)

    async def delete_async(self, queue_id: str) -> bool:
        self.deletes += 1
        if self.delete_fails:
            raise OSError(5, "Input/output error")
        return await super().delete_async(queue_id)


async def test_a_just_accepted_message_is_tried_from_memory(tmp_path) -> None:
    spool = CountingSpool(tmp_path / "spool")
    h = harness(tmp_path, spool=spool)
    env = spool_message(h.spool, ["bob@example.com"], body=b"Subject: t\r\n\r\nheld\r\n")
    async with running(h.scheduler):
        h.scheduler.add(env, (b"Subject: t\r\n", b"\r\nheld\r\n"))
        await settle(h.scheduler)
    assert spool.reads == 0
    assert [c.body for c in h.deliverer.calls] == [b"Subject: t\r\n\r\nheld\r\n"]
    assert h.spooled() == []


async def test_a_large_or_recovered_message_is_read_from_the_spool(tmp_path) -> None:
    from relay.spoolbody import IN_MEMORY_MAX

    spool = CountingSpool(tmp_path / "spool")
    h = harness(tmp_path, spool=spool)
    big = b"x" * (IN_MEMORY_MAX + 1)
    large = spool_message(h.spool, ["bob@example.com"], body=big)
    recovered = spool_message(h.spool, ["carol@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(large, (big,))
        h.scheduler.add(recovered)
        await settle(h.scheduler)
    assert spool.reads == 2
    assert len(h.deliverer.calls) == 2
    assert h.spooled() == []


async def test_a_fully_delivered_message_is_deleted_without_a_state_write(tmp_path) -> None:
    spool = CountingSpool(tmp_path / "spool")
    h = harness(tmp_path, spool=spool)
    env = spool_message(h.spool, ["bob@example.com", "carol@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert (spool.updates, spool.deletes) == (0, 1)
    assert h.spooled() == []


async def test_a_partly_delivered_message_writes_its_state(tmp_path) -> None:
    spool = CountingSpool(tmp_path / "spool")
    h = harness(tmp_path, FakeDeliverer(script={"carol@example.com": [TEMP]}), spool=spool)
    env = spool_message(h.spool, ["bob@example.com", "carol@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert spool.updates >= 1 and spool.deletes == 0
    [stored] = h.spooled()
    states = {r.address: r.state for r in stored.recipients}
    assert states == {
        "bob@example.com": RcptState.DELIVERED,
        "carol@example.com": RcptState.PENDING,
    }


async def test_a_failed_delete_writes_the_delivered_state_instead(tmp_path) -> None:
    # The delete is the only record of success: when it fails, the states
    # go to disk, so a restart never delivers the recipient again.
    spool = CountingSpool(tmp_path / "spool")
    spool.delete_fails = True
    h = harness(tmp_path, spool=spool)
    env = spool_message(h.spool, ["bob@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await until(lambda: spool.deletes == 1 and spool.updates == 1)
        # The attempt reschedules itself from the clock when it ends: let it
        # end before the clock moves, or its retry lands past the flush.
        await settle(h.scheduler)
        [stored] = h.spooled()
        assert stored.done and stored.recipients[0].state == RcptState.DELIVERED
        spool.delete_fails = False
        h.clock.advance(h.config.queue.min_backoff)
        h.scheduler.flush()
        await until(lambda: h.spooled() == [])
    assert len(h.deliverer.calls) == 1
