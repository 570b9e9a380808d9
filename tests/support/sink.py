"""An in-process aiosmtpd SMTP sink for tests: a real SMTP server on 127.0.0.1.

Runs on the test's own event loop (no threads)::

    async with Sink(tls_context=pki.server_context("mx1.test")) as sink:
        ...deliver to 127.0.0.1:sink.port...
    assert sink.messages[0].rcpt_tos == ["a@x.test"]

Scripted replies (``replies=``) are keyed by command, optionally narrowed
by the first word of the argument's address:

- ``"GREETING"``: replaces the 220 greeting (the connection is then closed);
- ``"STARTTLS"``: a refusal such as ``"454 4.7.0 no TLS"``, or a ``"220 ..."``
  followed by plaintext garbage (the client's handshake fails), or
  :data:`STARTTLS_THEN_DROP` (agree, then close without a TLS byte: the
  peer went away mid-handshake), or :data:`STARTTLS_THEN_STALL` (agree,
  then never answer the handshake);
- ``"EHLO"``, ``"MAIL"``, ``"RCPT"``, ``"RSET"``, ``"DATA"`` (DATA: the reply after the
  message), ``"RCPT bad@x.test"`` (only that recipient),
  ``"MAIL <>"`` (only the null sender);
- a value is a reply line (``"550 5.1.1 no such user"``), ``"drop"`` (close
  the connection without answering), for DATA also ``"stall"`` (never
  answer the final dot) or ``"sleep 0.5"`` (answer 250 after 0.5 s), or a list of those used one per
  command in turn, after which the default (accept) applies again.

Everything seen is recorded: ``messages`` (:class:`Received`),
``connections`` (count), ``lines`` (raw "MAIL FROM:<>" style command
lines), ``sessions_tls`` (TLS version at each MAIL, None if plaintext).

:class:`StaticResolver` maps test names to addresses (``{"mx1.test":
["127.0.0.1"]}``) for a Deliverer; unknown names raise NoSuchDomain.
``Sink.kill_connections()`` drops every open connection (to test pooled
session replacement). ``pipelining=True`` offers PIPELINING (RFC 2920);
``grouped`` then lists the commands that arrived with the next command
already waiting behind them (sent as one group, not in lock-step).
``requiretls=True`` offers REQUIRETLS (RFC 8689) after STARTTLS and takes
it on MAIL FROM (recorded in ``mail_options``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from relay import errors

Script = str | list[str]

#: A STARTTLS script: agree with 220, then close before any TLS record.
STARTTLS_THEN_DROP = "220 2.0.0 go ahead (then drop)"
#: A STARTTLS script: agree with 220, then never answer the ClientHello.
STARTTLS_THEN_STALL = "220 2.0.0 go ahead (then stall)"


@dataclass
class Received:
    mail_from: str
    mail_options: list[str]
    rcpt_tos: list[str]
    #: The message bytes as received, after dot-unstuffing.
    data: bytes
    #: TLS version of the session, or None for plaintext.
    tls: str | None
    #: Connection number (1-based) that carried the message.
    connection: int


@dataclass
class _Script:
    replies: dict[str, list[str] | str] = field(default_factory=dict)

    def take(self, *keys: str) -> str | None:
        for key in keys:
            value = self.replies.get(key)
            if value is None:
                continue
            if isinstance(value, str):
                return value
            if value:
                return value.pop(0)
        return None


class _SinkSMTP(SMTP):
    def __init__(self, sink: Sink, number: int, **kwargs: Any) -> None:
        super().__init__(sink, **kwargs)
        self.sink = sink
        self.number = number
        self._greeted = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.sink._open.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self.sink._open.discard(self)
        super().connection_lost(error)

    def _getparams(self, params: Any) -> Any:
        result = super()._getparams(params)
        if result is not None and self.sink.requiretls:
            result.pop("REQUIRETLS", None)
        return result

    def tls_version(self) -> str | None:
        obj = self.transport.get_extra_info("ssl_object") if self.transport else None
        return obj.version() if obj is not None else None

    async def push(self, status: str) -> None:
        if not self._greeted:
            self._greeted = True
            scripted = self.sink.script.take("GREETING")
            if scripted is not None:
                if scripted != "drop":
                    await super().push(scripted)
                assert self.transport is not None
                self.transport.close()
                return
        await super().push(status)

    async def _scripted(self, command: str, arg: str | None) -> bool:
        """Answer from the script if it has a reply; True when it did."""
        arg = arg or ""
        self.sink.lines.append(f"{command} {arg}".strip())
        if self._reader._buffer:  # type: ignore[attr-defined]
            self.sink.grouped.append(command)
        address = arg.partition(":")[2].strip().split(" ")[0].strip("<>")
        if command == "MAIL" and not address:
            address = "<>"
        reply = self.sink.script.take(f"{command} {address}", command)
        if reply is None:
            return False
        if reply == "drop":
            assert self.transport is not None
            self.transport.close()
        else:
            await super().push(reply)
        return True

    async def smtp_EHLO(self, arg: str) -> None:
        if not await self._scripted("EHLO", arg):
            await super().smtp_EHLO(arg)

    async def smtp_MAIL(self, arg: str) -> None:
        if not await self._scripted("MAIL", arg):
            await super().smtp_MAIL(arg)

    async def smtp_RCPT(self, arg: str) -> None:
        if not await self._scripted("RCPT", arg):
            await super().smtp_RCPT(arg)

    async def smtp_STARTTLS(self, arg: str) -> None:
        reply = self.sink.script.take("STARTTLS")
        if reply is None:
            await super().smtp_STARTTLS(arg)
            return
        self.sink.lines.append("STARTTLS")
        await super().push(reply)
        if reply == STARTTLS_THEN_DROP and self.transport is not None:
            self.transport.close()
        elif reply == STARTTLS_THEN_STALL:
            # Swallow the ClientHello and never answer it.
            while await self._reader.read(4096):
                pass
        elif reply.startswith("220") and self.transport is not None:
            # Agree, wait for the ClientHello, then answer it with plaintext:
            # the client's handshake fails with an OpenSSL error (a verdict).
            # Closing at once instead would only look like a dropped connection.
            with contextlib.suppress(TimeoutError, ConnectionError):
                await asyncio.wait_for(self._reader.read(1), 5)
            self.transport.write(b"this is not TLS\r\n")
            self.transport.close()

    async def smtp_RSET(self, arg: str) -> None:
        if not await self._scripted("RSET", arg):
            await super().smtp_RSET(arg)

    async def smtp_QUIT(self, arg: str) -> None:
        self.sink.lines.append("QUIT")
        await super().smtp_QUIT(arg)


class Sink:
    """An SMTP server on 127.0.0.1:``port`` that records what it receives."""

    def __init__(
        self,
        *,
        tls_context: ssl.SSLContext | None = None,
        replies: Mapping[str, Script] | None = None,
        hostname: str = "sink.test",
        smtputf8: bool = True,
        pipelining: bool = False,
        port: int = 0,
        requiretls: bool = False,
    ) -> None:
        #: STARTTLS is offered exactly when a context is given.
        self.tls_context = tls_context
        self.script = _Script(
            {k: list(v) if isinstance(v, list) else v for k, v in (replies or {}).items()}
        )
        self.hostname = hostname
        self.smtputf8 = smtputf8
        self.pipelining = pipelining
        self.requiretls = requiretls
        self.grouped: list[str] = []
        self.messages: list[Received] = []
        self.lines: list[str] = []
        self.sessions_tls: list[str | None] = []
        self.connections = 0
        #: The port to listen on (0: any free one), then the one listened on.
        self.port = port
        self._server: asyncio.base_events.Server | None = None
        self._open: set[_SinkSMTP] = set()

    def _factory(self) -> _SinkSMTP:
        self.connections += 1
        return _SinkSMTP(
            self,
            self.connections,
            hostname=self.hostname,
            tls_context=self.tls_context,
            enable_SMTPUTF8=self.smtputf8,
            timeout=30,
            loop=asyncio.get_running_loop(),
            **self._smtp_options(),
        )

    def _smtp_options(self) -> dict[str, Any]:
        """More keyword arguments for aiosmtpd's SMTP (a subclass adds AUTH, say)."""
        return {}

    async def start(self) -> Sink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def kill_connections(self) -> None:
        for proto in list(self._open):
            if proto.transport is not None:
                proto.transport.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            self.kill_connections()
            await self._server.wait_closed()
            self._server = None
        # Let the per-connection handler tasks see their connection_lost.
        for _ in range(3):
            await asyncio.sleep(0)

    async def __aenter__(self) -> Sink:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # --- aiosmtpd handler hooks -------------------------------------------

    async def handle_EHLO(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname
        if self.pipelining:
            responses.insert(1, "250-PIPELINING")
        if self.requiretls and session.ssl:
            responses.insert(-1, "250-REQUIRETLS")
        return responses

    async def handle_DATA(self, server: _SinkSMTP, session: Session, envelope: Envelope) -> str:
        reply = server.sink.script.take("DATA")
        server.sink.lines.append("DATA")
        if reply == "drop":
            assert server.transport is not None
            server.transport.close()
            return "421 4.3.0 dropping"
        if reply == "stall":
            # Never answer the final dot (until the connection closes).
            await asyncio.Event().wait()
        if reply is not None and reply.startswith("sleep "):
            await asyncio.sleep(float(reply.split()[1]))
        elif reply is not None:
            return reply
        content = envelope.original_content or b""
        self.messages.append(
            Received(
                mail_from=envelope.mail_from or "",
                mail_options=list(envelope.mail_options),
                rcpt_tos=list(envelope.rcpt_tos),
                data=content,
                tls=server.tls_version(),
                connection=server.number,
            )
        )
        return "250 2.0.0 OK queued"

    async def handle_MAIL(
        self,
        server: _SinkSMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        self.sessions_tls.append(server.tls_version())
        return "250 2.1.0 OK"


class StaticResolver:
    """A Resolver (relay.dns protocol) answering from dicts; for tests only."""

    def __init__(
        self,
        addresses: Mapping[str, list[str]] | None = None,
        mx: Mapping[str, list[tuple[int, str]]] | None = None,
    ) -> None:
        self._addresses = dict(addresses or {})
        self._mx = dict(mx or {})

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        if domain not in self._mx and domain not in self._addresses:
            raise errors.NoSuchDomain(domain)
        return list(self._mx.get(domain, []))

    async def addresses(self, name: str) -> list[str]:
        if name not in self._addresses:
            raise errors.NoSuchDomain(name)
        answer = self._addresses[name]
        if not answer:
            raise errors.NoRoute(name)
        return list(answer)
