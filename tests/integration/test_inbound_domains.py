"""Recipient policy for served domains in U-labels and A-labels (RFC 6531); the trusted
client's no-loop rule is in tests/data/dialogs/rcpt_trusted_client.txt."""

from __future__ import annotations

from pathlib import Path

import pytest

from relay import errors
from relay.config import Config
from tests.support.inbound import RawClient, make_config, running_inbound

MSG = b"Subject: hi\r\n\r\nHallo.\r\n"

IDN_RULE = """
[[rules]]
recipients = ["@{domain}"]
route = "Corp"
"""


def idn_config(tmp_path: Path, served: str, rule: str) -> Config:
    return make_config(
        tmp_path,
        domains=["example.com", served],
        extra=IDN_RULE.format(domain=rule),
    )


async def smtputf8_session(port: int) -> RawClient:
    client = await RawClient.connect(port)
    assert (await client.cmd("EHLO client.test"))[0] == 250
    assert (await client.cmd("MAIL FROM:<s@example.org> SMTPUTF8"))[0] == 250
    return client


@pytest.mark.parametrize(
    ("served", "rule"),
    [
        ("bücher.example", "bücher.example"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("xn--bcher-kva.example", "Bücher.example"),
        ("BÜCHER.example", "xn--bcher-kva.example"),
    ],
)
async def test_u_label_and_a_label_recipients_are_accepted(
    tmp_path: Path, served: str, rule: str
) -> None:
    cfg = idn_config(tmp_path, served, rule)
    async with running_inbound(cfg) as h:
        async with await smtputf8_session(h.port) as client:
            # RFC 6531 section 3.3: the domain may come in U-labels.
            assert (await client.cmd("RCPT TO:<anna@bücher.example>"))[0] == 250
            assert (await client.cmd("RCPT TO:<ben@xn--bcher-kva.example>"))[0] == 250
            assert (await client.cmd("RCPT TO:<cleo@BÜCHER.EXAMPLE>"))[0] == 250
            assert (await client.cmd("DATA"))[0] == 354
            await client.send(MSG + b".\r\n")
            assert (await client.reply())[0] == 250
        [env] = h.spooled()
        # Kept as the client wrote them: the next hop gets what was sent.
        assert [r.address for r in env.recipients] == [
            "anna@bücher.example",
            "ben@xn--bcher-kva.example",
            "cleo@BÜCHER.EXAMPLE",
        ]


async def test_other_u_label_domain_is_still_relaying_denied(tmp_path: Path) -> None:
    cfg = idn_config(tmp_path, "bücher.example", "bücher.example")
    async with running_inbound(cfg) as h:
        async with await smtputf8_session(h.port) as client:
            _, text = await client.cmd("RCPT TO:<anna@bucher.example>")
        assert text == str(errors.RELAYING_DENIED)
