"""Inbound over real SMTP on loopback: replies, policy, limits, smuggling, injection."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import aiosmtplib
import pytest

from relay import errors
from relay.config import Config
from relay.envelope import RcptState
from tests.support.inbound import Harness, RawClient, make_config, running_inbound
from tests.support.spool import read_body

MSG = b"From: a@example.org\r\nTo: user@example.com\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
def cfg(tmp_path: Path) -> Config:
    return make_config(tmp_path)


async def session(h: Harness, helo: str = "EHLO client.test") -> RawClient:
    client = await RawClient.connect(h.port)
    code, _ = await client.cmd(helo)
    assert code == 250
    return client


async def send_message(client: RawClient, body: bytes) -> tuple[int, str]:
    code, _ = await client.cmd("DATA")
    assert code == 354
    await client.send(body + b".\r\n")
    return await client.reply()


def reply_of(r: errors.Reply) -> str:
    return str(r)


async def test_greeting_and_ehlo_advertise_extensions(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        client = await RawClient.connect(h.port)
        async with client:
            code, text = await client.cmd("EHLO client.test")
        assert code == 250
        lines = [line[4:] for line in text.splitlines()]
        assert lines[0] == "relay.test"
        assert "SIZE 100000" in lines
        assert "8BITMIME" in lines
        assert "SMTPUTF8" in lines
        assert "STARTTLS" not in lines
        assert not any(line.startswith("AUTH") for line in lines)


async def test_accept_spools_then_replies_queued(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=h.port, timeout=5)
        await smtp.connect()
        errs, reply = await smtp.sendmail(
            "sender@example.org", ["user@example.com", "other@example.com"], MSG
        )
        await smtp.quit()
        assert errs == {}
        queue_id = reply.split()[-1]
        assert reply == str(errors.queued(queue_id))[4:]
        [env] = h.spooled()
        assert env.id == queue_id
        assert env.mail_from == "sender@example.org"
        assert [r.address for r in env.recipients] == ["user@example.com", "other@example.com"]
        assert all(r.state is RcptState.PENDING for r in env.recipients)
        assert env.client.ip == "127.0.0.1"
        assert env.client.tls == ""
        assert env.next_attempt == env.received_at
        assert [e.id for e in h.accepted] == [queue_id]
        body = read_body(h.spool, queue_id)
        head, _, rest = body.partition(b"\r\nFrom: ")
        assert head.startswith(b"Received: from ")
        assert f"id {queue_id}; ".encode() in head
        assert b"for <" not in head  # two recipients: no "for" clause
        assert b"From: " + rest == MSG  # the rest byte-for-byte
        assert env.size == len(body)
        assert h.metrics.registry.get_sample_value("relay_messages_received_total") == 1


async def test_single_recipient_received_has_for_clause(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            assert (await client.cmd("MAIL FROM:<>"))[0] == 250
            assert (await client.cmd("RCPT TO:<user@example.com>"))[0] == 250
            code, text = await send_message(client, MSG)
        assert code == 250
        [env] = h.spooled()
        assert env.mail_from == ""  # the null reverse-path
        head = read_body(h.spool, env.id).split(b"\r\nFrom: ")[0]
        assert b"from client.test (localhost [127.0.0.1])" in head
        assert b"with ESMTP\r\n" in head
        assert b"\tfor <user@example.com>; " in head


async def test_rcpt_hook_records_recipients_once(cfg: Config) -> None:
    # aiosmtpd leaves envelope.rcpt_tos to a handle_RCPT hook: pin it down.
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            assert (await client.cmd("RCPT TO:<a@example.com>"))[0] == 250
            assert (await client.cmd("RCPT TO:<b@example.com>"))[0] == 250
            assert (await client.cmd("RCPT TO:<a@example.com>"))[0] == 250
            assert (await send_message(client, MSG))[0] == 250
        [env] = h.spooled()
        assert [r.address for r in env.recipients] == ["a@example.com", "b@example.com"]


async def test_helo_session_uses_smtp_keyword(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        client = await session(h, "HELO old.client")
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            await client.cmd("RCPT TO:<a@example.com>")
            assert (await send_message(client, MSG))[0] == 250
        [env] = h.spooled()
        assert env.client.helo == "old.client"
        assert b"with SMTP\r\n" in read_body(h.spool, env.id)


async def test_open_relay_tricks_never_reach_a_foreign_domain(cfg: Config) -> None:
    """Whatever is accepted is routed by the domain after the last '@': ours."""
    tricks = [
        "<user%other.test@example.com>",
        '<"user@other.test"@example.com>',
        "<@example.com:user@other.test>",
        "<user@other.test@example.com>",
        "<other.test!user@example.com>",
        "<user@[192.0.2.1]>",
        "<user@example.com>",
    ]
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            for trick in tricks:
                await client.cmd(f"RCPT TO:{trick}")
            assert (await send_message(client, MSG))[0] == 250
        [env] = h.spooled()
        domains = {r.address.rpartition("@")[2] for r in env.recipients}
        assert domains == {"example.com"}
        assert [r.address for r in env.recipients] == ["user@example.com"]


async def test_relay_networks_client_may_relay_anywhere(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, extra_server='relay_networks = ["127.0.0.0/8"]')
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            assert (await client.cmd("RCPT TO:<user@other.test>"))[0] == 250
            # A source route is dropped; the final mailbox is what relays.
            code, _ = await client.cmd("RCPT TO:<@example.com:second@other.test>")
            assert code == 250
            assert (await client.cmd("RCPT TO:<user@[192.0.2.1]>"))[0] == 550
            assert (await send_message(client, MSG))[0] == 250
        [env] = h.spooled()
        assert [r.address for r in env.recipients] == ["user@other.test", "second@other.test"]


async def test_too_many_recipients(cfg: Config) -> None:
    async with running_inbound(cfg) as h:  # max_recipients = 5
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            for i in range(5):
                assert (await client.cmd(f"RCPT TO:<u{i}@example.com>"))[0] == 250
            code, text = await client.cmd("RCPT TO:<u5@example.com>")
            assert text == str(errors.TOO_MANY_RECIPIENTS)
            assert (await send_message(client, MSG))[0] == 250
        [env] = h.spooled()
        assert len(env.recipients) == 5


async def test_actual_size_over_limit(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            await client.cmd("RCPT TO:<user@example.com>")
            big = MSG + (b"x" * 998 + b"\r\n") * 101
            code, text = await send_message(client, big)
            assert text == str(errors.MESSAGE_TOO_BIG)
            # The session goes on: a new transaction works.
            await client.cmd("MAIL FROM:<s@example.org>")
            await client.cmd("RCPT TO:<user@example.com>")
            assert (await send_message(client, MSG))[0] == 250
        assert len(h.spooled()) == 1


async def test_line_too_long_in_data_and_command(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            code, text = await client.cmd("NOOP " + "x" * 2000)
            assert text == str(errors.LINE_TOO_LONG)
            code, text = await client.cmd("MAIL FROM:<" + "a" * 600 + "@example.org>")
            assert text == str(errors.LINE_TOO_LONG)
            await client.cmd("MAIL FROM:<s@example.org>")
            await client.cmd("RCPT TO:<user@example.com>")
            code, text = await send_message(client, MSG + b"y" * 1200 + b"\r\n")
            assert text == str(errors.LINE_TOO_LONG)
        assert h.spooled() == []


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b"Received: x\r\n" * 31 + MSG, errors.LOOP_DETECTED),
        (MSG + b"bare LF\nhere\r\n", errors.BARE_LINE_ENDING),
        (MSG + b"bare CR\rhere\r\n", errors.BARE_LINE_ENDING),
        (b"Subject: x\nBcc: victim@other.test\r\n\r\nbody\r\n", errors.BARE_LINE_ENDING),
        (b" folded into our Received\r\n" + MSG, errors.BAD_HEADER),
        (MSG + b"nul \x00 byte\r\n", errors.NUL_IN_MESSAGE),
    ],
)
async def test_message_refused(cfg: Config, body: bytes, expected: errors.Reply) -> None:
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            await client.cmd("RCPT TO:<user@example.com>")
            code, text = await send_message(client, body)
        assert text == str(expected)
        assert h.spooled() == []
        assert h.accepted == []


SMUGGLE_ENDINGS = [b"\n.\n", b"\r\n.\n", b"\n.\r\n", b"\r.\r\n"]


@pytest.mark.parametrize("ending", SMUGGLE_ENDINGS, ids=repr)
async def test_smuggling_gives_at_most_one_message(cfg: Config, ending: bytes) -> None:
    smuggled = (
        b"MAIL FROM:<admin@example.com>\r\n"
        b"RCPT TO:<victim@example.com>\r\n"
        b"DATA\r\n"
        b"From: admin@example.com\r\nSubject: smuggled\r\n\r\nsmuggled\r\n"
    )
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            await client.cmd("RCPT TO:<user@example.com>")
            assert (await client.cmd("DATA"))[0] == 354
            await client.send(MSG + b"first" + ending + smuggled + b".\r\n")
            code, text = await client.reply()
            assert text == str(errors.BARE_LINE_ENDING)
            # Nothing else answers: the "commands" were message content.
            await client.send(b"NOOP\r\n")
            assert (await client.reply())[0] == 250
        spooled = h.spooled()
        assert len(spooled) <= 1
        assert all(b"smuggled" not in read_body(h.spool, e.id) for e in spooled)


async def test_smtputf8_addresses(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            code, _ = await client.cmd("MAIL FROM:<发件人@example.org> SMTPUTF8")
            assert code == 250
            assert (await client.cmd("RCPT TO:<用户@example.com>"))[0] == 250
            body = "From: 发件人@example.org\r\nSubject: 你好\r\n\r\n你好\r\n".encode()
            assert (await send_message(client, body))[0] == 250
        [env] = h.spooled()
        assert env.smtputf8
        assert env.mail_from == "发件人@example.org"
        assert env.recipients[0].address == "用户@example.com"
        data = read_body(h.spool, env.id)
        assert b"with UTF8SMTP\r\n" in data
        assert "for <用户@example.com>".encode() in data
        assert data.endswith(body)


async def test_8bitmime_recorded(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            assert (await client.cmd("MAIL FROM:<s@example.org> BODY=8BITMIME"))[0] == 250
            await client.cmd("RCPT TO:<user@example.com>")
            assert (await send_message(client, MSG + "é\r\n".encode()))[0] == 250
        [env] = h.spooled()
        assert env.body_8bit


async def test_exception_answers_451_never_aiosmtpd_500(cfg: Config) -> None:
    broken = {"now": False}

    def flaky() -> Config:
        # Constructor-injected config provider that breaks when told to.
        if broken["now"]:
            raise RuntimeError("secret internal detail")
        return cfg

    async with running_inbound(flaky) as h:
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            broken["now"] = True
            code, text = await client.cmd("RCPT TO:<user@example.com>")
            broken["now"] = False
    assert text == str(errors.INTERNAL_ERROR)
    assert "secret" not in text and not text.startswith("500")


async def test_on_accept_failure_still_250(tmp_path: Path) -> None:
    cfg = make_config(tmp_path)
    async with running_inbound(cfg) as h:

        def broken(envelope: object) -> None:
            raise RuntimeError("scheduler down")

        h.inbound.intake.on_accept = broken
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            await client.cmd("RCPT TO:<user@example.com>")
            assert (await send_message(client, MSG))[0] == 250
        assert len(h.spooled()) == 1


async def test_idle_timeout_says_421(tmp_path: Path) -> None:
    cfg = make_config(tmp_path, timeout="500ms")
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            code, text = await client.reply(wait=5)
        assert text == str(errors.IDLE_TIMEOUT)


async def test_stop_answers_421_to_open_sessions(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        port = h.port
        client = await session(h)
        await client.cmd("MAIL FROM:<s@example.org>")
        await h.inbound.stop(grace=1)
        code, text = await client.reply()
        assert text == str(errors.SHUTTING_DOWN)
        await client.close()
        with pytest.raises(OSError):
            await RawClient.connect(port)


async def test_config_provider_is_read_per_command(tmp_path: Path, cfg: Config) -> None:
    current = {"cfg": cfg}
    async with running_inbound(lambda: current["cfg"]) as h:
        client = await session(h)
        async with client:
            await client.cmd("MAIL FROM:<s@example.org>")
            assert (await client.cmd("RCPT TO:<user@other.test>"))[0] == 550
            server = dataclasses.replace(cfg.server, domains=(*cfg.server.domains, "other.test"))
            rules = (dataclasses.replace(cfg.rules[0], recipients=("*",)),)
            current["cfg"] = dataclasses.replace(cfg, server=server, rules=rules)
            assert (await client.cmd("RCPT TO:<user@other.test>"))[0] == 250


async def test_aiosmtpd_texts_are_mapped() -> None:
    # If an aiosmtpd upgrade changes these texts, the mapping must follow
    # (its version is checked with its private members, in
    # tests/unit/test_private_members.py).
    import inspect

    import aiosmtpd.smtp

    from relay import inbound

    def squeezed(text: str) -> str:
        # Without blanks and quotes: a reply may be split over two literals.
        return "".join(ch for ch in text if not ch.isspace() and ch not in "'\"")

    assert "553 5.1.3 Error: malformed address" in inbound._AIOSMTPD_REPLIES
    source = squeezed(inspect.getsource(aiosmtpd.smtp))
    for text in inbound._AIOSMTPD_REPLIES:
        assert squeezed(text) in source, f"aiosmtpd no longer says {text!r}"


@pytest.mark.parametrize(
    "line",
    [
        b"MAIL FROM:<s@example.org>\n",
        b"NOOP\n",
        b"\r\n",
        # A bare CR before the CRLF: not CRLF-only either.
        b"MAIL FROM:<s@example.org>\r\r\n",
        b"NOOP\r\r\r\n",
    ],
    ids=repr,
)
async def test_command_lines_must_end_in_crlf(cfg: Config, line: bytes) -> None:
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            await client.send(line)
            code, text = await client.reply()
            assert text == str(errors.BAD_COMMAND_LINE)
            # Not executed: MAIL was refused, so RCPT still needs one.
            assert (await client.cmd("RCPT TO:<user@example.com>"))[0] == 503
            assert (await client.cmd("MAIL FROM:<s@example.org>"))[0] == 250


async def test_postmaster_without_domain_goes_to_first_domain(cfg: Config) -> None:
    async with running_inbound(cfg) as h:
        client = await session(h)
        async with client:
            code, text = await client.cmd("MAIL FROM:<postmaster>")
            assert text == str(errors.MALFORMED_ADDRESS)
            await client.cmd("MAIL FROM:<s@example.org>")
            assert (await client.cmd("RCPT TO:<POSTMASTER>"))[0] == 250
            assert (await send_message(client, MSG))[0] == 250
        [env] = h.spooled()
        assert env.recipients[0].address == "postmaster@example.com"
