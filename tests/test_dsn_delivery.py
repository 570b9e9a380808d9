"""RFC 3461 outbound: DSN parameters passed on to a next hop that offers DSN
(a real Postfix), and acted on by relay when the next hop does not (an
aiosmtpd sink): "relayed" notices, NOTIFY=NEVER, RET, ENVID, ORCPT.

DSNs travel like any message, to the sender domain's MX (a sink found
through dnsmasq), where they are parsed with the email package.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from relay.bounce import build_relayed
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.spoolfiles import new_id
from tests.support import configs
from tests.support.integ import (
    SENDER,
    InProcessRelay,
    dsn_parts,
    idle,
    integration_toml,
    parse_dsn,
)
from tests.support.postfix import PostfixFactory
from tests.support.sink import Sink
from tests.support.wait import blocking_until, until

RULES = configs.rule("Corp", "@corp.test") + configs.rule("Senders", "@sender.test")
HOSTS = {"mx1.corp.test": ["127.0.0.1"], "mx.sender.test": ["127.0.0.1"]}
MX = {"sender.test": [(10, "mx.sender.test")]}
MESSAGE = b"From: alice@sender.test\r\nSubject: dsn test\r\nMessage-ID: <m1@sender.test>\r\n\r\n"
MESSAGE += b"the secret body line\r\n"


def routes(corp_port: int, dsn_sink: Sink) -> str:
    return configs.route("Corp", "mx1.corp.test", corp_port) + configs.route(
        "Senders", "sender.test", dsn_sink.port, mx_lookup=True
    )


def put(
    relay: InProcessRelay, recipients: list[Recipient], ret: str = "", envid: str = ""
) -> Envelope:
    """Spool a message with DSN parameters as inbound would, and queue it."""
    now = relay.clock()
    envelope = Envelope(
        id=new_id(), mail_from=SENDER, recipients=recipients,
        client=ClientInfo(ip="192.0.2.10", helo="client.test"),
        received_at=now, next_attempt=now, ret=ret, envid=envid,
    )  # fmt: skip
    relay.spool.put(envelope, MESSAGE)
    relay.scheduler.add(envelope)
    return envelope


def message_fields(data: bytes) -> dict[str, str]:
    """The per-message fields of a DSN's report (RFC 3464 section 2.2)."""
    report = list(parse_dsn(data).iter_parts())[1].get_payload()
    assert isinstance(report, list)
    return {k.lower(): str(v) for k, v in report[0].items()}


async def test_notify_success_to_a_hop_without_dsn_gets_a_relayed_notice(
    tmp_path, dnsmasq, dsn_sink
):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink() as sink:
        toml = integration_toml(tmp_path, server, routes(sink.port, dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            rcpts = [
                Recipient("one@corp.test", notify="SUCCESS", orcpt="rfc822;first@corp.test"),
                Recipient("two@corp.test"),  # no NOTIFY: no success notice
            ]
            put(relay, rcpts, envid="env-42")
            await until(lambda: dsn_sink.messages, what="the relayed notice")
            await idle(relay)
            assert relay.spooled() == []
    # The sink offers no DSN: it got no NOTIFY/ORCPT (aiosmtpd would say 555).
    assert sorted(sink.messages[0].rcpt_tos) == ["one@corp.test", "two@corp.test"]
    assert not any("NOTIFY" in line or "ENVID" in line for line in sink.lines)
    (notice,) = dsn_sink.messages
    assert notice.mail_from == "<>" or notice.mail_from == ""
    message, human, recipients = dsn_parts(notice.data)
    assert str(message["Subject"]) == "Successful Mail Delivery Report"
    assert [r["final-recipient"] for r in recipients] == ["rfc822; one@corp.test"]
    assert recipients[0]["action"] == "relayed"
    assert recipients[0]["status"] == "2.0.0"
    assert recipients[0]["original-recipient"] == "rfc822; first@corp.test"
    assert message_fields(notice.data)["original-envelope-id"] == "env-42"
    assert "one@corp.test" in human and "two@corp.test" not in human
    # Headers only: no DSN without a failure returns the content.
    assert b"the secret body line" not in notice.data


async def test_notify_never_and_550_sends_no_dsn(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(replies={"RCPT": "550 5.1.1 no such user"}) as sink:
        toml = integration_toml(tmp_path, server, routes(sink.port, dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            envelope = put(relay, [Recipient("gone@corp.test", notify="NEVER")])
            await until(lambda: relay.spooled() == [], what="the message settled")
            await idle(relay)
            assert relay.sample("relay_recipients_total", route="Corp", outcome="bounced") == 1
    assert any(line.startswith("RCPT") for line in sink.lines)
    assert dsn_sink.messages == [] and dsn_sink.connections == 0
    assert envelope.id


@pytest.mark.parametrize("ret", ["HDRS", "FULL", ""])
async def test_failure_dsn_carries_envid_original_recipient_and_what_ret_asks(
    tmp_path, dnsmasq, dsn_sink, ret
):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(replies={"RCPT": "550 5.1.1 no such user"}) as sink:
        toml = integration_toml(tmp_path, server, routes(sink.port, dsn_sink), RULES)
        async with InProcessRelay(tmp_path, toml) as relay:
            rcpt = Recipient(
                "gone@corp.test", notify="FAILURE", orcpt="rfc822;Gone+Alias@corp.test"
            )
            put(relay, [rcpt], ret=ret, envid="abc 123")
            await until(lambda: dsn_sink.messages, what="the DSN")
            await idle(relay)
    (dsn,) = dsn_sink.messages
    message, _, recipients = dsn_parts(dsn.data)
    assert recipients[0]["action"] == "failed"
    assert recipients[0]["original-recipient"] == "rfc822; Gone+Alias@corp.test"
    assert message_fields(dsn.data)["original-envelope-id"] == "abc 123"
    returned = list(message.iter_parts())[2]
    if ret == "FULL":
        assert returned.get_content_type() == "message/rfc822"
        assert b"the secret body line" in dsn.data
    else:
        # RET=HDRS, and without RET as before: the headers only.
        assert returned.get_content_type() == "text/rfc822-headers"
        assert b"Subject: dsn test" in dsn.data
        assert b"the secret body line" not in dsn.data


async def test_ret_full_over_the_size_limit_returns_headers(tmp_path, dnsmasq, dsn_sink):
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(replies={"RCPT": "550 5.1.1 no such user"}) as sink:
        toml = integration_toml(tmp_path, server, routes(sink.port, dsn_sink), RULES)
        toml += "\n[bounces]\nmax_returned_size = 20\n"
        async with InProcessRelay(tmp_path, toml) as relay:
            put(relay, [Recipient("gone@corp.test")], ret="FULL")
            await until(lambda: dsn_sink.messages, what="the DSN")
            await idle(relay)
    (dsn,) = dsn_sink.messages
    message, _, _ = dsn_parts(dsn.data)
    assert list(message.iter_parts())[2].get_content_type() == "text/rfc822-headers"
    assert b"the secret body line" not in dsn.data


# --- a next hop that offers DSN: Postfix -------------------------------------------


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[PostfixFactory]:
    factory = PostfixFactory(keep_logs_in=tmp_path / "postfix-logs")
    try:
        yield factory
    finally:
        factory.close()


def queue_file_records(config_dir: Path, queue_id: str) -> str:
    """``postcat`` of one queued message: its envelope records, DSN ones included."""
    done = subprocess.run(
        ["/usr/sbin/postcat", "-c", str(config_dir), "-e", "-q", queue_id],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.stdout + done.stderr


@pytest.mark.e2e
async def test_postfix_downstream_receives_notify_orcpt_envid_ret(
    tmp_path, dnsmasq, dsn_sink, postfix
):
    # HOLD keeps the message in Postfix's queue, where its queue file shows
    # the DSN parameters as Postfix took them from relay's MAIL and RCPT.
    down = postfix.downstream(domains=("corp.test",), recipient_replies={"corp.test": "HOLD"})
    server = dnsmasq(hosts=HOSTS, mx=MX)
    toml = integration_toml(tmp_path, server, routes(down.port, dsn_sink), RULES)
    async with InProcessRelay(tmp_path, toml) as relay:
        rcpts = [
            Recipient("one@corp.test", notify="SUCCESS,DELAY", orcpt="rfc822;orig+tag@corp.test"),
            Recipient("two@corp.test", notify="NEVER"),
        ]
        put(relay, rcpts, ret="HDRS", envid="id+=1")
        await until(lambda: relay.spooled() == [], what="the message delivered")
        await idle(relay)
    (queue_id,) = blocking_until(lambda: down.queued() or None, 15, what="the held message")
    records = queue_file_records(down.config_dir, queue_id)
    lines = [line.removeprefix("named_attribute: ") for line in records.splitlines()]
    assert "envelope_id=id+=1" in lines, records
    assert "ret_flags=2" in lines, records  # Postfix's DSN_RET_HDRS
    # Per recipient, before its recipient record; Postfix's NOTIFY bit mask
    # is NEVER 1, SUCCESS 2, FAILURE 4, DELAY 8.
    one = lines.index("recipient: one@corp.test")
    assert lines[one - 3 : one - 1] == [
        "notify_flags=10",
        "dsn_orig_rcpt=rfc822;orig+tag@corp.test",
    ]
    two = lines.index("recipient: two@corp.test")
    assert lines[two - 3] == "notify_flags=1", records
    # No "relayed" notice: Postfix offers DSN and tells the sender itself.
    assert dsn_sink.messages == []


def test_a_relayed_notice_is_never_built_for_the_null_sender() -> None:
    envelope = Envelope(id="q1", mail_from="", recipients=[Recipient("u@corp.test")])
    with pytest.raises(ValueError):
        build_relayed(
            envelope, envelope.recipients, hostname="relay.test", original=MESSAGE,
            now=datetime.now(UTC),
        )  # fmt: skip
