"""Delay warnings honour each recipient's NOTIFY (RFC 3461 section 4.1):
only recipients whose NOTIFY has DELAY (or who gave none) are listed."""

from __future__ import annotations

import dataclasses
import email
import email.policy
from email.message import EmailMessage
from pathlib import Path

from relay.config import BouncesConfig, Config
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.spoolfiles import new_id
from tests.support.queue import (
    BODY,
    TEMP,
    Clock,
    FakeDeliverer,
    harness,
    make_config,
    running,
    settle,
)


def _config(tmp_path: Path) -> Config:
    cfg = make_config(tmp_path / "spool", max_lifetime=1000.0, min_backoff=30.0, max_backoff=600.0)
    return dataclasses.replace(cfg, bounces=BouncesConfig(delay_warning=50.0))


def _final_recipients(body: bytes) -> list[str]:
    msg = email.message_from_bytes(body, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    (status,) = [p for p in msg.walk() if p.get_content_type().endswith("delivery-status")]
    blocks = status.get_payload()
    assert isinstance(blocks, list)
    return [str(b["Final-Recipient"]) for b in blocks[1:]]


async def _warnings(tmp_path: Path, recipients: list[Recipient]) -> list[bytes]:
    """Deferred past ``delay_warning``: the bodies of the delay warnings sent."""
    clock = Clock()
    script = {r.address: [TEMP] * 10 for r in recipients}
    deliverer = FakeDeliverer(script=script)
    h = harness(tmp_path, deliverer, _config(tmp_path), clock)
    envelope = Envelope(
        id=new_id(), mail_from="alice@sender.test", recipients=recipients,
        client=ClientInfo(ip="192.0.2.10", helo="client.test"), received_at=clock.now,
    )  # fmt: skip
    h.spool.put(envelope, BODY)
    async with running(h.scheduler):
        h.scheduler.add(envelope)
        await settle(h.scheduler)
        for _ in range(3):
            clock.advance(60.0)
            h.scheduler.flush()
            await settle(h.scheduler)
    return [c.body for c in deliverer.calls if c.mail_from == ""]


async def test_delay_warning_lists_only_recipients_asking_for_delay(tmp_path) -> None:
    recipients = [
        Recipient("delay@example.com", notify="FAILURE,DELAY"),
        Recipient("failure@example.com", notify="FAILURE"),
        Recipient("never@example.com", notify="NEVER"),
        Recipient("default@example.com"),
    ]
    (warning,) = await _warnings(tmp_path, recipients)
    assert _final_recipients(warning) == [
        "rfc822; delay@example.com",
        "rfc822; default@example.com",
    ]


async def test_no_delay_warning_when_no_recipient_asks_for_it(tmp_path) -> None:
    recipients = [
        Recipient("never@example.com", notify="NEVER"),
        Recipient("s@example.com", notify="SUCCESS"),
    ]
    assert await _warnings(tmp_path, recipients) == []
