"""Pure parts of inbound: RFC 5321 paths, recipient policy, message checks, Received."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import errors
from relay.addresses import AddressError, parse_path, valid_helo
from relay.content import check_message, has_bare_line_ending, protocol_keyword, received_header
from relay.relaying import recipient_reply
from tests.support.inbound import make_config

VALID_PATHS = [
    ("<user@example.com>", "user@example.com", ""),
    ("<user@example.com> SIZE=100 BODY=8BITMIME", "user@example.com", "SIZE=100 BODY=8BITMIME"),
    ("<>", "<>", ""),
    ("<first.last+tag@sub.example.com>", "first.last+tag@sub.example.com", ""),
    ("<user%other.test@example.com>", "user%other.test@example.com", ""),
    ("<other.test!user@example.com>", "other.test!user@example.com", ""),
    ('<"user@other.test"@example.com>', '"user@other.test"@example.com', ""),
    ('<"john smith"@example.com>', '"john smith"@example.com', ""),
    ('<"a\\"b"@example.com>', '"a\\"b"@example.com', ""),
    ("<user@[192.0.2.1]>", "user@[192.0.2.1]", ""),
    ("<user@[IPv6:2001:db8::1]>", "user@[IPv6:2001:db8::1]", ""),
    # Source route: checked, then dropped (RFC 5321 section 3.6.1).
    ("<@example.com:user@other.test>", "user@other.test", ""),
    ("<@a.test,@b.test:user@other.test>", "user@other.test", ""),
    ("<用户@example.com> SMTPUTF8", "用户@example.com", "SMTPUTF8"),
    ("<user@bücher.example>", "user@bücher.example", ""),
]


@pytest.mark.parametrize(("arg", "mailbox", "rest"), VALID_PATHS)
def test_parse_path_valid(arg: str, mailbox: str, rest: str) -> None:
    assert parse_path(arg) == (mailbox, rest)


INVALID_PATHS = [
    "user@example.com",  # no angle brackets
    "<user@example.com",  # unterminated
    "<user@other.test@example.com>",  # two @ outside quotes
    "<user>",  # no domain
    "<@example.com>",
    "<user@>",
    "<.user@example.com>",
    "<user.@example.com>",
    "<us..er@example.com>",
    "<user@-example.com>",
    "<user@example..com>",
    "<user@example.com.>",
    "<user@[300.1.1.1]>",
    "<user@[IPv6:zz::1]>",
    "<user@[tag:general]>",
    "<user name@example.com>",
    "<user(comment)@example.com>",
    "<user@example.com>junk",
    "<@example.com user@other.test>",  # route without ':'
    "<@-bad.test:user@example.com>",
    '<"unterminated@example.com>',
    '<"a"b@example.com>',
    # Control characters, quoted or not: never into the spool or the next hop.
    "<user\r@example.com>",
    "<user\n@example.com>",
    "<user\x00@example.com>",
    '<"user\r\nX-Injected: 1"@example.com>',
    '<"user\\\r"@example.com>',
    '<"a\x00b"@example.com>',
    "<user@exa\rmple.com>",
    "<user@example.com> SIZE=1\rRCPT",
    "<user@example.com>\x00",
    "<user\udcff@example.com>",  # invalid UTF-8 (surrogateescape)
    "<user\x85@example.com>",  # C1 control
]


@pytest.mark.parametrize("arg", INVALID_PATHS)
def test_parse_path_invalid(arg: str) -> None:
    with pytest.raises(AddressError):
        parse_path(arg)


@pytest.mark.parametrize(
    ("client", "rcpt", "reply"),
    [
        ("192.0.2.9", "user@example.com", errors.RECIPIENT_OK),
        ("192.0.2.9", "USER@Example.COM", errors.RECIPIENT_OK),
        ("192.0.2.9", "known@example.net", errors.RECIPIENT_OK),
        ("192.0.2.9", "other@example.net", errors.NO_ROUTE),
        ("192.0.2.9", "user@other.test", errors.RELAYING_DENIED),
        ("192.0.2.9", "user@sub.example.com", errors.RELAYING_DENIED),
        ("127.0.0.1", "user@other.test", errors.RECIPIENT_OK),
        ("::ffff:127.0.0.1", "user@other.test", errors.RECIPIENT_OK),
        # A served domain no rule routes: refused for trusted clients too
        # (its MX is this relay; the direct route would loop).
        ("127.0.0.1", "other@example.net", errors.NO_ROUTE),
        # The open-relay tricks: refused unless the client may relay (the
        # next hop might route by them), or judged by the real domain.
        ("192.0.2.9", "user%other.test@example.com", errors.ROUTING_CHARACTERS),
        ("192.0.2.9", "other.test!user@example.com", errors.ROUTING_CHARACTERS),
        ("192.0.2.9", '"user@other.test"@example.com', errors.ROUTING_CHARACTERS),
        ("127.0.0.1", "user%other.test@example.com", errors.RECIPIENT_OK),
        ("192.0.2.9", "user%example.com@other.test", errors.RELAYING_DENIED),
        ("192.0.2.9", '"user@example.com"@other.test', errors.RELAYING_DENIED),
        ("192.0.2.9", "user@[192.0.2.1]", errors.RELAYING_DENIED),
        ("127.0.0.1", "user@[192.0.2.1]", errors.RELAYING_DENIED),
    ],
)
def test_recipient_policy(tmp_path: Path, client: str, rcpt: str, reply: errors.Reply) -> None:
    extra = 'relay_networks = ["127.0.0.0/8"]'
    cfg = make_config(tmp_path, extra_server=extra)
    assert recipient_reply(cfg, client, rcpt) == reply


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("mail.example.com", True),
        ("localhost", True),
        ("WIN_HOST", True),
        ("[192.0.2.1]", True),
        ("[IPv6:2001:db8::1]", True),
        ("host\rX-Injected: 1", False),
        ("host\x00", False),
        ("two words", False),
        ("host(comment)", False),
        ("bücher.example", False),
        ("a" * 256, False),
    ],
)
def test_valid_helo(name: str, ok: bool) -> None:
    assert valid_helo(name) is ok


MSG = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (MSG, None),
        (b"", None),
        (b"\r\nbody only\r\n", None),
        (b"Subject: headers only\r\n", None),
        (b"Subject: folded\r\n continued\r\n\r\nx\r\n", None),
        (MSG + b"bare\nLF\r\n", errors.BARE_LINE_ENDING),
        (MSG + b"bare\rCR\r\n", errors.BARE_LINE_ENDING),
        (MSG + b"end\n.\nMAIL FROM:<x@y>\r\n", errors.BARE_LINE_ENDING),
        (MSG + b"end\r\n.\nMAIL FROM:<x@y>\r\n", errors.BARE_LINE_ENDING),
        (MSG + b"end\n.\r\nMAIL FROM:<x@y>\r\n", errors.BARE_LINE_ENDING),
        (MSG + b"end\r.\r\nMAIL FROM:<x@y>\r\n", errors.BARE_LINE_ENDING),
        (b"Subject: x\nX-Injected: 1\r\n\r\n", errors.BARE_LINE_ENDING),
        (MSG + b"nul\x00\r\n", errors.NUL_IN_MESSAGE),
        (b" leading continuation\r\nSubject: x\r\n\r\n", errors.BAD_HEADER),
        (b"no colon here\r\n\r\nbody\r\n", errors.BAD_HEADER),
        (b"Bad Name: x\r\n\r\n", errors.BAD_HEADER),
        (b": empty name\r\n\r\n", errors.BAD_HEADER),
        (b"Received: x\r\n" * 30 + b"\r\nbody\r\n", None),
        (b"Received: x\r\n" * 31 + b"\r\nbody\r\n", errors.LOOP_DETECTED),
        (b"received: x\r\n" * 31 + b"\r\n", errors.LOOP_DETECTED),
        # Received lines in the body are not trace headers.
        (b"Subject: x\r\n\r\n" + b"Received: x\r\n" * 40, None),
    ],
)
def test_check_message(content: bytes, expected: errors.Reply | None) -> None:
    result = check_message(content)
    assert (result[0] if result else None) == expected


def test_bare_line_ending_counts() -> None:
    assert not has_bare_line_ending(b"a\r\nb\r\n")
    assert has_bare_line_ending(b"a\r\r\n")
    assert has_bare_line_ending(b"a\n\r\n")


@pytest.mark.parametrize(
    ("esmtp", "tls", "utf8", "keyword"),
    [
        (False, False, False, "SMTP"),
        (True, False, False, "ESMTP"),
        (True, True, False, "ESMTPS"),
        (True, False, True, "UTF8SMTP"),
        (True, True, True, "UTF8SMTPS"),
    ],
)
def test_protocol_keyword(esmtp: bool, tls: bool, utf8: bool, keyword: str) -> None:
    assert protocol_keyword(esmtp, tls, utf8) == keyword


def test_received_header_single_recipient() -> None:
    header = received_header(
        helo="client.test",
        client_ip="192.0.2.7",
        hostname="relay.test",
        protocol="ESMTPS",
        queue_id="QID1",
        recipients=["user@example.com"],
        when=0.0,
        cipher=("TLS_AES_256_GCM_SHA384", "TLSv1.3", 256),
    )
    assert header == (
        b"Received: from client.test (unknown [192.0.2.7])\r\n"
        b"\tby relay.test (relay) with ESMTPS"
        b" (using TLSv1.3 with cipher TLS_AES_256_GCM_SHA384 (256 bits))\r\n"
        b"\tid QID1\r\n"
        b"\tfor <user@example.com>; Thu, 01 Jan 1970 00:00:00 +0000\r\n"
    )


def test_received_header_many_recipients_and_ipv6() -> None:
    header = received_header(
        helo="[IPv6:::1]",
        client_ip="::1",
        hostname="relay.test",
        protocol="ESMTP",
        queue_id="QID2",
        recipients=["a@example.com", "b@example.com"],
        when=0.0,
    )
    assert b"for" not in header
    assert b"(unknown [IPv6:::1])" in header
    assert b"id QID2; Thu, 01 Jan 1970" in header
