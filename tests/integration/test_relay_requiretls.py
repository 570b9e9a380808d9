"""REQUIRETLS and TLS-Required: No (RFC 8689), end to end with real peers.

Inbound: the EHLO keyword only on a TLS session, MAIL FROM REQUIRETLS
refused without TLS, the flags spooled. Delivery: a REQUIRETLS message
goes only over verified TLS to a next hop that offers REQUIRETLS, whatever
the route says, else it bounces (5.7.30) with a DSN of headers only, sent
with REQUIRETLS itself; a TLS-Required: No message goes even where the
route's TLS policy fails.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import aiosmtplib
import pytest

from relay import keeper, tls
from relay.config import Config
from relay.configload import load
from relay.content import MessageCheck
from relay.envelope import Envelope, Recipient
from relay.hop import Hop
from relay.routing import Candidate
from relay.spoolfiles import new_id
from tests.support import configs
from tests.support.inbound import RawClient, make_config, running_inbound
from tests.support.integ import BODY, SENDER, InProcessRelay, dsn_parts, idle, integration_toml
from tests.support.pki import Pki
from tests.support.sink import Sink
from tests.support.wait import until

RULES = configs.rule("Corp", "@corp.test") + configs.rule("Senders", "@sender.test")
HOSTS = {"mx1.corp.test": ["127.0.0.1"], "mx.sender.test": ["127.0.0.1"]}
MX = {"sender.test": [(10, "mx.sender.test")]}
ALL_CHECKS = {"require_tls": True, "require_ca_signed": True, "validate_hostname": True}


# --- inbound ------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
def tls_config(tmp_path: Path, pki: Pki) -> Config:
    files = pki.issue("relay.test", stem="relay")
    extra = f'tls_cert = "{files[0]}"\ntls_key = "{files[1]}"'
    return make_config(tmp_path, extra_server=extra)


def _client_context(pki: Pki) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(pki.ca_file))


async def test_requiretls_offered_and_taken_only_over_tls(tls_config: Config, pki: Pki) -> None:
    context = keeper.server_tls_context(tls_config)
    async with running_inbound(tls_config, tls_context=context) as h:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=h.port, start_tls=False, local_hostname="client.test"
        )
        await smtp.connect()
        await smtp.ehlo()
        assert smtp.supports_extension("starttls")
        # RFC 8689 section 2: not before STARTTLS ...
        assert not smtp.supports_extension("requiretls")
        await smtp.starttls(server_hostname="relay.test", tls_context=_client_context(pki))
        await smtp.ehlo()
        # ... and after it.
        assert smtp.supports_extension("requiretls")
        message = b"Subject: secret\r\nTLS-Required: No\r\n\r\nbody\r\n"
        options = ["REQUIRETLS"]
        await smtp.sendmail("s@example.org", ["user@example.com"], message, mail_options=options)
        await smtp.quit()
    [envelope] = h.spooled()
    assert envelope.requiretls
    # RFC 8689 section 4.1: REQUIRETLS outranks the header.
    assert not envelope.tls_optional


async def test_requiretls_refused_without_tls(tls_config: Config) -> None:
    context = keeper.server_tls_context(tls_config)
    async with running_inbound(tls_config, tls_context=context) as h:
        async with await RawClient.connect(h.port) as client:
            code, text = await client.cmd("EHLO client.test")
            assert code == 250 and "REQUIRETLS" not in text
            code, text = await client.cmd("MAIL FROM:<s@example.org> REQUIRETLS")
            assert (code, text[4:10]) == (530, "5.7.10")
            # Not a RCPT parameter; a value is a syntax error.
            assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
            assert (await client.cmd("RCPT TO:<user@example.com> REQUIRETLS"))[0] == 555
        async with await RawClient.connect(h.port) as client:
            await client.cmd("EHLO client.test")
            assert (await client.cmd("MAIL FROM:<s@example.org> REQUIRETLS=YES"))[0] == 501
    assert h.spooled() == []


async def test_tls_required_no_spooled(tmp_path: Path) -> None:
    async with running_inbound(make_config(tmp_path)) as h:
        client = await RawClient.connect(h.port)
        await client.start_data()
        await client.send(b"Subject: hi\r\nTLS-Required:  no\r\n\r\nbody\r\n.\r\n")
        assert (await client.reply())[0] == 250
        await client.close()
    [envelope] = h.spooled()
    assert envelope.tls_optional and not envelope.requiretls


def test_header_check_and_old_envelopes() -> None:
    check = MessageCheck()
    check.feed(b"Subject: x\r\nX-TLS-Required: No\r\n\r\nTLS-Required: No\r\n")
    assert not check.tls_optional  # another field, then the body
    old = {"id": "q1", "mail_from": "a@b.test", "recipients": [{"address": "c@d.test"}]}
    envelope = Envelope.from_json(old)
    assert not envelope.requiretls and not envelope.tls_optional
    flagged = Envelope("q2", "a@b.test", [Recipient("c@d.test")], requiretls=True)
    assert Envelope.loads(flagged.dumps()).requiretls


# --- delivery -----------------------------------------------------------------


def _put(relay: InProcessRelay, **flags: bool) -> Envelope:
    now = time.time()
    envelope = Envelope(
        new_id(), SENDER, [Recipient("bob@corp.test")], received_at=now, next_attempt=now,
        **flags,
    )  # fmt: skip
    relay.spool.put(envelope, BODY)
    relay.scheduler.add(envelope)
    return envelope


async def _deliver(
    tmp_path: Path,
    dnsmasq: Any,
    pki: Pki,
    corp: Sink,
    dsn: Sink,
    *flags: dict[str, bool],
    notify: Sequence[str] = (),
    **tls: bool,
) -> None:
    """Spool one message per ``flags`` (Envelope fields) for bob@corp.test and
    wait until each went to ``corp`` or its DSN to ``dsn`` (and the postmaster
    copy to ``notify``, at ``dsn`` too); ``tls``: Corp's policy."""
    server = dnsmasq(hosts=HOSTS, mx=MX)
    routes = configs.route("Corp", "mx1.corp.test", corp.port, **tls)
    routes += configs.route("Senders", "sender.test", dsn.port, mx_lookup=True)
    toml = integration_toml(tmp_path, server, routes, RULES, ca_file=pki.ca_file, notify=notify)
    per = 2 if notify else 1
    async with InProcessRelay(tmp_path, toml) as relay:
        for done, one in enumerate(flags, 1):
            _put(relay, **one)
            await until(lambda n=done: len(corp.messages) + len(dsn.messages) == n * per)  # type: ignore[misc]
            await idle(relay)
        assert relay.spooled() == []


def _dsn_sink(pki: Pki) -> Sink:
    # DSNs on REQUIRETLS messages go with REQUIRETLS: this MX takes them.
    return Sink(tls_context=pki.server_context("mx.sender.test"), requiretls=True)


def _mails(sink: Sink) -> int:
    return sum(line.startswith("MAIL") for line in sink.lines)


@pytest.mark.parametrize(
    "corp_sink",
    [
        pytest.param(lambda pki: Sink(), id="no-starttls"),
        pytest.param(
            lambda pki: Sink(tls_context=pki.server_context("mx1.corp.test")), id="no-requiretls"
        ),
    ],
)
async def test_requiretls_bounces_530_never_plaintext(tmp_path, dnsmasq, pki, corp_sink) -> None:
    async with corp_sink(pki) as corp, _dsn_sink(pki) as dsn:
        # The route asks for no TLS at all: REQUIRETLS asks for it anyway.
        await _deliver(tmp_path, dnsmasq, pki, corp, dsn, {"requiretls": True})
    assert corp.messages == [] and _mails(corp) == 0
    [report] = dsn.messages
    assert "REQUIRETLS" in report.mail_options and report.tls is not None
    message, human, [fields] = dsn_parts(report.data)
    assert fields["status"] == "5.7.30"
    # RFC 8689 section 5: the original's headers, never its body.
    headers = list(message.iter_parts())[2]
    assert headers.get_content_type() == "text/rfc822-headers"
    assert b"Subject: integration" in report.data
    assert b"starts with a dot" not in report.data and b"last line" not in report.data


async def test_requiretls_postmaster_copy_names_the_sender_not_the_route(
    tmp_path, dnsmasq, pki
) -> None:
    # The route's options are not the fix: the sender asked for REQUIRETLS.
    plain = Sink(tls_context=pki.server_context("mx1.corp.test"))
    async with plain as corp, _dsn_sink(pki) as dsn:
        flags = {"requiretls": True}
        await _deliver(tmp_path, dnsmasq, pki, corp, dsn, flags, notify=["postmaster@sender.test"])
    [copy] = [m for m in dsn.messages if m.rcpt_tos == ["postmaster@sender.test"]]
    text = " ".join(copy.data.decode().split())
    assert "mx1.corp.test does not offer REQUIRETLS after STARTTLS, which the sender" in text
    assert "or ask the sender to send without REQUIRETLS" in text
    assert "= false" not in text


async def test_requiretls_delivered_with_requiretls(tmp_path, dnsmasq, pki) -> None:
    good = Sink(tls_context=pki.server_context("mx1.corp.test"), requiretls=True)
    async with good as corp, _dsn_sink(pki) as dsn:
        await _deliver(tmp_path, dnsmasq, pki, corp, dsn, {"requiretls": True})
    [delivered] = corp.messages
    assert "REQUIRETLS" in delivered.mail_options and delivered.tls is not None
    assert dsn.messages == []


async def test_requiretls_needs_verified_certificate(tmp_path, dnsmasq, pki) -> None:
    # Offers REQUIRETLS, but under a name other than the one delivered to.
    other = Sink(tls_context=pki.server_context("other.test"), requiretls=True)
    async with other as corp, _dsn_sink(pki) as dsn:
        await _deliver(tmp_path, dnsmasq, pki, corp, dsn, {"requiretls": True})
    assert corp.messages == [] and _mails(corp) == 0
    _, _, [fields] = dsn_parts(dsn.messages[0].data)
    assert fields["status"] == "5.7.5"


async def test_tls_required_no_waives_the_route_policy(tmp_path, dnsmasq, pki) -> None:
    expired = Sink(tls_context=pki.server_context("mx1.corp.test", expired=True))
    async with expired as corp, Sink() as dsn:
        # Then, without the header, the same route bounces it (the policy holds).
        await _deliver(tmp_path, dnsmasq, pki, corp, dsn, {"tls_optional": True}, {}, **ALL_CHECKS)
    assert len(dsn.messages) == 1
    [delivered] = corp.messages
    assert delivered.tls is not None  # STARTTLS still tried, as opportunistic TLS
    assert "REQUIRETLS" not in delivered.mail_options


def test_message_policy_over_an_mta_sts_policy(tmp_path: Path) -> None:
    """REQUIRETLS tightens and ``TLS-Required: No`` waives an MTA-STS
    ``enforce`` policy as they do a route's (RFC 8689 section 5)."""
    route = tmp_path / "relay.toml"
    routes = configs.route("open", "mx.example.net", mx_lookup=True)
    route.write_text(configs.relay_toml({"server": {"domains": ["example.net"]}}, routes))
    open_route = load(route).routes[0]
    sts = Candidate("mx.example.net", 25, tls=tls.STRICT_POLICY, sts="enforce")
    plain = Candidate("mx.example.net", 25)

    def policy(candidate: Candidate, **flags: bool) -> object:
        envelope = Envelope("q", "a@b.test", [Recipient("c@d.test")], **flags)
        return Hop.of(open_route, candidate, "127.0.0.1", envelope).policy

    assert policy(plain) == open_route.tls
    assert policy(sts) == tls.STRICT_POLICY
    assert policy(plain, requiretls=True) == tls.STRICT_POLICY
    assert policy(sts, tls_optional=True) == tls.TLS_OPTIONAL_POLICY
