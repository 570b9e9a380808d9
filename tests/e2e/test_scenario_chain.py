"""Scenarios on one chain: clients → relay (subprocess) → downstream Postfix.

One module-wide chain (a test CA, a downstream Postfix with STARTTLS and a
certificate for 127.0.0.1, the relay with a verified-TLS route to it and
its own STARTTLS certificate, an upstream Postfix using the relay as its
relayhost) serves every test here; each test writes to its own recipient
so the shared maildir tells them apart by ``Delivered-To``.

What the chain shows: message intact; swaks with and without STARTTLS;
Postfix submitting with sendmail; nothing listens off loopback.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import smtplib
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import configs
from tests.support.pki import Pki
from tests.support.postfix import DownstreamServer, PostfixFactory, UpstreamClient
from tests.support.procs import RelayProcess, relay_config, swaks
from tests.support.wait import blocking_until


@dataclass
class Chain:
    ca: Pki
    down: DownstreamServer
    relay: RelayProcess
    up: UpstreamClient


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chain]:
    tmp = tmp_path_factory.mktemp("chain")
    ca = Pki(tmp / "pki")
    with PostfixFactory(keep_logs_in=tmp / "postfix-logs") as postfix:
        down = postfix.downstream(tls=ca.issue("127.0.0.1", stem="down"), tls_level="may")
        # 127.0.0.1 too: swaks --tls-verify checks the name it connected to.
        inbound = ca.issue("relay.test", "127.0.0.1", stem="relay")
        config = relay_config(
            tmp,
            configs.route("Downstream", "127.0.0.1", down.port, **configs.TLS_LEVELS["full"]),
            server={"tls_cert": str(inbound.cert), "tls_key": str(inbound.key)},
            tls={"ca_file": str(ca.ca_file)},
        )
        with RelayProcess(config) as proc:
            up = postfix.upstream(
                relay_port=proc.port,
                tls_level="secure",
                ca_file=ca.ca_file,
                tls_match="relay.test",
            )
            yield Chain(ca, down, proc, up)


# --- reading the maildir byte for byte ------------------------------------------


def raw_delivered(down: DownstreamServer, recipient: str) -> list[bytes]:
    """The maildir files delivered to ``recipient``, raw bytes, oldest first."""
    needle = f"\nDelivered-To: {recipient}\n".encode()
    found = []
    files = [p for sub in ("new", "cur") for p in (down.maildir / sub).glob("*")]
    for path in sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name)):
        data = path.read_bytes()
        if needle in b"\n" + data.split(b"\n\n", 1)[0] + b"\n":
            found.append(data)
    return found


def split_fields(raw: bytes, count: int) -> tuple[list[bytes], bytes]:
    """The first ``count`` header fields (with their folded lines) and the rest."""
    lines = raw.split(b"\n")
    fields: list[bytes] = []
    index = 0
    while len(fields) < count:
        field = [lines[index]]
        index += 1
        while lines[index][:1] in (b" ", b"\t"):
            field.append(lines[index])
            index += 1
        fields.append(b"\n".join(field))
    return fields, b"\n".join(lines[index:])


def relay_received(message_headers: list[str]) -> str:
    """The one Received header written by the relay (``by relay.test (relay)``)."""
    (ours,) = [h for h in message_headers if "by relay.test (relay)" in h]
    return ours


# --- scenarios ------------------------------------------------------------------

ORIGINAL = (
    # A trace header from an earlier hop: it must stay where it is, below ours.
    "Received: from origin.test (origin.test [192.0.2.1])\r\n"
    "\tby mta.origin.test with ESMTP id ABC123; Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    "From: Alice Example <alice@up.test>\r\n"
    "To: Bob Example <bob-intact@example.org>\r\n"
    "Subject: =?utf-8?q?intact_=C3=BCber_alles?=\r\n"
    "Date: Sat, 28 Nov 2026 12:00:01 +0000\r\n"
    "Message-ID: <intact.1@up.test>\r\n"
    "MIME-Version: 1.0\r\n"
    "Content-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: 8bit\r\n"
    "X-Folded: first part of a folded header\r\n"
    "\tsecond part, after a tab\r\n"
    "  third part, after two spaces\r\n"
    "X-Trailing-Space: value with trailing blanks   \r\n"
    "\r\n"
    "First line of the body.\r\n"
    ".A line starting with a dot (dot-stuffed on the wire, RFC 5321 4.5.2)\r\n"
    "..two dots\r\n"
    ".\r\n"
    "Trailing blanks stay   \r\n"
    "\ttab-indented line\r\n"
    "UTF-8 text: ünïcödé, 日本語\r\n"
    "From the start of a line (no mbox quoting in a maildir)\r\n"
    "\r\n"
    "\r\n" + "x" * 990 + "\r\n"
    "last line\r\n"
).encode()


def test_message_arrives_intact_with_exactly_one_relay_received(chain: Chain) -> None:
    recipient = "bob-intact@example.org"
    with smtplib.SMTP("127.0.0.1", chain.relay.port, local_hostname="client.test", timeout=10) as c:
        c.ehlo()
        assert c.mail("alice@up.test", ["BODY=8BITMIME"])[0] == 250
        assert c.rcpt(recipient)[0] == 250
        code, reply = c.data(ORIGINAL)
    assert code == 250, reply
    queue_id = re.search(rb"queued as (\S+)", reply)
    assert queue_id, reply

    (raw,) = blocking_until(lambda: raw_delivered(chain.down, recipient), 20, what="the message")
    # The downstream Postfix prepends Return-Path, X-Original-To and
    # Delivered-To (virtual(8)) and its own Received (smtpd); the relay's
    # Received comes next, then the message exactly as submitted (the
    # maildir stores LF line endings).
    fields, rest = split_fields(raw, 5)
    return_path, original_to, delivered_to, postfix_received, ours = fields
    assert return_path == b"Return-Path: <alice@up.test>"
    assert original_to == f"X-Original-To: {recipient}".encode()
    assert delivered_to == f"Delivered-To: {recipient}".encode()
    assert postfix_received.startswith(b"Received: from relay.test (localhost [127.0.0.1])")
    assert b"by downstream.test (Postfix) with ESMTPS" in postfix_received
    assert re.fullmatch(
        rb"Received: from client\.test \(localhost \[127\.0\.0\.1\]\)\n"
        rb"\tby relay\.test \(relay\) with ESMTP\n"
        rb"\tid " + re.escape(queue_id.group(1)) + rb"\n"
        rb"\tfor <bob-intact@example\.org>; [^\n]+",
        ours,
    ), ours
    assert rest == ORIGINAL.replace(b"\r\n", b"\n")
    assert raw.count(b"\nReceived: ") == 3  # Postfix's, ours, the original one


def test_smtputf8_addresses_pass_through(chain: Chain) -> None:
    """RFC 6531: a non-ASCII mailbox goes through with SMTPUTF8 on both hops."""
    recipient = "jörg@example.org"
    message = (
        f"From: élise@up.test\r\nTo: {recipient}\r\nSubject: grüße\r\n"
        # A Date of our own: Postfix would add one (a "local" client, 127.0.0.1).
        "Date: Sat, 28 Nov 2026 12:00:01 +0000\r\nMessage-ID: <utf8.1@up.test>\r\n\r\nhéllo\r\n"
    ).encode()
    with smtplib.SMTP("127.0.0.1", chain.relay.port, local_hostname="client.test", timeout=10) as c:
        c.ehlo()
        assert c.has_extn("smtputf8")
        assert c.mail("élise@up.test", ["SMTPUTF8", "BODY=8BITMIME"])[0] == 250
        assert c.rcpt(recipient)[0] == 250
        assert c.data(message)[0] == 250

    (raw,) = blocking_until(lambda: raw_delivered(chain.down, recipient), 20, what="the message")
    fields, rest = split_fields(raw, 5)
    assert fields[0] == "Return-Path: <élise@up.test>".encode()
    assert b"by downstream.test (Postfix) with UTF8SMTPS" in fields[3]
    assert b"by relay.test (relay) with UTF8SMTP\n" in fields[4]
    assert rest == message.replace(b"\r\n", b"\n")


@pytest.mark.parametrize("starttls", [False, True], ids=["plain", "starttls"])
def test_swaks_through_relay(chain: Chain, starttls: bool) -> None:
    recipient = f"carol-{'tls' if starttls else 'plain'}@example.org"
    args = ["--server", f"127.0.0.1:{chain.relay.port}", "--ehlo", "swaks.test"]
    args += ["--from", "alice@up.test", "--to", recipient, "--header", "Subject: via swaks"]
    if starttls:
        args += ["--tls", "--tls-verify", "--tls-ca-path", str(chain.ca.ca_file)]
    sent = swaks(*args)
    assert sent.returncode == 0, sent.stdout
    if starttls:
        assert "TLS started" in sent.stdout, sent.stdout

    (message,) = chain.down.wait_messages(1, timeout=20, recipient=recipient)
    assert str(message["Subject"]) == "via swaks"
    ours = relay_received([str(h) for h in message.get_all("Received", [])])
    keyword = re.search(r"by relay\.test \(relay\) with (\S+)", ours)
    assert keyword, ours
    assert keyword.group(1) == ("ESMTPS" if starttls else "ESMTP"), ours
    if starttls:
        assert re.search(r"using TLSv1\.[23] with cipher", ours), ours


def test_upstream_postfix_sendmail_twenty_messages_delivered_once(chain: Chain) -> None:
    recipient = "dave-bulk@example.org"
    ids = [f"<bulk.{i}@up.test>" for i in range(20)]
    for index, message_id in enumerate(ids):
        message = (
            f"From: alice@up.test\r\nTo: {recipient}\r\nSubject: bulk {index}\r\n"
            f"Message-ID: {message_id}\r\n\r\nmessage {index}\r\n"
        )
        chain.up.submit(message, "alice@up.test", [recipient])

    chain.down.wait_messages(len(ids), timeout=30, recipient=recipient)
    # Let any duplicate surface: both queues drained, then a short grace.
    blocking_until(lambda: not chain.up.queued(), 10, what="the upstream queue to drain")
    blocking_until(
        lambda: not any((chain.relay.config_path.parent / "relay-spool").rglob("*.msg")),
        10,
        what="the relay spool to drain",
    )
    time.sleep(0.5)
    seen = Counter(str(m["Message-ID"]) for m in chain.down.messages(recipient))
    duplicates = {mid: n for mid, n in seen.items() if n > 1}
    assert set(seen) == set(ids), f"missing {set(ids) - set(seen)}"
    assert not duplicates, f"duplicates: {duplicates}"
    chain.up.wait_log(r"Verified TLS connection established to 127\.0\.0\.1")


def listening_sockets(pid: int) -> list[str]:
    """``ip:port`` of every TCP listener and bound UDP socket of ``pid`` (from /proc)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table in ("tcp", "tcp6", "udp", "udp6"):
        for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if inode not in inodes or (table.startswith("tcp") and state != "0A"):
                continue  # not ours, or a TCP socket that is not listening
            hex_ip, hex_port = local.split(":")
            # /proc prints the address as native-endian 32-bit words.
            packed = b"".join(
                int(hex_ip[i : i + 8], 16).to_bytes(4, sys.byteorder)
                for i in range(0, len(hex_ip), 8)
            )
            found.append(f"{ipaddress.ip_address(packed)}:{int(hex_port, 16)}")
    return sorted(found)


def test_relay_listens_only_on_loopback(chain: Chain) -> None:
    local = listening_sockets(chain.relay.pid)
    assert len(local) >= 2, local  # SMTP and metrics at least
    assert f"127.0.0.1:{chain.relay.port}" in local
    assert all(ipaddress.ip_address(addr.rsplit(":", 1)[0]).is_loopback for addr in local), local
