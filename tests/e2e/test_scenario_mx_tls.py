"""Scenarios with MX lookup through a real DNS server (dnsmasq) and verified TLS.

dnsmasq on a loopback high port serves (names under .test, RFC 2606):

    good.test    MX 10 mx.good.test     mx.good.test    A 127.0.0.1
    wrong.test   MX 10 mx.wrong.test    mx.wrong.test   A 127.0.0.1
    sender.test  MX 10 mx.sender.test   mx.sender.test  A 127.0.0.1

Three downstream Postfix instances stand behind them: ``good`` (STARTTLS,
certificate for mx.good.test), ``wrong`` (STARTTLS, certificate for
another.test: the wrong name) and ``senders`` (plain, accepts sender.test:
where DSNs land). The relay routes each domain with ``mx_lookup = true``
on the port of that domain's Postfix; the ``good`` and ``wrong`` routes
require TLS + CA + hostname. Bounces follow the rule that matches the
sender's address (docs/queue.md "How a DSN travels"), so the DSN goes to
sender.test's MX as well.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.support import configs
from tests.support.dnsserver import dnsmasq_servers
from tests.support.pki import Pki
from tests.support.postfix import DownstreamServer, PostfixFactory
from tests.support.procs import RelayProcess, relay_config, swaks


@dataclass
class MxSetup:
    good: DownstreamServer
    wrong: DownstreamServer
    senders: DownstreamServer
    relay: RelayProcess


@pytest.fixture(scope="module")
def mx_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MxSetup]:
    tmp = tmp_path_factory.mktemp("mx")
    ca = Pki(tmp / "pki")
    with PostfixFactory(keep_logs_in=tmp / "postfix-logs") as postfix, dnsmasq_servers() as dns:
        server = dns(
            hosts={f"mx.{d}.test": ["127.0.0.1"] for d in ("good", "wrong", "sender")},
            mx={f"{d}.test": [(10, f"mx.{d}.test")] for d in ("good", "wrong", "sender")},
        )
        good = postfix.downstream(
            "good", domains=["good.test"], tls=ca.issue("mx.good.test"), tls_level="encrypt"
        )
        wrong = postfix.downstream(
            "wrong", domains=["wrong.test"], tls=ca.issue("another.test"), tls_level="encrypt"
        )
        senders = postfix.downstream("senders", domains=["sender.test"])
        routes = [
            configs.route(
                "Good", "good.test", good.port, mx_lookup=True, **configs.TLS_LEVELS["full"]
            ),
            configs.route(
                "Wrong", "wrong.test", wrong.port, mx_lookup=True, **configs.TLS_LEVELS["full"]
            ),
            configs.route("Senders", "sender.test", senders.port, mx_lookup=True),
        ]
        rules = [
            configs.rule("Good", "@good.test"),
            configs.rule("Wrong", "@wrong.test"),
            configs.rule("Senders", "@sender.test"),
        ]
        config = relay_config(
            tmp,
            "".join(routes),
            "".join(rules),
            domains=("good.test", "wrong.test", "sender.test"),
            tls={"ca_file": str(ca.ca_file)},
            dns={"nameservers": [f"{server.ip}:{server.port}"], "timeout": "2s"},
        )
        with RelayProcess(config) as proc:
            yield MxSetup(good, wrong, senders, proc)


def send(relay: RelayProcess, sender: str, recipient: str, subject: str) -> None:
    sent = swaks(
        "--server", f"127.0.0.1:{relay.port}", "--from", sender, "--to", recipient,
        "--header", f"Subject: {subject}",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout


def test_mx_route_with_full_tls_delivers_to_mx_host(mx_setup: MxSetup) -> None:
    send(mx_setup.relay, "alice@sender.test", "bob@good.test", "via MX")

    (message,) = mx_setup.good.wait_messages(1, timeout=20, recipient="bob@good.test")
    assert str(message["Subject"]) == "via MX"
    # Delivered to the MX host by name, TLS verified against that name.
    line = mx_setup.relay.wait_for_stderr("host=mx.good.test", timeout=10)
    assert "event=attempt" in line, line
    assert "verified=True" in line, line
    assert "result=delivered" in line, line
    mx_setup.good.wait_log(r"TLS connection established from localhost\[127\.0\.0\.1\]")


def test_wrong_name_certificate_bounces_to_sender_domain(mx_setup: MxSetup) -> None:
    send(mx_setup.relay, "alice@sender.test", "carol@wrong.test", "wrong name")

    (dsn,) = mx_setup.senders.wait_messages(1, timeout=20, recipient="alice@sender.test")
    assert str(dsn["Return-Path"]) == "<>"
    assert dsn.get_content_type() == "multipart/report"
    assert dsn.get_param("report-type") == "delivery-status"
    text, status, headers = dsn.iter_parts()
    explanation = text.get_content()
    assert "carol@wrong.test" in explanation
    # The sender reads the host and what happened in plain words, no option names ...
    words = " ".join(explanation.split())
    assert "mx.wrong.test [127.0.0.1]: its security certificate is for a different name" in words
    assert "validate_hostname" not in words and "Wrong" not in words
    fields = status.as_string()
    assert re.search(r"Final-Recipient: rfc822;\s*carol@wrong\.test", fields), fields
    assert re.search(r"Status: 5\.7\.5", fields), fields
    # ... the postmaster the host, the check, the names Postfix's certificate carries.
    assert re.search(r"Remote-MTA: dns;\s*mx\.wrong\.test", fields), fields
    diagnosis = " ".join(fields.split())
    assert "X-Relay-Route: Wrong" in diagnosis
    assert "mx.wrong.test [127.0.0.1]: validate_hostname failed:" in diagnosis
    # An MX host's name comes from DNS: no "use it as the route host" advice.
    assert "the certificate of mx.wrong.test (MX of wrong.test) does not name" in diagnosis
    assert "it names: another.test" in diagnosis
    assert "fix: install a certificate on mx.wrong.test that names mx.wrong.test" in diagnosis
    assert "or point the MX record of wrong.test to a name the certificate carries" in diagnosis
    assert "route host" not in diagnosis
    assert "Subject: wrong name" in headers.as_string()

    bounced = mx_setup.relay.wait_for_stderr("event=bounced", timeout=5)
    assert "reason=tls_policy" in bounced, bounced
    attempt = mx_setup.relay.wait_for_stderr("host=mx.wrong.test", timeout=5)
    assert "result=tls_failed" in attempt, attempt
    assert "tls=failed" in attempt and "tls_check=certificate-host-mismatch" in attempt, attempt
    # Nothing reached the wrong-name host's mailbox: the handshake was the last step.
    assert mx_setup.wrong.messages() == []
    assert not mx_setup.wrong.maillog().count("status=sent")


def test_one_message_two_routes_delivers_one_and_bounces_the_other(mx_setup: MxSetup) -> None:
    """The good route delivers; the DSN lists only the recipient behind the wrong name."""
    sent = swaks(
        "--server", f"127.0.0.1:{mx_setup.relay.port}", "--from", "erin@sender.test",
        "--to", "frank@good.test,grace@wrong.test", "--header", "Subject: split",
    )  # fmt: skip
    assert sent.returncode == 0, sent.stdout

    (message,) = mx_setup.good.wait_messages(1, timeout=20, recipient="frank@good.test")
    assert str(message["Subject"]) == "split"
    (dsn,) = mx_setup.senders.wait_messages(1, timeout=20, recipient="erin@sender.test")
    _, status, _ = dsn.iter_parts()
    fields = status.as_string()
    assert "grace@wrong.test" in fields, fields
    assert "frank@good.test" not in fields, fields
    assert mx_setup.wrong.messages() == []
