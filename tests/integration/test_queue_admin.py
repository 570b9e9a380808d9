"""Queue administration without a daemon: the recorded cause, backoff restart,
the hold directory, and ``relay queue`` acting on the spool itself.

With a running daemon: tests/e2e/test_daemon_ops_queue.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

from relay import app, control
from relay.audit import AuditLog, format_entry
from relay.configload import load
from relay.envelope import Envelope, Recipient
from relay.errors import HostUnreachable
from relay.outcomes import JITTER
from relay.spool import Spool
from tests.integration.test_cli import relay
from tests.support import configs
from tests.support.queue import (
    TEMP,
    FakeDeliverer,
    harness,
    open_spool,
    running,
    settle,
    spool_message,
)
from tests.support.spool import update_envelope
from tests.support.wait import until
from tests.unit.test_config import RULE, SERVER, SINGLE

REFUSED = HostUnreachable("Connect call failed ('192.0.2.1', 25)")


# --- what the scheduler records ---------------------------------------------------


async def test_the_cause_behind_a_generic_reply_is_recorded_and_persisted(tmp_path: Path) -> None:
    script = {"bob@example.com": [REFUSED], "carol@example.com": [TEMP]}
    h = harness(tmp_path, FakeDeliverer(script=script))
    env = spool_message(h.spool, ["bob@example.com", "carol@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    (stored,) = h.spooled()
    bob, carol = stored.recipients
    assert str(bob.last_reply) == "451 4.4.1 Next hop unreachable"
    assert bob.last_cause == "Connect call failed ('192.0.2.1', 25)"
    assert bob.remote_mta == "mx.example.com [192.0.2.1]"
    # A remote 4xx is its own explanation: nothing more to record.
    assert carol.last_reply == TEMP and carol.last_cause == ""


async def test_flush_restarts_the_backoff_of_the_messages_it_flushes(tmp_path: Path) -> None:
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [TEMP] * 5}))
    env = spool_message(h.spool, ["bob@example.com"])
    other = spool_message(h.spool, ["carol@example.com"])
    h.deliverer.script["carol@example.com"] = [TEMP] * 5
    async with running(h.scheduler):
        h.scheduler.add(env)
        h.scheduler.add(other)
        for calls in (2, 4):  # three attempts each: the next delay is 4 min
            await until(lambda n=calls: len(h.deliverer.calls) == n)  # type: ignore[misc]
            await settle(h.scheduler)
            h.clock.advance(max(e.next_attempt for e in h.spooled()) - h.clock.now)
        await until(lambda: len(h.deliverer.calls) == 6)
        await settle(h.scheduler)
        assert h.scheduler.flush([env.id]) == [env.id]
        await until(lambda: len(h.deliverer.calls) == 7)
        await settle(h.scheduler)
    stored = {e.id: e for e in h.spooled()}
    assert stored[env.id].attempts == 4 and stored[env.id].backoff_from == 3
    assert stored[other.id].attempts == 3  # not flushed
    delay = stored[env.id].next_attempt - h.clock.now
    assert delay <= 60 * (1 + JITTER)  # min_backoff again, not 8 minutes


async def test_withdraw_waits_for_the_running_attempt_then_nothing_tries_it(
    tmp_path: Path,
) -> None:
    gate = asyncio.Event()
    h = harness(tmp_path, FakeDeliverer(script={"bob@example.com": [TEMP]}, gate=gate))
    env = spool_message(h.spool, ["bob@example.com"])
    async with running(h.scheduler):
        h.scheduler.add(env)
        await until(lambda: len(h.deliverer.calls) == 1)
        withdrawing = asyncio.create_task(h.scheduler.withdraw(env.id))
        await asyncio.sleep(0.05)
        assert not withdrawing.done()  # the attempt is still under way
        gate.set()
        assert await withdrawing
        assert env.id not in h.scheduler
        h.scheduler.flush()
        await settle(h.scheduler)
    assert len(h.deliverer.calls) == 1
    (stored,) = h.spooled()  # its outcome was written before it left the schedule
    assert stored.recipients[0].last_reply == TEMP


# --- compatibility of the envelope -------------------------------------------------


def test_envelopes_without_the_new_fields_load_and_new_ones_write_them_only_when_set() -> None:
    old = {
        "id": "X1",
        "mail_from": "a@b.test",
        "recipients": [{"address": "c@d.test", "last_reply": [451, "4.4.1", "Next hop"]}],
    }
    env = Envelope.from_json(old)
    assert env.backoff_from == 0 and env.recipients[0].last_cause == ""
    data = env.to_json()
    assert "backoff_from" not in data and "last_cause" not in data["recipients"][0]
    env.backoff_from, env.recipients[0].last_cause = 2, "Connect call failed"
    again = Envelope.loads(env.dumps())
    assert again.backoff_from == 2 and again.recipients[0].last_cause == "Connect call failed"
    # What an older relay does with a newer envelope: it reads the keys it knows.
    known = {k: v for k, v in env.to_json().items() if k != "backoff_from"}
    assert Envelope.from_json(known).recipients[0] == Recipient(
        "c@d.test", last_reply=env.recipients[0].last_reply, last_cause="Connect call failed"
    )


# --- the hold directory ---------------------------------------------------------------


def test_hold_and_release_move_every_file_and_load_all_skips_held(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    env = spool_message(spool, ["bob@example.com"])
    assert update_envelope(spool, env)  # a .state next to the .msg
    other = spool_message(spool, ["carol@example.com"])
    assert spool.hold.add([env.id, "NOSUCH"]) == [env.id]
    assert sorted(p.name for p in spool.hold_dir.iterdir()) == [f"{env.id}.msg", f"{env.id}.state"]
    assert [e.id for e in spool.load_all()] == [other.id]  # never scheduled
    assert [e.id for e in spool.hold.load_all()] == [env.id]
    assert env.id in spool.hold and spool.hold.ids() == [env.id]
    assert spool.hold.release([env.id]) == [env.id]
    assert sorted(e.id for e in spool.load_all()) == sorted([env.id, other.id])
    assert list(spool.hold_dir.iterdir()) == []


def test_start_finishes_a_hold_or_release_cut_short_as_held(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    env = spool_message(spool, ["bob@example.com"])
    env.attempts = 3
    assert update_envelope(spool, env)
    # The body moved, the crash came before the envelope followed.
    spool.hold_dir.mkdir()
    (spool.msg_dir / f"{env.id}.msg").rename(spool.hold_dir / f"{env.id}.msg")
    spool.open()
    assert list(spool.msg_dir.iterdir()) == []  # the state was not dropped as debris
    assert spool.hold.load(env.id).attempts == 3


# --- relay queue on the spool itself (no daemon) -----------------------------------------


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        SERVER + SINGLE + RULE + f'\n[queue]\npath = "{tmp_path / "spool"}"\n'
        f'\n[audit]\npath = "{tmp_path / "audit.log"}"\n'
    )
    return path


def test_hold_and_release_all_without_a_daemon_report_progress_and_audit(
    tmp_path: Path,
) -> None:
    config = _config(tmp_path)
    spool = open_spool(tmp_path)
    count = control.PROGRESS_EVERY + 1
    for _ in range(count):
        spool_message(spool, ["bob@example.com"])
    assert relay("queue", "hold", "--config", str(config)).returncode == 2  # says which ones

    held = relay("queue", "hold", "--all", "--config", str(config))
    assert held.returncode == 0, held.stderr
    assert f"hold: {count} message(s)" in held.stdout
    assert f"hold: {control.PROGRESS_EVERY}/{count} message(s)" in held.stderr
    assert f"hold: {count}/{count} message(s)" in held.stderr
    assert list(spool.load_all()) == [] and len(spool.hold.ids()) == count
    listed = relay("queue", "list", "--held", "--json", "--config", str(config))
    assert json.loads(listed.stdout)["total"] == count

    released = relay("queue", "release", "--all", "--config", str(config))
    assert released.returncode == 0, released.stderr
    envelopes = list(spool.load_all())
    assert len(envelopes) == count and spool.hold.ids() == []
    assert all(e.next_attempt == 0.0 for e in envelopes)  # tried when a relay starts

    entries = [e for e in AuditLog(tmp_path / "audit.log").entries()]
    assert [(e["event"], e["count"], e["via"]) for e in entries] == [
        ("queue_hold", count, "spool"),
        ("queue_release", count, "spool"),
    ]
    assert entries[0]["selection"] == {"all": True}
    text = relay("audit", "--config", str(config)).stdout
    assert f"queue hold by {entries[0]['user']}: {count} message(s), in the spool" in text
    assert "(+491 more; --json has all)" in text


def test_flush_without_a_daemon_says_so_and_changes_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    spool = open_spool(tmp_path)
    env = spool_message(spool, ["bob@example.com"])
    done = relay("queue", "flush", env.id, "--config", str(config))
    assert done.returncode == 1 and "no running relay found" in done.stderr
    assert not (tmp_path / "audit.log").exists()


def test_delete_one_without_yes_and_a_held_one(tmp_path: Path) -> None:
    config = _config(tmp_path)
    spool = open_spool(tmp_path)
    kept = spool_message(spool, ["bob@example.com"])
    gone = spool_message(spool, ["carol@example.com"])
    held = spool_message(spool, ["dave@example.com"])
    spool.hold.add([held.id])
    done = relay("queue", "delete", gone.id, "--config", str(config))
    assert done.returncode == 0 and "deleted 1 message(s)" in done.stdout
    done = relay("queue", "delete", "--held", "--config", str(config))
    assert done.returncode == 0 and held.id in done.stdout
    assert [e.id for e in spool.load_all()] == [kept.id] and spool.hold.ids() == []
    missing = relay("queue", "delete", "NOSUCH", "--config", str(config))
    assert missing.returncode == 1 and "no message NOSUCH" in missing.stderr


def test_a_request_the_daemon_never_claims_is_taken_back(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    # Our own pid: alive, and SIGUSR2's default would end us, so ignore it.
    folder = control.control_dir(spool.path)
    folder.mkdir(parents=True)
    previous = signal.signal(control.SIGNAL, signal.SIG_IGN)
    try:
        try:
            control.submit(spool.path, os.getpid(), "flush", None)
        except control.ControlError as exc:
            # No ready file: a relay too old to know SIGUSR2 (it would die of it).
            assert "older than this command" in str(exc)
        else:
            raise AssertionError("no ControlError")
        (folder / control.READY).write_text(f"{os.getpid()}\n")
        start = time.monotonic()
        try:
            control.submit(spool.path, os.getpid(), "flush", None, claim_timeout=0.2)
        except control.ControlError as exc:
            assert "did not take the request" in str(exc)
        else:
            raise AssertionError("no ControlError")
        assert time.monotonic() - start < 5
    finally:
        signal.signal(control.SIGNAL, previous)
    assert list(control.control_dir(spool.path).glob("*.req")) == []  # never runs later


async def test_the_daemon_side_refuses_ids_that_are_not_queue_ids(tmp_path: Path) -> None:
    h = harness(tmp_path)
    env = spool_message(h.spool, ["bob@example.com"])
    h.scheduler.add(env)
    ctl = control.Control(h.spool, h.scheduler)
    ctl.open()
    folder = control.control_dir(h.spool.path)
    (folder / "R1.req").write_text(json.dumps({"action": "hold", "ids": ["../msg/x"]}))
    (folder / "R2.req").write_text(json.dumps({"action": "hold", "ids": [env.id, "NOSUCH"]}))
    task = asyncio.create_task(ctl.run())
    try:
        ctl.wake()
        await until(lambda: (folder / "R2.done").exists())
    finally:
        task.cancel()
    refused = json.loads((folder / "R1.done").read_text())
    assert "letters and digits" in refused["error"]
    result = json.loads((folder / "R2.done").read_text())
    assert result == {"done": [env.id], "already": [], "missing": ["NOSUCH"]}
    assert h.spool.hold.ids() == [env.id] and env.id not in h.scheduler
    assert not [p for p in folder.iterdir() if p.suffix in (".req", ".work")]


def test_audit_prints_queue_entries_in_a_line_or_three() -> None:
    entry = {
        "time": "2026-12-02T22:00:00Z",
        "event": "queue_delete",
        "user": "ops",
        "selection": {"domain": "down.test"},
        "count": 2,
        "ids": ["A", "B"],
        "skipped": {"missing": ["C"]},
        "via": "spool",
    }
    assert format_entry(entry) == [
        "2026-12-02T22:00:00Z queue delete by ops: 2 message(s), in the spool (no relay ran)",
        "  selection: domain=down.test",
        "  ids: A B",
        "  skipped (missing): C",
    ]


def test_held_messages_have_a_gauge_of_their_own(tmp_path: Path) -> None:
    toml = tmp_path / "relay.toml"
    sections = {"server": {"domains": ["x.test"]}, "queue": {"path": str(tmp_path / "spool")}}
    toml.write_text(configs.relay_toml(sections, configs.route("Out", "127.0.0.1", 2526)))
    cfg = load(toml)
    parts = app.build(lambda: cfg, fsync=False)
    parts.spool.open()
    envelope = Envelope("HOLDME1", "a@b.test", [Recipient("c@x.test")])
    parts.spool.put(envelope, b"Subject: x\r\n\r\nbody\r\n")

    def held() -> float | None:
        return parts.metrics.registry.get_sample_value("relay_queue_held_messages")

    assert held() == 0
    parts.spool.hold.add([envelope.id])
    assert held() == 1  # counted at the scrape: also a hold made by `relay queue` offline
    parts.spool.hold.release([envelope.id])
    assert held() == 0
