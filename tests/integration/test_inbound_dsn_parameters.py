"""RFC 3461 DSN parameters inbound: advertised, checked (501 5.5.4), spooled as given.

A real aiosmtpd listener (relay.inbound) and a raw client on loopback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from relay.envelope import Envelope
from relay.params import (
    MAIL_PARAMETERS,
    RCPT_PARAMETERS,
    ParameterError,
    take_parameters,
    xtext_decode,
    xtext_encode,
)
from tests.support.inbound import RawClient, make_config, running_inbound

MSG = b"From: a@example.org\r\nSubject: hi\r\n\r\nbody\r\n.\r\n"


async def transaction(port: int, mail: str, rcpts: list[str]) -> list[tuple[int, str]]:
    """EHLO, MAIL, each RCPT and (when all were accepted) the message: every reply."""
    async with await RawClient.connect(port) as client:
        replies = [await client.cmd("EHLO client.test"), await client.cmd(mail)]
        replies += [await client.cmd(rcpt) for rcpt in rcpts]
        if all(code == 250 for code, _ in replies):
            assert (await client.cmd("DATA"))[0] == 354
            await client.send(MSG)
            replies.append(await client.reply())
    return replies


async def test_dsn_is_advertised_and_parameters_are_spooled(tmp_path: Path) -> None:
    async with running_inbound(make_config(tmp_path)) as harness:
        replies = await transaction(
            harness.port,
            "MAIL FROM:<s@example.org> RET=hdrs ENVID=Ab+2Bc+3Dd SIZE=100",
            [
                "RCPT TO:<one@example.com> NOTIFY=success,FAILURE"
                " ORCPT=rfc822;Old+2BOne@example.com",
                "RCPT TO:<two@example.com> NOTIFY=NEVER",
                "RCPT TO:<three@example.com>",
            ],
        )
        assert "250-DSN" in replies[0][1].split("\n")
        assert [code for code, _ in replies] == [250, 250, 250, 250, 250, 250]
        (spooled,) = harness.spooled()
    # xtext decoded, case kept where it matters (ENVID, the address).
    assert (spooled.ret, spooled.envid) == ("HDRS", "Ab+c=d")
    one, two, three = spooled.recipients
    assert (one.notify, one.orcpt) == ("SUCCESS,FAILURE", "rfc822;Old+One@example.com")
    assert (two.notify, two.orcpt) == ("NEVER", "")
    assert (three.notify, three.orcpt) == ("", "")
    assert not two.notifies("FAILURE") and three.notifies("FAILURE")
    assert one.notifies("SUCCESS") and not three.notifies("SUCCESS")


BAD_MAIL = [
    "RET=ALL",
    "RET",
    "ENVID=",
    "ENVID=a+zz",  # not upper-case hex
    "ENVID=a=b",
    "ENVID=" + "x" * 101,
    "RET=FULL RET=HDRS",
    "ENVID=a envid=b",
]
BAD_RCPT = [
    "NOTIFY=NEVER,SUCCESS",
    "NOTIFY=SOMETIMES",
    "NOTIFY=SUCCESS,SUCCESS",
    "NOTIFY=",
    "ORCPT=bob@example.com",  # no addr-type
    "ORCPT=rfc822;not-an-address",
    "ORCPT=rfc822;a+4",
    "NOTIFY=DELAY NOTIFY=FAILURE",
]


@pytest.mark.parametrize("params", BAD_MAIL)
async def test_bad_mail_parameters_get_501_5_5_4(tmp_path: Path, params: str) -> None:
    async with running_inbound(make_config(tmp_path)) as harness:
        replies = await transaction(harness.port, f"MAIL FROM:<s@example.org> {params}", [])
        assert harness.rejected("bad_syntax") == 1
    assert replies[1][0] == 501 and replies[1][1].startswith("501 5.5.4"), replies[1]


@pytest.mark.parametrize("params", BAD_RCPT)
async def test_bad_rcpt_parameters_get_501_5_5_4(tmp_path: Path, params: str) -> None:
    async with running_inbound(make_config(tmp_path)) as harness:
        replies = await transaction(
            harness.port, "MAIL FROM:<s@example.org>", [f"RCPT TO:<u@example.com> {params}"]
        )
    assert replies[1][0] == 250
    assert replies[2][0] == 501 and replies[2][1].startswith("501 5.5.4"), replies[2]


async def test_dsn_parameters_in_the_wrong_command_stay_unknown(tmp_path: Path) -> None:
    # NOTIFY belongs to RCPT and RET to MAIL: elsewhere aiosmtpd's 555, as
    # any parameter relay does not implement.
    async with running_inbound(make_config(tmp_path)) as harness:
        replies = await transaction(harness.port, "MAIL FROM:<s@example.org> NOTIFY=NEVER", [])
        assert replies[1][0] == 555
        replies = await transaction(
            harness.port, "MAIL FROM:<s@example.org>", ["RCPT TO:<u@example.com> RET=FULL"]
        )
        assert replies[2][0] == 555


def test_xtext_round_trip() -> None:
    assert xtext_encode("a+b=c d\u00e9") == "a+2Bb+3Dc+20d+E9"
    assert xtext_decode("a+2Bb+3Dc") == "a+b=c"
    with pytest.raises(ParameterError):
        xtext_decode("a+2b")


def test_take_parameters_leaves_the_others_as_written() -> None:
    taken, rest = take_parameters("SIZE=10 ret=full BODY=8BITMIME", MAIL_PARAMETERS)
    assert (taken, rest) == ({"RET": "FULL"}, "SIZE=10 BODY=8BITMIME")
    taken, rest = take_parameters("ORCPT=x400;c+3Dde", RCPT_PARAMETERS)
    assert (taken, rest) == ({"ORCPT": "x400;c=de"}, "")


def test_old_spool_envelopes_load_without_dsn_fields() -> None:
    old = b'{"id": "q1", "mail_from": "s@example.org", "recipients": [{"address": "u@x.test"}]}'
    envelope = Envelope.loads(old)
    assert (envelope.ret, envelope.envid) == ("", "")
    rcpt = envelope.recipients[0]
    assert (rcpt.notify, rcpt.orcpt, rcpt.relayed_notice) == ("", "", False)
    # And what is set comes back.
    envelope.ret, envelope.envid = "FULL", "id 1"
    rcpt.notify, rcpt.orcpt, rcpt.relayed_notice = "SUCCESS", "rfc822;u@x.test", True
    again = Envelope.loads(envelope.dumps())
    assert again.to_json() == envelope.to_json()
