"""Inbound STARTTLS (RFC 3207) with swaks and aiosmtplib against a trustme certificate."""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiosmtplib
import pytest
import trustme

from relay import keeper
from relay.config import Config
from tests.support.inbound import RawClient, make_config, running_inbound
from tests.support.peers import require_swaks
from tests.support.spool import read_body


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_config(tmp_path: Path, ca: trustme.CA) -> Config:
    cert = ca.issue_cert("relay.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.crt"))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(tmp_path / "relay.crt"), append=True)
    cert.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    extra = 'tls_cert = "relay.crt"\ntls_key = "relay.key"'
    return make_config(tmp_path, extra_server=extra)


async def swaks(port: int, *args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        require_swaks(tls="--tls" in args),
        "--server",
        f"127.0.0.1:{port}",
        "--from",
        "sender@example.org",
        "--ehlo",
        "client.test",
        "--timeout",
        "10",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode("utf-8", "replace")


async def test_starttls_offered_only_with_certificate(tls_config: Config, tmp_path: Path) -> None:
    context = keeper.server_tls_context(tls_config)
    assert context is not None
    async with running_inbound(tls_config, tls_context=context) as h:
        client = await RawClient.connect(h.port)
        async with client:
            _, text = await client.cmd("EHLO client.test")
    assert "250-STARTTLS" in text
    assert keeper.server_tls_context(make_config(tmp_path / "plain")) is None


async def test_swaks_starttls(tls_config: Config) -> None:
    context = keeper.server_tls_context(tls_config)
    async with running_inbound(tls_config, tls_context=context) as h:
        code, out = await swaks(h.port, "--tls", "--to", "user@example.com")
        assert code == 0, out
        assert "250 2.0.0 Ok: queued as" in out
        [env] = h.spooled()
        assert env.client.tls.startswith("TLSv1")
        data = read_body(h.spool, env.id)
        assert b"with ESMTPS (using TLSv1" in data


async def test_swaks_plain_and_relaying_denied(tls_config: Config) -> None:
    async with running_inbound(tls_config) as h:
        code, out = await swaks(h.port, "--to", "user@example.com")
        assert code == 0, out
        code, out = await swaks(h.port, "--to", "user@other.test")
        assert code != 0
        assert "550 5.7.1 Relaying denied" in out
        assert "500 Error" not in out
        assert len(h.spooled()) == 1


async def test_aiosmtplib_starttls_verifies_against_ca(tls_config: Config, ca: trustme.CA) -> None:
    context = keeper.server_tls_context(tls_config)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with running_inbound(tls_config, tls_context=context) as h:
        smtp = aiosmtplib.SMTP(
            hostname="127.0.0.1",
            port=h.port,
            timeout=5,
            start_tls=False,
            tls_context=client_ctx,
        )
        await smtp.connect()
        await smtp.starttls(server_hostname="relay.test")
        errs, reply = await smtp.sendmail(
            "sender@example.org", ["user@example.com"], b"Subject: tls\r\n\r\nhi\r\n"
        )
        await smtp.quit()
        assert errs == {}
        [env] = h.spooled()
        assert env.client.tls in ("TLSv1.2", "TLSv1.3")
