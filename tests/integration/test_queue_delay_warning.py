"""Delay warnings ([bounces] delay_warning): one RFC 3464 "Action: delayed" DSN per message."""

from __future__ import annotations

import dataclasses
import email
import email.policy
import email.utils
from email.message import EmailMessage
from pathlib import Path

import pytest

from relay.config import BouncesConfig, Config
from relay.envelope import Envelope
from relay.queue import Scheduler
from tests.support.queue import (
    TEMP,
    Clock,
    FakeDeliverer,
    harness,
    make_config,
    running,
    settle,
    spool_message,
)
from tests.support.wait import until
from tests.unit.test_config import SERVER, SINGLE, load, problems


def _config(tmp_path: Path, delay_warning: float) -> Config:
    cfg = make_config(tmp_path / "spool", max_lifetime=1000.0, min_backoff=30.0, max_backoff=600.0)
    return dataclasses.replace(cfg, bounces=BouncesConfig(delay_warning=delay_warning))


def _status_blocks(body: bytes) -> list[dict[str, str]]:
    msg = email.message_from_bytes(body, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    (status,) = [p for p in msg.walk() if p.get_content_type().endswith("delivery-status")]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [{k: str(v) for k, v in b.items()} for b in blocks]


async def test_one_delay_warning_with_the_last_error_and_when_it_gives_up(tmp_path) -> None:
    clock = Clock()
    deliverer = FakeDeliverer(script={"bob@example.com": [TEMP] * 10})
    h = harness(tmp_path, deliverer, _config(tmp_path, 50.0), clock)
    env = spool_message(h.spool, ["bob@example.com"], received_at=clock.now)
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
        (stored,) = h.spooled()
        # The next attempt waits no longer than the warning is due.
        assert stored.next_attempt <= env.received_at + 50.0
        assert not stored.delay_warned
        assert not [c for c in deliverer.calls if c.mail_from == ""]
        clock.advance(50.0)
        h.scheduler.flush()
        await until(lambda: any(c.mail_from == "" for c in deliverer.calls))
        await settle(h.scheduler)
        # Later attempts (still failing) send no second warning.
        for _ in range(3):
            clock.advance(100.0)
            h.scheduler.flush()
            await settle(h.scheduler)
    (warning,) = [c for c in deliverer.calls if c.mail_from == ""]
    assert warning.recipients == ["alice@sender.test"]
    assert warning.route == "(direct)"  # a DSN: by the bounce route, to the sender's MX
    head, block = _status_blocks(warning.body)
    assert block["Action"] == "delayed"
    assert block["Status"] == "4.3.0"
    assert block["Diagnostic-Code"] == "smtp; 451 4.3.0 Try again later"
    text = " ".join(warning.body.decode().split())
    assert "WARNING ONLY" in text and "Delayed Mail" in text
    assert "451 4.3.0 Try again later" in text
    assert h.sample("relay_delay_warnings_total") == 1
    assert h.sample("relay_bounces_total", reason="expired") == 0
    (stored,) = h.spooled()
    assert stored.delay_warned and stored.pending


async def test_will_retry_until_is_the_end_of_max_lifetime(tmp_path) -> None:
    clock = Clock()
    deliverer = FakeDeliverer(script={"bob@example.com": [TEMP] * 10})
    h = harness(tmp_path, deliverer, _config(tmp_path, 1.0), clock)
    env = spool_message(h.spool, ["bob@example.com"], received_at=clock.now - 5.0)
    async with running(h.scheduler):
        h.scheduler.add(env)
        await until(lambda: any(c.mail_from == "" for c in deliverer.calls))
        await settle(h.scheduler)
    (warning,) = [c for c in deliverer.calls if c.mail_from == ""]
    _, block = _status_blocks(warning.body)
    until_date = email.utils.parsedate_to_datetime(block["Will-Retry-Until"])
    assert until_date.timestamp() == env.received_at + 1000.0


async def test_a_warned_message_is_not_warned_again_after_a_restart(tmp_path) -> None:
    clock = Clock()
    deliverer = FakeDeliverer(script={"bob@example.com": [TEMP] * 10})
    cfg = _config(tmp_path, 10.0)
    h = harness(tmp_path, deliverer, cfg, clock)
    env = spool_message(h.spool, ["bob@example.com"], received_at=clock.now - 20.0)
    async with running(h.scheduler):
        h.scheduler.add(env)
        await until(lambda: any(c.mail_from == "" for c in deliverer.calls))
        await settle(h.scheduler)
    # A new scheduler over the same spool (a restart) loads the flag.
    again = Scheduler(lambda: cfg, h.spool, deliverer, h.metrics, clock=clock)
    (stored,) = [e for e in h.spooled() if not e.is_bounce]
    assert stored.delay_warned
    async with running(again):
        again.add(stored)
        clock.advance(100.0)
        again.flush()
        await settle(again)
    assert deliverer.calls_for("bob@example.com") >= 2
    assert len([c for c in deliverer.calls if c.mail_from == ""]) == 1


@pytest.mark.parametrize("delay_warning", [0.0, 10.0])
async def test_no_warning_when_off_or_for_the_null_sender(tmp_path, delay_warning) -> None:
    clock = Clock()
    deliverer = FakeDeliverer(script={"bob@example.com": [TEMP] * 10})
    h = harness(tmp_path, deliverer, _config(tmp_path, delay_warning), clock)
    sender = "" if delay_warning else "alice@sender.test"
    env = spool_message(h.spool, ["bob@example.com"], sender=sender, received_at=clock.now - 500)
    async with running(h.scheduler):
        h.scheduler.add(env)
        await settle(h.scheduler)
    assert deliverer.calls_for("bob@example.com") == 1
    assert len(deliverer.calls) == 1  # no DSN went out
    assert h.sample("relay_delay_warnings_total") == 0


def test_an_older_envelope_loads_unwarned_and_the_flag_is_written_only_when_set() -> None:
    env = Envelope(id="x", mail_from="a@b.test", recipients=[])
    assert "delay_warned" not in env.to_json()
    data = env.to_json()
    assert Envelope.from_json(data).delay_warned is False
    env.delay_warned = True
    assert Envelope.loads(env.dumps()).delay_warned is True


def test_delay_warning_config(tmp_path: Path) -> None:
    rule = '[[rules]]\nrecipients = ["*"]\nroute = "R"\n'
    assert load(tmp_path, SERVER + SINGLE + rule).bounces.delay_warning == 0  # off by default
    for off in ('"0"', '"0h"'):
        text = f"{SERVER}{SINGLE}{rule}[bounces]\ndelay_warning = {off}\n"
        assert load(tmp_path, text).bounces.delay_warning == 0
    text = SERVER + SINGLE + rule + '[bounces]\ndelay_warning = "4h"\n'
    assert load(tmp_path, text).bounces.delay_warning == 4 * 3600
    text = SERVER + SINGLE + rule + '[queue]\nmax_lifetime = "1h"\n'
    text += '[bounces]\ndelay_warning = "4h"\n'
    (problem,) = problems(tmp_path, text)
    assert problem.startswith("bounces: delay_warning: must be shorter than [queue] max_lifetime")
    text = SERVER + SINGLE + rule + '[bounces]\ndelay_warning = "soon"\n'
    (problem,) = problems(tmp_path, text)
    assert problem.startswith("bounces: delay_warning: 'soon' is not a duration")


# --- end to end: real SMTP sinks ------------------------------------------------


async def test_delay_warning_reaches_the_senders_mx_and_the_message_stays_queued(
    tmp_path: Path,
) -> None:
    from types import SimpleNamespace

    from tests.support import configs
    from tests.support.integ import InProcessRelay, dsn_parts, integration_toml
    from tests.support.sink import Sink

    async with Sink(replies={"RCPT": "451 4.2.1 mailbox busy"}) as busy, Sink() as senders:
        routes = configs.route("Corp", "127.0.0.1", busy.port)
        routes += configs.route("Senders", "127.0.0.1", senders.port)
        rules = configs.rule("Senders", "@sender.test") + configs.rule("Corp", "@corp.test")
        dns = SimpleNamespace(ip="127.0.0.1", port=53)  # IP-literal hosts: never asked
        toml = integration_toml(tmp_path, dns, routes, rules)  # type: ignore[arg-type]
        toml += '[bounces]\ndelay_warning = "300ms"\n'
        async with InProcessRelay(tmp_path, toml) as relay:
            env = relay.put("alice@sender.test", ["bob@corp.test"])
            await until(lambda: senders.messages)
            # Several more failed attempts: still one warning.
            attempts = busy.lines.count("RCPT TO:<bob@corp.test>")
            await until(lambda: busy.lines.count("RCPT TO:<bob@corp.test>") >= attempts + 3)
            (stored,) = [e for e in relay.spooled() if e.id == env.id]
            assert stored.delay_warned and stored.pending
            assert relay.sample("relay_delay_warnings_total") == 1
    (warning,) = senders.messages
    assert warning.mail_from == "<>" and warning.rcpt_tos == ["alice@sender.test"]
    message, text, (block,) = dsn_parts(warning.data)
    assert message["Subject"] == "Delayed Mail (still being retried)"
    assert block["action"] == "delayed" and block["status"] == "4.2.1"
    assert block["diagnostic-code"] == "smtp; 451 4.2.1 mailbox busy"
    assert block["remote-mta"] == "dns; 127.0.0.1"
    assert "will-retry-until" in block
    assert "WARNING ONLY" in text and "451 4.2.1 mailbox busy" in text
