"""RFC 3461 outbound: DSN parameters acted on by relay when the next hop
does not offer DSN (an aiosmtpd sink): "relayed" notices, NOTIFY=NEVER,
RET, ENVID, ORCPT. Passed on to one that does: a real Postfix, in
tests/e2e/test_scenario_dsn_postfix.py.

DSNs travel like any message, to the sender domain's MX (a sink found
through dnsmasq), where they are parsed with the email package.
"""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from relay.bounce import build_relayed
from relay.envelope import Envelope, Recipient
from tests.support.dsn import HOSTS, MESSAGE, MX, RULES, put, routes
from tests.support.integ import (
    InProcessRelay,
    dsn_parts,
    idle,
    integration_toml,
    parse_dsn,
)
from tests.support.sink import Sink
from tests.support.wait import until


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


def test_a_relayed_notice_is_never_built_for_the_null_sender() -> None:
    envelope = Envelope(id="q1", mail_from="", recipients=[Recipient("u@corp.test")])
    with pytest.raises(ValueError):
        build_relayed(
            envelope, envelope.recipients, hostname="relay.test", original=MESSAGE,
            now=datetime.now(UTC),
        )  # fmt: skip
