"""The scheduler with a scripted Deliverer: outcomes, persistence, backoff, expiry, bounces."""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
from email.message import EmailMessage

import pytest

from relay.config import Rule
from relay.envelope import Envelope, RcptState
from relay.errors import (
    DELIVERY_EXPIRED,
    NO_ROUTE_NOW,
    HostUnreachable,
    SpoolFull,
    TlsFailure,
    TlsPolicyFailure,
)
from relay.metrics import Metrics
from relay.outcomes import JITTER, backoff
from relay.queue import Scheduler
from relay.spool import Spool
from tests.support.queue import (
    BODY,
    PERM,
    TEMP,
    Clock,
    FakeDeliverer,
    busy,
    harness,
    make_config,
    running,
    settle,
    spool_message,
)
from tests.support.wait import until

# --- backoff -------------------------------------------------------------------


def test_backoff_doubles_from_min_and_stops_at_max() -> None:
    rng = random.Random(1)
    for attempts in range(1, 12):
        base = min(60.0 * 2 ** (attempts - 1), 3600.0)
        delay = backoff(attempts, 60.0, 3600.0, rng)
        assert base * (1 - JITTER) <= delay <= min(base * (1 + JITTER), 3600.0)
    assert backoff(1000, 60.0, 3600.0, rng) <= 3600.0
    assert backoff(0, 60.0, 3600.0, rng) <= 60.0 * (1 + JITTER)


def test_backoff_jitter_spreads_retries() -> None:
    rng = random.Random(2)
    delays = {round(backoff(3, 60.0, 3600.0, rng), 3) for _ in range(20)}
    assert len(delays) > 10


# --- delivery outcomes ---------------------------------------------------------


def _dsn(body: bytes) -> EmailMessage:
    msg = email.message_from_bytes(body, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _final_recipients(body: bytes) -> list[str]:
    msg = _dsn(body)
    (status,) = [p for p in msg.walk() if p.get_content_type().endswith("delivery-status")]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [str(b["Final-Recipient"]) for b in blocks[1:]]


def _status_blocks(body: bytes) -> list[dict[str, str]]:
    msg = _dsn(body)
    (status,) = [p for p in msg.walk() if p.get_content_type().endswith("delivery-status")]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [{k: str(v) for k, v in b.items()} for b in blocks]


async def test_accepted_message_is_delivered_and_removed(tmp_path) -> None:
    h = harness(tmp_path)
    env = spool_message(h.spool, ["bob@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert [c.recipients for c in h.deliverer.calls] == [["bob@example.com"]]
    assert h.deliverer.calls[0].route == "Corp"
    assert h.spooled() == []
    assert h.sample("relay_recipients_total", route="Corp", outcome="delivered") == 1
    assert h.sample("relay_delivery_seconds_count", route="Corp") == 1
    assert h.sample("relay_queue_messages") == 0


async def test_temporary_then_accept_is_delivered_exactly_once(tmp_path) -> None:
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [TEMP]}))
    env = spool_message(h.spool, ["bob@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
        (stored,) = h.spooled()
        rcpt = stored.recipients[0]
        assert rcpt.state is RcptState.PENDING and rcpt.attempts == 1
        assert rcpt.last_reply == TEMP and rcpt.remote_mta == "mx.example.com [192.0.2.1]"
        delay = stored.next_attempt - h.clock.now
        assert 60 * (1 - JITTER) <= delay <= 60 * (1 + JITTER)
        assert h.sample("relay_queue_messages") == 1
        h.clock.advance(delay)
        await until(lambda: len(h.deliverer.calls) == 2)
        await settle(h.scheduler)
        h.scheduler.flush()
        await settle(h.scheduler)
    assert h.deliverer.calls_for("bob@example.com") == 2
    assert h.spooled() == []
    assert h.sample("relay_recipients_total", route="Corp", outcome="deferred") == 1
    assert h.sample("relay_recipients_total", route="Corp", outcome="delivered") == 1


async def test_partial_delivery_survives_a_restart(tmp_path) -> None:
    h = harness(tmp_path, FakeDeliverer(script={"carol@example.com": [TEMP]}))
    env = spool_message(h.spool, ["bob@example.com", "carol@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    (stored,) = h.spooled()
    states = {r.address: r.state for r in stored.recipients}
    assert states == {
        "bob@example.com": RcptState.DELIVERED,
        "carol@example.com": RcptState.PENDING,
    }

    # A new daemon on the same spool retries only the pending recipient.
    again = FakeDeliverer()
    h2 = harness(tmp_path, again, clock=Clock(stored.next_attempt))
    async with running(h2.scheduler):
        for envelope in h2.spool.load_all():
            h2.scheduler.add(envelope)
        await settle(h2.scheduler)
    assert [c.recipients for c in again.calls] == [["carol@example.com"]]
    assert h2.spooled() == []


async def test_one_permanent_failure_bounces_only_that_recipient(tmp_path) -> None:
    script = {"carol@example.com": [PERM]}
    h = harness(tmp_path, FakeDeliverer(script=script))
    env = spool_message(h.spool, ["bob@example.com", "carol@example.com", "dan@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    original, dsn = h.deliverer.calls
    assert original.recipients == ["bob@example.com", "carol@example.com", "dan@example.com"]
    # The DSN went through the queue to the sender, from <>, by the sender's MX.
    assert (dsn.mail_from, dsn.recipients, dsn.route) == ("", ["alice@sender.test"], "(direct)")
    assert _final_recipients(dsn.body) == ["rfc822; carol@example.com"]
    assert "carol@example.com" in dsn.body.decode() and "dan@example.com" not in dsn.body.decode()
    # The next hop's own reply (RFC 3464 section 2.3.6): "smtp;" and its Remote-MTA.
    (block,) = _status_blocks(dsn.body)[1:]
    assert block["Diagnostic-Code"] == f"smtp; {PERM}"
    assert block["Remote-MTA"] == "dns; mx.example.com"
    assert h.spooled() == []
    assert h.sample("relay_bounces_total", reason="remote_permanent") == 1
    assert h.sample("relay_recipients_total", route="Corp", outcome="bounced") == 1
    assert h.sample("relay_recipients_total", route="Corp", outcome="delivered") == 2


async def test_tls_policy_failure_bounces_at_once_without_retry(tmp_path) -> None:
    failures = (
        TlsPolicyFailure(TlsFailure.HOSTNAME_MISMATCH),
        TlsPolicyFailure(TlsFailure.UNTRUSTED_CA),
    )
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [failures]}))
    env = spool_message(h.spool, ["bob@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
        h.scheduler.flush()
        await settle(h.scheduler)
    assert h.deliverer.calls_for("bob@example.com") == 1
    (dsn,) = [c for c in h.deliverer.calls if c.mail_from == ""]
    text = " ".join(dsn.body.decode().split())
    # Each host tried, in plain words for the sender ...
    assert "mx.example.com [192.0.2.1]: its security certificate is for a different name" in text
    assert (
        "mx2.example.com [192.0.2.1]: its security certificate is not issued by a trusted "
        "authority" in text
    )
    (block,) = _status_blocks(dsn.body)[1:]
    assert block["Status"] == "5.7.5" and block["Action"] == "failed"
    # The relay's own diagnosis, not a reply the remote host sent; the host it
    # tried last is named (RFC 3464 section 2.3.5).
    assert block["Diagnostic-Code"].startswith("X-Relay; 550 5.7.5 ")
    assert block["Remote-MTA"].startswith("dns; mx")
    # ... and the fix for the postmaster, in the report.
    assert "X-Relay-Diagnosis: mx.example.com [192.0.2.1]: validate_hostname failed:" in text
    assert "use the host name that appears in the server's certificate" in text
    assert "add that CA's certificate to [tls] ca_file" in text
    assert h.sample("relay_bounces_total", reason="tls_policy") == 1
    assert h.spooled() == []


async def test_null_sender_is_never_bounced(tmp_path) -> None:
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [PERM]}))
    env = spool_message(h.spool, ["bob@example.com"], sender="")
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert len(h.deliverer.calls) == 1
    assert h.spooled() == []
    assert h.sample("relay_bounces_total", reason="double_bounce") == 1
    assert h.sample("relay_bounces_total", reason="remote_permanent") == 0


async def test_expiry_bounces_with_4_4_7_and_the_last_error(tmp_path) -> None:
    clock = Clock()
    cfg = make_config(tmp_path / "spool", max_lifetime=100.0, min_backoff=30.0)
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [TEMP] * 10}), cfg, clock)
    env = spool_message(h.spool, ["bob@example.com"], received_at=clock.now)
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
        (stored,) = h.spooled()
        assert stored.next_attempt <= env.received_at + 100.0
        clock.advance(100.0)
        h.scheduler.flush()
        await until(lambda: any(c.mail_from == "" for c in h.deliverer.calls))
        await settle(h.scheduler)
    (dsn,) = [c for c in h.deliverer.calls if c.mail_from == ""]
    (block,) = _status_blocks(dsn.body)[1:]
    assert block["Status"] == "4.4.7" and block["Action"] == "failed"
    assert block["Diagnostic-Code"] == "smtp; 451 4.3.0 Try again later"
    assert "gave up" in " ".join(dsn.body.decode().split())
    assert h.sample("relay_bounces_total", reason="expired") == 1
    assert h.sample("relay_recipients_total", route="Corp", outcome="deferred") == 1
    assert h.sample("relay_recipients_total", route="Corp", outcome="bounced") == 1
    assert h.spooled() == []


async def test_undeliverable_dsn_is_dropped_at_its_lifetime(tmp_path) -> None:
    clock = Clock()
    cfg = make_config(tmp_path / "spool", max_lifetime=10.0)
    h = harness(tmp_path, FakeDeliverer(script={"alice@sender.test": [TEMP] * 5}), cfg, clock)
    env = spool_message(
        h.spool, ["alice@sender.test"], sender="", is_bounce=True, received_at=clock.now
    )
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
        clock.advance(11.0)
        h.scheduler.flush()
        await settle(h.scheduler)
    assert len(h.deliverer.calls) == 2
    assert all(c.route == "(direct)" for c in h.deliverer.calls)
    assert h.spooled() == []
    assert h.sample("relay_bounces_total", reason="double_bounce") == 1
    assert h.sample("relay_bounces_total", reason="expired") == 0


async def test_bounces_take_the_configured_bounce_route(tmp_path) -> None:
    cfg = make_config(tmp_path / "spool", bounce_route="Bounces")
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [PERM]}), cfg)
    env = spool_message(h.spool, ["bob@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert [c.route for c in h.deliverer.calls] == ["Corp", "Bounces"]


async def test_recipient_without_a_route_is_deferred_not_bounced(tmp_path) -> None:
    cfg = make_config(tmp_path / "spool", rules=[Rule(("@other.test",), "Corp")])
    h = harness(tmp_path, config=cfg)
    env = spool_message(h.spool, ["bob@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert h.deliverer.calls == []
    (stored,) = h.spooled()
    assert stored.recipients[0].state is RcptState.PENDING
    assert stored.recipients[0].last_reply == NO_ROUTE_NOW
    assert stored.next_attempt > h.clock.now


async def test_trusted_client_goes_direct_when_no_rule_matches(tmp_path) -> None:
    cfg = make_config(tmp_path / "spool", relay_networks=["192.0.2.0/24"])
    h = harness(tmp_path, config=cfg)
    env = spool_message(h.spool, ["bob@example.com", "zed@elsewhere.test"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    routes = sorted((c.route, tuple(c.recipients)) for c in h.deliverer.calls)
    assert routes == [("(direct)", ("zed@elsewhere.test",)), ("Corp", ("bob@example.com",))]


async def test_message_deleted_from_the_spool_is_dropped(tmp_path) -> None:
    h = harness(tmp_path)
    env = spool_message(h.spool, ["bob@example.com"])
    h.scheduler.add(env)
    assert h.spool.delete(env.id)
    async with running(h.scheduler):
        await settle(h.scheduler)
    assert h.deliverer.calls == []
    assert len(h.scheduler) == 0


async def test_unreadable_envelope_is_dropped_from_the_index(tmp_path) -> None:
    h = harness(tmp_path)
    env = spool_message(h.spool, ["bob@example.com"])
    (h.spool.msg_dir / f"{env.id}.state").write_bytes(b"{not json")
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert h.deliverer.calls == []
    assert len(h.scheduler) == 0


class FullSpool(Spool):
    """A spool whose disk filled up after the original was accepted."""

    def put(self, envelope: Envelope, data: bytes) -> None:
        raise SpoolFull("no space left on device")


async def test_originals_stay_pending_when_the_dsn_cannot_be_spooled(tmp_path) -> None:
    spool = FullSpool(tmp_path / "spool", fsync=False)
    spool.open()
    env = spool_message(Spool(spool.path, fsync=False), ["bob@example.com"])
    fake = FakeDeliverer(script={"bob@example.com": [PERM]})
    scheduler = Scheduler(
        lambda: make_config(spool.path), spool, fake, Metrics(), clock=Clock(), rng=random.Random(1)
    )
    async with running(scheduler):
        scheduler.add(env)
        await settle(scheduler)
    (stored,) = spool.load_all()
    # Never marked bounced without a durable DSN: it will fail (and bounce) again.
    assert stored.recipients[0].state is RcptState.PENDING
    assert stored.recipients[0].last_reply == PERM
    assert len(scheduler) == 1


async def test_a_failing_deliverer_defers(tmp_path) -> None:
    h = harness(tmp_path, FakeDeliverer(raises=RuntimeError("bug")))
    env = spool_message(h.spool, ["bob@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    (stored,) = h.spooled()
    assert stored.recipients[0].state is RcptState.PENDING
    assert stored.recipients[0].last_reply is not None
    assert stored.recipients[0].last_reply.status == (4, 3, 0)


async def test_concurrency_bound_is_respected(tmp_path) -> None:
    cfg = make_config(tmp_path / "spool", max_concurrency=3)
    h = harness(tmp_path, FakeDeliverer(delay=0.02), cfg)
    envs = [spool_message(h.spool, [f"u{i}@example.com"]) for i in range(10)]
    async with running(h.scheduler):
        for env in envs:
            h.scheduler.add(env)
        await settle(h.scheduler)
    assert len(h.deliverer.calls) == 10
    assert h.deliverer.peak == 3


class CountingClock(Clock):
    """A hand-moved clock that counts how often the scheduler reads it."""

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    def __call__(self) -> float:
        self.reads += 1
        return super().__call__()


async def test_a_full_scheduler_waits_for_a_free_slot_instead_of_spinning(tmp_path) -> None:
    # With every slot taken and another message due, the loop must sleep until an
    # attempt finishes. It once re-checked at once, forever: one core at 100 %
    # while the attempts it waited for starved (the hung benchmark saw it).
    gate = asyncio.Event()
    clock = CountingClock()
    cfg = make_config(tmp_path / "spool", max_concurrency=1)
    h = harness(tmp_path, FakeDeliverer(gate=gate), cfg, clock=clock)
    envs = [spool_message(h.spool, [f"u{i}@example.com"]) for i in range(3)]
    async with running(h.scheduler):
        for env in envs:
            h.scheduler.add(env)
        await until(lambda: h.deliverer.peak == 1)
        reads = clock.reads
        await asyncio.sleep(0.3)
        # A handful of reads at most (the 1 s safety wake-up); a spinning loop
        # makes thousands in 0.3 s.
        assert clock.reads - reads < 20
        gate.set()
        await settle(h.scheduler)
    assert len(h.deliverer.calls) == 3


async def test_routes_of_one_message_run_concurrently_within_the_bound(tmp_path) -> None:
    cfg = make_config(tmp_path / "spool", max_concurrency=2, relay_networks=["192.0.2.0/24"])
    h = harness(tmp_path, FakeDeliverer(delay=0.02), cfg)
    addresses = ["a@example.com", "b@one.test", "c@two.test", "d@three.test"]
    env = spool_message(h.spool, addresses)
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert len(h.deliverer.calls) == 4
    assert h.deliverer.peak == 2
    assert h.spooled() == []


async def test_stop_abandons_in_flight_attempts_and_keeps_them_pending(tmp_path) -> None:
    gate = asyncio.Event()
    h = harness(tmp_path, FakeDeliverer(gate=gate))
    env = spool_message(h.spool, ["bob@example.com"])
    task = asyncio.create_task(h.scheduler.run())
    h.scheduler.add(env)
    await until(lambda: len(h.deliverer.calls) == 1)
    await asyncio.wait_for(h.scheduler.stop(0.05), 5)
    await asyncio.wait_for(task, 5)
    (stored,) = h.spooled()
    assert stored.recipients[0].state is RcptState.PENDING


async def test_stop_waits_for_attempts_that_finish_within_grace(tmp_path) -> None:
    h = harness(tmp_path, FakeDeliverer(delay=0.05))
    env = spool_message(h.spool, ["bob@example.com"])
    task = asyncio.create_task(h.scheduler.run())
    h.scheduler.add(env)
    await until(lambda: len(h.deliverer.calls) == 1)
    await asyncio.wait_for(h.scheduler.stop(5.0), 5)
    await asyncio.wait_for(task, 5)
    assert h.spooled() == []


async def test_unreachable_message_expires_with_its_last_reply_made_permanent(tmp_path) -> None:
    clock = Clock()
    cfg = make_config(tmp_path / "spool", max_lifetime=50.0)
    unreachable = HostUnreachable("refused")
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [unreachable] * 3}), cfg, clock)
    env = spool_message(h.spool, ["bob@example.com"], received_at=clock.now)
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
        clock.advance(60.0)
        h.scheduler.flush()
        await until(lambda: any(c.mail_from == "" for c in h.deliverer.calls))
    (dsn,) = [c for c in h.deliverer.calls if c.mail_from == ""]
    (block,) = _status_blocks(dsn.body)[1:]
    # The relay's own text (RFC 3464 section 2.3.6); the host it kept trying
    # is named all the same (section 2.3.5).
    assert block["Diagnostic-Code"] == "X-Relay; 451 4.4.1 Next hop unreachable"
    assert block["Remote-MTA"] == "dns; mx.example.com"
    assert DELIVERY_EXPIRED.status == (5, 4, 7)


@pytest.mark.parametrize("count", [1, 50])
async def test_add_keeps_only_the_index_in_memory(tmp_path, count: int) -> None:
    h = harness(tmp_path)
    envs = [spool_message(h.spool, ["bob@example.com"]) for _ in range(count)]
    for env in envs:
        env.next_attempt = h.clock.now + 1000
        h.scheduler.add(env)
    assert len(h.scheduler) == count
    assert h.sample("relay_queue_messages") == count
    assert not busy(h.scheduler)
    h.scheduler.flush()
    assert busy(h.scheduler)


def test_scheduler_satisfies_the_constructor_contract(tmp_path) -> None:
    h = harness(tmp_path)
    assert isinstance(h.scheduler, Scheduler)


async def test_whether_the_last_reply_was_remote_is_kept_in_the_spool(tmp_path) -> None:
    # The DSN at expiry says "smtp;" only for a reply the next hop sent,
    # so the spool remembers which kind the last one was.
    script = {"bob@example.com": [TEMP], "dan@example.com": [HostUnreachable("refused")]}
    h = harness(tmp_path, FakeDeliverer(script=script))
    env = spool_message(h.spool, ["bob@example.com", "dan@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    [stored] = h.spooled()
    remote = {r.address: r.last_remote for r in stored.recipients}
    assert remote == {"bob@example.com": True, "dan@example.com": False}


# `relay queue delete` of a just-accepted message before its first attempt.
#
# The first attempt of a message handed over in memory (Scheduler.add with
# its body) checks that the message is still in the spool: a message the
# operator deleted while it waited for a delivery slot is dropped, not sent.


async def test_a_message_deleted_before_its_first_attempt_is_not_delivered(tmp_path) -> None:
    h = harness(tmp_path)
    env = spool_message(h.spool, ["bob@example.com"])
    # As inbound hands it over after the 250 (envelope and body in memory).
    h.scheduler.add(env, (BODY,))
    # The scheduler is busy (max_concurrency); meanwhile the operator runs
    # `relay queue delete ID` (another process: Spool.delete).
    assert h.spool.delete(env.id)
    async with running(h.scheduler):
        await settle(h.scheduler)
    assert h.deliverer.calls == []


async def test_a_flush_during_an_attempt_makes_it_due_again_if_it_defers(tmp_path) -> None:
    # The attempt was planned before the flush (perhaps with every host held
    # down); deferred, it would otherwise wait a whole backoff after the flush.
    gate = asyncio.Event()
    clock = Clock()
    script = {"bob@example.com": [TEMP]}
    h = harness(tmp_path, FakeDeliverer(script=script, gate=gate), clock=clock)
    env = spool_message(h.spool, ["bob@example.com"], received_at=clock.now)
    async with running(h.scheduler):
        h.scheduler.add(env)
        await until(lambda: len(h.deliverer.calls) == 1)
        h.scheduler.flush()
        gate.set()
        # No clock advance: only the flush can make it due.
        await until(lambda: len(h.deliverer.calls) == 2)
        await settle(h.scheduler)
    assert h.spooled() == []
