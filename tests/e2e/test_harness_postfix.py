"""The Postfix/swaks harness works on its own, with real traffic and no relay.

These pin down what later relay scenarios rely on: mail swaks sends to a
downstream instance lands in its maildir (plain and STARTTLS with the test
CA), a downstream can be stopped and started again, and an upstream
instance forwards injected mail to whatever listens on its relayhost port.
"""

from __future__ import annotations

import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session

from tests.support.pki import Pki
from tests.support.postfix import PostfixFactory
from tests.support.procs import free_port, port_open, swaks
from tests.support.wait import blocking_until


@dataclass
class Sink:
    """aiosmtpd handler that keeps every envelope it accepts."""

    envelopes: list[Envelope] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            self.envelopes.append(envelope)
        return "250 2.0.0 sunk"

    def wait(self, count: int, timeout: float = 15.0) -> list[Envelope]:
        def enough() -> list[Envelope] | None:
            with self.lock:
                return list(self.envelopes) if len(self.envelopes) >= count else None

        return blocking_until(enough, timeout, what=f"{count} envelope(s) at the sink")


@pytest.fixture
def sink() -> Iterator[tuple[Sink, int]]:
    handler = Sink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


@pytest.fixture
def tls_sink(e2e_ca: Pki) -> Iterator[tuple[Sink, int]]:
    """A sink offering STARTTLS with a certificate for relay.test from the test CA."""
    files = e2e_ca.issue("relay.test", stem="sink")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.cert, files.key)
    handler = Sink()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port, tls_context=context)
    controller.start()
    try:
        yield handler, port
    finally:
        controller.stop()


def test_swaks_to_downstream_plain_lands_in_maildir(postfix: PostfixFactory) -> None:
    down = postfix.downstream(domains=("example.org", "example.net"))
    done = swaks(
        "--server", f"127.0.0.1:{down.port}",
        "--from", "alice@sender.test",
        "--to", "bob@example.org,carol@example.net",
        "--header", "Subject: plain hello",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout
    messages = down.wait_messages(2)
    assert {str(m["Delivered-To"]) for m in messages} == {"bob@example.org", "carol@example.net"}
    assert all(str(m["Subject"]) == "plain hello" for m in messages)
    assert str(messages[0]["Return-Path"]) == "<alice@sender.test>"
    assert len(down.messages("bob@example.org")) == 1


def test_swaks_body_file_and_data_file(postfix: PostfixFactory, tmp_path: Path) -> None:
    """The README's swaks one-liners with --body @file and --data @file."""
    down = postfix.downstream()
    body = tmp_path / "body.txt"
    body.write_text("line one\nline two\n")
    eml = tmp_path / "message.eml"
    eml.write_text("From: a@sender.test\nTo: bob@example.org\nSubject: whole file\n\nfrom eml\n")
    server = ("--server", f"127.0.0.1:{down.port}", "--to", "bob@example.org")
    assert swaks(*server, "--header", "Subject: report", "--body", f"@{body}").returncode == 0
    assert swaks(*server, "--data", f"@{eml}").returncode == 0
    first, second = down.wait_messages(2)
    assert str(first["Subject"]) == "report"
    assert first.get_content().rstrip("\n") == "line one\nline two"
    assert str(second["Subject"]) == "whole file"
    assert second.get_content().rstrip("\n") == "from eml"


def test_swaks_starttls_to_downstream_with_test_ca(postfix: PostfixFactory, e2e_ca: Pki) -> None:
    down = postfix.downstream(tls=e2e_ca.issue("mx.example.org"), tls_level="encrypt")
    base = ("--server", f"127.0.0.1:{down.port}", "--to", "bob@example.org")
    # The server requires STARTTLS: plaintext mail is refused at MAIL FROM.
    refused = swaks(*base)
    assert refused.returncode != 0
    assert "530 5.7.0 Must issue a STARTTLS command first" in refused.stdout
    done = swaks(*base, "--tls", "--tls-verify", "--tls-ca-path", str(e2e_ca.ca_file))
    assert done.returncode == 0, done.stdout
    assert "TLS started" in done.stdout
    (message,) = down.wait_messages(1)
    assert "with ESMTPS" in str(message["Received"])
    down.wait_log(r"Anonymous TLS connection established from localhost\[127\.0\.0\.1\]")


def rcpt(server: tuple[str, ...], address: str) -> str:
    """swaks' transcript for one message to ``address``."""
    return swaks(*server, "--to", address).stdout


def test_downstream_rejects_foreign_domains_and_scripted_recipients(
    postfix: PostfixFactory,
) -> None:
    down = postfix.downstream(
        recipient_replies={
            "gone@example.org": "550 5.1.1 no such user",
            "busy@example.org": "450 4.2.1 try again later",
        }
    )
    server = ("--server", f"127.0.0.1:{down.port}")
    # Postfix puts "<address>: Recipient address rejected:" before the table's text.
    assert re.search(r"554 5\.7\.1 .*Relay access denied", rcpt(server, "x@elsewhere.test"))
    assert re.search(r"550 5\.1\.1 .*no such user", rcpt(server, "gone@example.org"))
    assert re.search(r"450 4\.2\.1 .*try again later", rcpt(server, "busy@example.org"))
    assert down.messages() == []


def test_downstream_stop_and_start_again(postfix: PostfixFactory) -> None:
    down = postfix.downstream()
    server = ("--server", f"127.0.0.1:{down.port}")
    assert swaks(*server, "--to", "first@example.org").returncode == 0
    down.wait_messages(1)
    down.stop()
    assert not down.running
    assert not port_open("127.0.0.1", down.port)
    assert swaks(*server, "--to", "second@example.org").returncode != 0
    down.start()
    assert swaks(*server, "--to", "third@example.org").returncode == 0
    messages = down.wait_messages(2)
    assert [str(m["Delivered-To"]) for m in messages] == ["first@example.org", "third@example.org"]


def test_upstream_forwards_sendmail_and_smtp_to_sink(
    postfix: PostfixFactory, sink: tuple[Sink, int]
) -> None:
    handler, sink_port = sink
    up = postfix.upstream(relay_port=sink_port, tls_level="none")
    up.submit(
        b"Subject: via sendmail\r\n\r\nhello from pickup\r\n",
        "alice@up.test",
        ["bob@example.org", "carol@example.org"],
    )
    swaks("--server", f"127.0.0.1:{up.port}", "--from", "dave@up.test", "--to", "erin@example.com")
    envelopes = handler.wait(2)
    by_sender = {e.mail_from: e for e in envelopes}
    assert sorted(by_sender["alice@up.test"].rcpt_tos) == ["bob@example.org", "carol@example.org"]
    assert b"hello from pickup" in (by_sender["alice@up.test"].content or b"")
    assert by_sender["dave@up.test"].rcpt_tos == ["erin@example.com"]
    blocking_until(lambda: not up.queued(), 10, what="upstream queue to drain")


def test_upstream_verifies_sink_certificate(
    postfix: PostfixFactory, e2e_ca: Pki, tls_sink: tuple[Sink, int]
) -> None:
    handler, sink_port = tls_sink
    up = postfix.upstream(
        relay_port=sink_port, tls_level="secure", ca_file=e2e_ca.ca_file, tls_match="relay.test"
    )
    up.submit(b"Subject: secure\r\n\r\nbody\r\n", "alice@up.test", ["bob@example.org"])
    (envelope,) = handler.wait(1)
    assert envelope.rcpt_tos == ["bob@example.org"]
    up.wait_log(rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{sink_port}")


def test_upstream_defers_while_next_hop_is_down_then_delivers(postfix: PostfixFactory) -> None:
    down = postfix.downstream()
    up = postfix.upstream(relay_port=down.port, tls_level="may")
    down.stop()
    up.submit(b"Subject: later\r\n\r\nqueued\r\n", "alice@up.test", ["bob@example.org"])
    up.wait_log(
        r"status=deferred \(connect to 127\.0\.0\.1\[127\.0\.0\.1\]:\d+: Connection refused"
    )
    assert len(up.queued()) == 1
    down.start()
    up.flush()
    (message,) = down.wait_messages(1)
    assert str(message["Subject"]) == "later"


def test_three_hop_chain_with_tls_on_both_hops(postfix: PostfixFactory, e2e_ca: Pki) -> None:
    """The shape of the relay scenarios, with a Postfix standing in for relay."""
    down = postfix.downstream(tls=e2e_ca.issue("127.0.0.1", stem="down"), tls_level="encrypt")
    middle_cert = e2e_ca.issue("relay.test", stem="middle")
    middle = postfix.upstream(
        relay_port=down.port,
        name="middle",
        tls_level="encrypt",
        settings={
            "smtpd_tls_cert_file": str(middle_cert.cert),
            "smtpd_tls_key_file": str(middle_cert.key),
            "smtpd_tls_security_level": "may",
        },
    )
    up = postfix.upstream(
        relay_port=middle.port, tls_level="secure", ca_file=e2e_ca.ca_file, tls_match="relay.test"
    )
    up.submit(b"Subject: chain\r\n\r\nthree hops\r\n", "alice@up.test", ["bob@example.org"])
    (message,) = down.wait_messages(1)
    assert str(message["Return-Path"]) == "<alice@up.test>"
    received = [str(h) for h in message.get_all("Received", [])]
    assert len(received) >= 3 and all("with ESMTPS" in h for h in received[:2])
    up.wait_log(
        rf"Verified TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{middle.port}"
    )
    middle.wait_log(rf"TLS connection established to 127\.0\.0\.1\[127\.0\.0\.1\]:{down.port}")
