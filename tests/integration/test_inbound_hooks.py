"""A session finds every command, AUTH mechanism and hook aiosmtpd looks for.

relay's connection and handler classes answer ``dir()`` with only the names
aiosmtpd's SMTP.__init__ searches (``smtp_*``, ``auth_*``, ``handle_*``), so
that it does not getattr every attribute on each new connection. This
checks, on a live session, that nothing aiosmtpd would have found is lost.
"""

from __future__ import annotations

from pathlib import Path

from tests.support.inbound import RawClient, make_config, running_inbound
from tests.support.wait import until


def _full(obj: object, prefix: str) -> set[str]:
    # object.__dir__: what dir() gives without relay's override.
    return {name[len(prefix) :] for name in object.__dir__(obj) if name.startswith(prefix)}


async def test_live_session_has_every_command_mechanism_and_hook(tmp_path: Path) -> None:
    async with (
        running_inbound(make_config(tmp_path)) as h,
        await RawClient.connect(h.port) as client,
    ):
        assert (await client.cmd("EHLO client.test"))[0] == 250
        await until(lambda: bool(h.inbound.connections), 5, what="a live session")
        (conn,) = h.inbound.connections
        handler = h.inbound.handler
        assert set(conn._smtp_methods) == _full(conn, "smtp_")
        assert {"EHLO", "MAIL", "RCPT", "DATA", "STARTTLS", "QUIT"} <= set(conn._smtp_methods)
        assert set(conn._handle_hooks) == _full(handler, "handle_")
        assert {"EHLO", "MAIL", "RCPT", "DATA"} <= set(conn._handle_hooks)
        # relay offers no AUTH: the built-in mechanisms were found, then excluded.
        assert conn._auth_methods == {}
        assert (await client.cmd("HELP"))[0] == 250


async def test_ehlo_reply_is_one_write_and_hook_form_is_recognised(tmp_path: Path) -> None:
    # The hook's precomputed signature must still read as aiosmtpd's
    # five-argument form, and its reply is one item: aiosmtpd writes each
    # item separately, and a line per write was a TCP segment per line.
    async with (
        running_inbound(make_config(tmp_path)) as h,
        await RawClient.connect(h.port) as client,
    ):
        code, text = await client.cmd("EHLO client.test")
        lines = text.split("\n")
        assert code == 250 and lines[-1] == "250 HELP" and "250-DSN" in lines
        await until(lambda: bool(h.inbound.connections), 5, what="a live session")
        (conn,) = h.inbound.connections
        assert conn._ehlo_hook_ver == "new"
        reply = await h.inbound.handler.handle_EHLO(
            conn, conn.session, conn.envelope, "client.test", ["250-relay.test", "250 HELP"]
        )
        assert len(reply) == 1
        assert reply[0].split("\r\n")[0] == "250-relay.test"
        assert reply[0].split("\r\n")[-1] == "250 HELP"
