"""Protocol strictness: no second STARTTLS; no routing characters in a served local part."""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

import pytest
import trustme

from relay import errors, keeper
from relay.config import Config
from tests.support.inbound import RawClient, make_config, running_inbound

MSG = b"Subject: hi\r\n\r\nHallo.\r\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def tls_config(tmp_path: Path, ca: trustme.CA) -> Config:
    cert = ca.issue_cert("relay.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "relay.crt"))
    cert.private_key_pem.write_to_path(str(tmp_path / "relay.key"))
    return make_config(tmp_path, extra_server='tls_cert = "relay.crt"\ntls_key = "relay.key"')


async def test_second_starttls_is_refused_554(
    tmp_path: Path, ca: trustme.CA, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = tls_config(tmp_path, ca)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)
    caplog.set_level(logging.DEBUG)
    async with running_inbound(cfg, tls_context=keeper.server_tls_context(cfg)) as h:
        async with await RawClient.connect(h.port) as client:
            assert (await client.cmd("EHLO client.test"))[0] == 250
            assert (await client.cmd("STARTTLS"))[0] == 220
            await client.writer.start_tls(client_context, server_hostname="relay.test")
            code, text = await client.cmd("EHLO client.test")
            assert code == 250 and "STARTTLS" not in text
            assert await client.cmd("STARTTLS") == (554, str(errors.TLS_ALREADY_ACTIVE))
            # The session carries on inside TLS.
            assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
            assert (await client.cmd("RCPT TO:<user@example.com>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            await client.send(MSG + b".\r\n")
            assert (await client.reply())[0] == 250
            assert (await client.cmd("QUIT"))[0] == 221
        assert h.rejected("bad_syntax") == 1
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


ROUTING_FORMS = [
    "user%other.test@example.com",
    '"user@other.test"@example.com',
    "other.test!user@example.com",
    '"user%other.test"@example.com',
]


async def connect_from(port: int, source: str) -> RawClient:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0)), 5
    )
    client = RawClient(reader, writer)
    assert (await client.reply())[0] == 220
    return client


async def test_routing_characters_from_relay_networks_or_when_allowed(tmp_path: Path) -> None:
    trusted = make_config(tmp_path / "a", extra_server='relay_networks = ["127.0.0.2/32"]')
    allowed = make_config(tmp_path / "b", extra_server="allow_routing_characters = true")
    for cfg, source in ((trusted, "127.0.0.2"), (allowed, "127.0.0.1")):
        async with running_inbound(cfg) as h:
            async with await connect_from(h.port, source) as client:
                assert (await client.cmd("EHLO client.test"))[0] == 250
                assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
                for rcpt in ROUTING_FORMS:
                    assert (await client.cmd(f"RCPT TO:<{rcpt}>"))[0] == 250, rcpt
                assert (await client.cmd("DATA"))[0] == 354
                await client.send(MSG + b".\r\n")
                assert (await client.reply())[0] == 250
            [env] = h.spooled()
            assert [r.address for r in env.recipients] == ROUTING_FORMS
    # Outside relay_networks (127.0.0.3) the default still refuses.
    async with running_inbound(trusted) as h, await connect_from(h.port, "127.0.0.3") as client:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250
        assert (await client.cmd(f"RCPT TO:<{ROUTING_FORMS[0]}>"))[0] == 550
