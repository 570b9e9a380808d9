"""The DSN builder: RFC 3464 structure, every field parsed back, golden files per trigger.

Regenerate the golden files after an intended change with
``RELAY_UPDATE_GOLDEN=1 python -m pytest tests/unit/test_bounce_dsn.py``.
"""

from __future__ import annotations

import email
import email.policy
import os
import re
from datetime import UTC, datetime
from email.message import EmailMessage, Message

import pytest

from relay.bounce import (
    BounceReason,
    Failure,
    TlsIssue,
    build_dsn,
    build_postmaster_copy,
    needs_smtputf8,
    reason_for,
)
from relay.certificate import Certificate
from relay.envelope import Envelope, Recipient
from relay.errors import (
    DELIVERY_EXPIRED,
    EXPIRED_STATUS,
    NoSuchDomain,
    NullMx,
    RemotePermanent,
    RemoteTemporary,
    Reply,
    TlsFailure,
    TlsPolicyFailure,
)
from tests.support.paths import DATA

GOLDEN = DATA / "golden"
NOW = datetime(2026, 11, 28, 12, 0, 0, tzinfo=UTC)
ARRIVAL = datetime(2026, 11, 27, 9, 30, 0, tzinfo=UTC).timestamp()
LAST = datetime(2026, 11, 28, 11, 59, 0, tzinfo=UTC).timestamp()
ORIGINAL = (
    b"Received: from client.test (client.test [192.0.2.10])\r\n"
    b"\tby relay.example.com with ESMTP id 0ABC; Fri, 27 Nov 2026 09:30:00 +0000\r\n"
    b"From: Alice <alice@sender.test>\r\n"
    b"To: Bob <bob@example.com>, Carol <carol@example.com>\r\n"
    b"Subject: Quarterly report\r\n"
    b"Message-ID: <orig-1@sender.test>\r\n"
    b"\r\n"
    b"The body is never copied into a DSN.\r\n"
)
USER_UNKNOWN = Reply(550, (5, 1, 1), "<carol@example.com>: Recipient address rejected")


def _envelope(sender: str = "alice@sender.test", *rcpts: str) -> Envelope:
    addresses = rcpts or ("bob@example.com", "carol@example.com")
    return Envelope(
        id="0ABC1234",
        mail_from=sender,
        recipients=[Recipient(a) for a in addresses],
        received_at=ARRIVAL,
    )


def _remote_failure() -> Failure:
    return Failure(
        "carol@example.com",
        USER_UNKNOWN,
        BounceReason.REMOTE_PERMANENT,
        remote_mta="mx.corp.example.com [192.0.2.25]",
        last_attempt=LAST,
        route="On-prem Exchange",
        remote=True,
    )


def _certificate(*names: str, issuer: str = "O=Corp, CN=Corp internal CA") -> Certificate:
    return Certificate(
        subject=f"CN={names[0]}",
        issuer=issuer,
        sans=tuple(f"DNS:{name}" for name in names),
        not_before="Jan  1 00:00:00 2026 GMT",
        not_after="Jan  1 00:00:00 2027 GMT",
        days_left=33,
    )


def _tls_failure() -> Failure:
    failure = TlsPolicyFailure(TlsFailure.HOSTNAME_MISMATCH)
    return Failure(
        "bob@example.com",
        failure.reply,
        BounceReason.TLS_POLICY,
        remote_mta="backup.corp.example.com [192.0.2.28]",
        tls=(
            TlsIssue(
                "mx1.corp.example.com",
                TlsFailure.UNTRUSTED_CA,
                ip="192.0.2.26",
                certificate=_certificate("mx1.corp.example.com"),
            ),
            TlsIssue("mx2.corp.example.com", TlsFailure.NO_STARTTLS, ip="192.0.2.27"),
            TlsIssue(
                "backup.corp.example.com",
                TlsFailure.HOSTNAME_MISMATCH,
                ip="192.0.2.28",
                certificate=_certificate(
                    "mail.hosting.example", "smtp.hosting.example", issuer="O=Public CA"
                ),
            ),
        ),
        last_attempt=LAST,
        route="Split delivery",
    )


def _expired_failure() -> Failure:
    return Failure(
        "bob@example.com",
        Reply(451, (4, 4, 1), "Next hop unreachable"),
        BounceReason.EXPIRED,
        remote_mta="mx.corp.example.com [192.0.2.25]",
        last_attempt=LAST,
        route="On-prem Exchange",
        status=EXPIRED_STATUS,
    )


CASES = {
    "remote_permanent": (_envelope(), [_remote_failure()]),
    "tls_policy": (_envelope(), [_tls_failure()]),
    "expired": (_envelope(), [_expired_failure()]),
    "smtputf8": (
        _envelope("álvaro@sender.test", "jürgen@例え.jp"),
        [
            Failure(
                "jürgen@例え.jp",
                Reply(550, (5, 1, 1), "mailbox unavailable"),
                BounceReason.REMOTE_PERMANENT,
                remote_mta="mx.xn--r8jz45g.jp [192.0.2.30]",
                last_attempt=LAST,
                remote=True,
            )
        ],
    ),
}


def _build(case: str) -> bytes:
    envelope, failures = CASES[case]
    return build_dsn(envelope, failures, hostname="relay.example.com", original=ORIGINAL, now=NOW)


def _normalise(dsn: bytes) -> bytes:
    dsn = re.sub(rb"=_relay_[0-9a-f]{24}", b"=_relay_BOUNDARY", dsn)
    return re.sub(rb"Message-ID: <[^>]*dsn@", b"Message-ID: <MSGID.dsn@", dsn)


def _parse(dsn: bytes) -> EmailMessage:
    msg = email.message_from_bytes(dsn, policy=email.policy.default)
    assert isinstance(msg, EmailMessage)
    return msg


def _parts(msg: EmailMessage) -> list[Message]:
    payload = msg.get_payload()
    assert isinstance(payload, list)
    return payload


def _status_blocks(part: Message) -> list[Message]:
    blocks = part.get_payload()
    assert isinstance(blocks, list)
    return blocks


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_golden_file(case: str) -> None:
    path = GOLDEN / f"dsn_{case}.eml"
    got = _normalise(_build(case))
    if os.environ.get("RELAY_UPDATE_GOLDEN"):
        path.write_bytes(got)
    assert got == path.read_bytes()


@pytest.mark.parametrize("case", sorted(CASES))
def test_wire_form_is_crlf_and_short_lines(case: str) -> None:
    dsn = _build(case)
    assert dsn.endswith(b"\r\n")
    lines = dsn.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert max(len(line) for line in lines) <= 998
    if case != "smtputf8":
        assert dsn.isascii()


def test_every_field_of_a_remote_permanent_dsn() -> None:
    msg = _parse(_build("remote_permanent"))
    assert msg["From"] == "Mail Delivery System <MAILER-DAEMON@relay.example.com>"
    assert msg["To"].addresses[0].addr_spec == "alice@sender.test"
    assert msg["Subject"] == "Undelivered Mail Returned to Sender"
    assert msg["Auto-Submitted"] == "auto-replied"
    assert msg["In-Reply-To"] == "<orig-1@sender.test>"
    assert msg["References"] == "<orig-1@sender.test>"
    assert msg["Date"].datetime == NOW
    assert re.fullmatch(r"<[^<>@\s]+@relay\.example\.com>", msg["Message-ID"])
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    human, status, headers = _parts(msg)
    assert human.get_content_type() == "text/plain"
    text = " ".join(human.get_payload().split())
    assert "<carol@example.com>" in text and "mx.corp.example.com [192.0.2.25]" in text
    assert "550 5.1.1 <carol@example.com>: Recipient address rejected" in text
    assert "bob@example.com" not in text  # delivered recipients are not listed
    assert status.get_content_type() == "message/delivery-status"
    per_message, per_rcpt = _status_blocks(status)
    assert per_message["Reporting-MTA"] == "dns; relay.example.com"
    assert per_message["Arrival-Date"] == "Fri, 27 Nov 2026 09:30:00 +0000"
    assert dict(per_rcpt.items()) == {
        "Final-Recipient": "rfc822; carol@example.com",
        "Action": "failed",
        "Status": "5.1.1",
        "Remote-MTA": "dns; mx.corp.example.com",
        "Diagnostic-Code": "smtp; 550 5.1.1 <carol@example.com>: Recipient address rejected",
        "Last-Attempt-Date": "Sat, 28 Nov 2026 11:59:00 +0000",
        # RFC 3464 section 7: an extension field for the postmaster.
        "X-Relay-Route": "On-prem Exchange",
    }
    assert headers.get_content_type() == "text/rfc822-headers"
    original = headers.get_payload()
    assert "Subject: Quarterly report" in original
    assert "never copied" not in original


def test_tls_dsn_tells_the_sender_each_host_in_plain_words() -> None:
    msg = _parse(_build("tls_policy"))
    human, _, _ = _parts(msg)
    text = " ".join(human.get_payload().split())
    assert (
        "mx1.corp.example.com [192.0.2.26]: its security certificate is not issued by a "
        "trusted authority" in text
    )
    assert "mx2.corp.example.com [192.0.2.27]: it does not support encrypted connections" in text
    assert (
        "backup.corp.example.com [192.0.2.28]: its security certificate is for a different name"
        in text
    )
    # The sender reads no route names and no admin advice.
    for internal in ("Split delivery", "require_", "ca_file", "fix", "route"):
        assert internal not in text, internal
    assert "forward this message to the postmaster of relay.example.com" in text


def test_tls_dsn_report_names_the_host_route_check_and_fix() -> None:
    msg = _parse(_build("tls_policy"))
    _, status, _ = _parts(msg)
    (_, block) = _status_blocks(status)
    assert block["Status"] == "5.7.5"
    # RFC 3464 section 2.3.5: the host the relay tried, TLS failures included;
    # section 2.3.6: the diagnosis is the relay's own, not an "smtp;" reply.
    assert block["Remote-MTA"] == "dns; backup.corp.example.com"
    assert block["Diagnostic-Code"] == (
        "X-Relay; 550 5.7.5 TLS required by route (validate_hostname): "
        "the server certificate does not match the host name"
    )
    assert block["X-Relay-Route"] == "Split delivery"
    diagnoses = [" ".join(d.split()) for d in block.get_all("X-Relay-Diagnosis")]
    assert len(diagnoses) == 3
    untrusted, no_starttls, mismatch = diagnoses
    assert untrusted.startswith("mx1.corp.example.com [192.0.2.26]: require_ca_signed failed:")
    assert 'issued by "O=Corp, CN=Corp internal CA"' in untrusted
    assert "add its certificate to [tls] ca_file" in untrusted
    assert "mx2.corp.example.com [192.0.2.27]: require_tls failed:" in no_starttls
    assert "enable STARTTLS on mx2.corp.example.com" in no_starttls
    assert 'require_tls = false in route "Split delivery"' in no_starttls
    assert "backup.corp.example.com [192.0.2.28]: validate_hostname failed:" in mismatch
    assert (
        "use one of these as the route host: mail.hosting.example, smtp.hosting.example" in mismatch
    )


def test_sender_text_says_the_postmaster_was_told_when_a_copy_goes_out() -> None:
    envelope, failures = CASES["tls_policy"]
    dsn = build_dsn(
        envelope, failures, hostname="relay.example.com", original=ORIGINAL, now=NOW,
        postmaster_told=True,
    )  # fmt: skip
    text = " ".join(_parts(_parse(dsn))[0].get_payload().split())
    assert "The postmaster of this mail system has been told." in text
    assert "forward this message" not in text


def test_postmaster_copy_carries_the_full_diagnosis() -> None:
    envelope, failures = CASES["tls_policy"]
    copy = build_postmaster_copy(
        envelope, [*failures, _remote_failure()], hostname="relay.example.com",
        original=ORIGINAL, now=NOW, notify=["postmaster@example.com", "ops@example.com"],
    )  # fmt: skip
    assert copy.isascii()
    msg = _parse(copy)
    notified = [a.addr_spec for a in msg["To"].addresses]
    assert notified == ["postmaster@example.com", "ops@example.com"]
    assert msg["Subject"] == "Postmaster Copy: Undelivered Mail"
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, headers = _parts(msg)
    text = " ".join(human.get_payload().split())
    assert "A message from <alice@sender.test> (queue id 0ABC1234)" in text
    assert '<bob@example.com> (route "Split delivery"):' in text
    assert "mx1.corp.example.com [192.0.2.26]: require_ca_signed failed:" in text
    assert "fix: install a certificate issued by a trusted CA on mx1.corp.example.com" in text
    assert "fix: enable STARTTLS on mx2.corp.example.com" in text
    assert (
        "fix: use one of these as the route host: mail.hosting.example, smtp.hosting.example"
        in text
    )
    assert '<carol@example.com> (route "On-prem Exchange"):' in text
    assert "remote_permanent at host mx.corp.example.com [192.0.2.25]: 550 5.1.1" in text
    # The same machine-readable report as the sender's DSN.
    blocks = _status_blocks(status)
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; bob@example.com",
        "rfc822; carol@example.com",
    ]
    assert "Subject: Quarterly report" in headers.get_payload()
    with pytest.raises(ValueError):
        build_postmaster_copy(
            envelope, failures, hostname="h.test", original=b"", now=NOW, notify=[]
        )


def test_expired_dsn_has_status_4_4_7_and_the_last_error() -> None:
    msg = _parse(_build("expired"))
    human, status, _ = _parts(msg)
    (_, block) = _status_blocks(status)
    assert block["Action"] == "failed"
    assert block["Status"] == "4.4.7"
    assert block["Diagnostic-Code"] == "X-Relay; 451 4.4.1 Next hop unreachable"
    # The host the relay kept trying is named, though it never answered.
    assert block["Remote-MTA"] == "dns; mx.corp.example.com"
    text = " ".join(human.get_payload().split())
    assert "gave up" in text
    assert "On-prem Exchange" not in text


def test_expired_with_a_remote_4xx_keeps_it_as_an_smtp_reply() -> None:
    greylisted = Reply(450, (4, 7, 1), "Greylisted, try again later")
    failure = Failure(
        "bob@example.com",
        greylisted,
        BounceReason.EXPIRED,
        remote_mta="mx.corp.example.com [192.0.2.25]",
        status=EXPIRED_STATUS,
        remote=True,
    )
    dsn = build_dsn(_envelope(), [failure], hostname="relay.example.com", original=b"", now=NOW)
    (_, block) = _status_blocks(_parts(_parse(dsn))[1])
    assert block["Diagnostic-Code"] == "smtp; 450 4.7.1 Greylisted, try again later"
    assert block["Remote-MTA"] == "dns; mx.corp.example.com"


def test_local_diagnostic_is_never_labelled_smtp() -> None:
    no_domain = Failure(
        "bob@nowhere.example",
        Reply(550, (5, 1, 2), "Recipient domain does not exist"),
        BounceReason.DNS_PERMANENT,
        remote_mta="nowhere.example",
    )
    dsn = build_dsn(_envelope(), [no_domain], hostname="relay.example.com", original=b"", now=NOW)
    (_, block) = _status_blocks(_parts(_parse(dsn))[1])
    assert block["Diagnostic-Code"] == "X-Relay; 550 5.1.2 Recipient domain does not exist"
    assert "Remote-MTA" not in block


def test_expired_without_any_reply_uses_5_4_7() -> None:
    failure = Failure("bob@example.com", DELIVERY_EXPIRED, BounceReason.EXPIRED)
    dsn = build_dsn(_envelope(), [failure], hostname="relay.example.com", original=b"", now=NOW)
    (_, block) = _status_blocks(_parts(_parse(dsn))[1])
    assert block["Diagnostic-Code"] == "X-Relay; 554 5.4.7 Delivery time expired"
    assert "Remote-MTA" not in block and "Last-Attempt-Date" not in block


def test_internationalised_addresses_use_rfc6533_types() -> None:
    dsn = _build("smtputf8")
    # RFC 6532: the header fields are UTF-8 text.
    msg = email.message_from_string(dsn.decode("utf-8"), policy=email.policy.SMTPUTF8)
    assert isinstance(msg, EmailMessage)
    assert msg["To"].addresses[0].addr_spec == "álvaro@sender.test"
    human, status, headers = _parts(msg)
    assert status.get_content_type() == "message/global-delivery-status"
    assert headers.get_content_type() == "message/global-headers"
    assert "Final-Recipient: utf-8; jürgen@例え.jp" in dsn.decode("utf-8")
    envelope, failures = CASES["smtputf8"]
    assert needs_smtputf8(envelope, failures)
    assert not needs_smtputf8(*CASES["remote_permanent"])


def test_several_failures_are_listed_in_one_report() -> None:
    dsn = build_dsn(
        _envelope(),
        [_remote_failure(), _tls_failure()],
        hostname="relay.example.com",
        original=ORIGINAL,
        now=NOW,
    )
    blocks = _status_blocks(_parts(_parse(dsn))[1])
    assert [b["Final-Recipient"] for b in blocks[1:]] == [
        "rfc822; carol@example.com",
        "rfc822; bob@example.com",
    ]


def test_degenerate_inputs_do_not_break_the_wire_form() -> None:
    long_reply = Reply(550, (5, 0, 0), "x" * 3000 + " tail ü")
    header_line = b"X-Long: " + b"y" * 2500 + b"\r\n"
    original = b"Subject: bare\nlf\rcr \xff\r\n" + header_line + b"\r\nbody"
    failure = Failure("bob@example.com", long_reply, BounceReason.REMOTE_PERMANENT)
    dsn = build_dsn(
        _envelope(), [failure], hostname="relay.example.com", original=original, now=NOW
    )
    assert dsn.isascii()
    lines = dsn.split(b"\r\n")
    assert all(b"\r" not in line and b"\n" not in line for line in lines)
    assert max(len(line) for line in lines) <= 998
    assert "In-Reply-To" not in _parse(dsn)


def test_never_for_the_null_sender_or_without_failures() -> None:
    with pytest.raises(ValueError):
        build_dsn(_envelope(""), [_remote_failure()], hostname="h.test", original=b"", now=NOW)
    with pytest.raises(ValueError):
        build_dsn(_envelope(), [], hostname="h.test", original=b"", now=NOW)


@pytest.mark.parametrize(
    ("results", "reason"),
    [
        ([TlsPolicyFailure(TlsFailure.HANDSHAKE)], BounceReason.TLS_POLICY),
        (
            [TlsPolicyFailure(TlsFailure.HANDSHAKE), TlsPolicyFailure(TlsFailure.EXPIRED)],
            BounceReason.TLS_POLICY,
        ),
        ([NoSuchDomain()], BounceReason.DNS_PERMANENT),
        ([NullMx()], BounceReason.DNS_PERMANENT),
        ([USER_UNKNOWN], BounceReason.REMOTE_PERMANENT),
        ([RemotePermanent("x", USER_UNKNOWN)], BounceReason.REMOTE_PERMANENT),
        (
            [TlsPolicyFailure(TlsFailure.HANDSHAKE), USER_UNKNOWN],
            BounceReason.REMOTE_PERMANENT,
        ),
        # degenerate: nothing at all, or a temporary result, is not TLS
        ([], BounceReason.REMOTE_PERMANENT),
        ([RemoteTemporary("x", Reply(451, (4, 0, 0), "later"))], BounceReason.REMOTE_PERMANENT),
    ],
)
def test_reason_for(results, reason) -> None:
    assert reason_for(results) is reason


def test_reasons_are_the_metric_labels() -> None:
    from relay.metrics import BOUNCE_REASONS

    assert sorted(r.value for r in BounceReason) == sorted(BOUNCE_REASONS)
