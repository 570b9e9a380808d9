"""Inbound SMTP: the aiosmtpd listeners and sessions, spool before 250.

Implements the receiving side of RFC 5321 with SIZE (RFC 1870), 8BITMIME
(RFC 6152), SMTPUTF8 (RFC 6531), STARTTLS (RFC 3207) and DSN (RFC 3461).
The rules it applies live in modules of their own: the path grammar in
relay.addresses, the MAIL and RCPT parameters relay implements in
relay.params, recipient policy in relay.relaying, message checks and the
Received header in relay.content, the DATA reader in
relay.datareader, the spool write before ``250 queued as`` in
relay.intake. This module is the glue to aiosmtpd.

aiosmtpd is imported in this module only: the rest of relay does not depend on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import logging
import ssl
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from aiosmtpd.smtp import MISSING, SMTP, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relay import errors, events
from relay.addresses import POSTMASTER, AddressError, client_address, parse_path, valid_helo
from relay.admission import (
    Connections,
    MemoryBudget,
    RefusalLog,
    client_key,
    reserve_descriptors,
)
from relay.commandreader import CrlfCommandReader
from relay.config import Config, Listen
from relay.content import unstuff
from relay.datareader import REFUSAL_REASONS, read_data
from relay.dns import ReverseResolver, confirmed_name
from relay.envelope import Envelope
from relay.errors import Reply
from relay.intake import Intake, SpoolSpill, Transaction
from relay.listeners import Listeners, address_texts
from relay.metrics import CONNECTION_REFUSALS, REJECT_REASONS, Metrics
from relay.params import MAIL_PARAMETERS, RCPT_PARAMETERS, SessionParameters, ehlo_keywords
from relay.relaying import may_relay, recipient_reply
from relay.spool import Spool

#: The private members of aiosmtpd (pinned in pyproject.toml)
#: that this module reaches into; tests/unit/test_private_members.py checks
#: that each still exists. Beyond them, _Connection.smtp_DATA re-implements
#: aiosmtpd 1.4's smtp_DATA (same checks, same order) to read in blocks.
PRIVATE_MEMBERS = (
    # Overridden: swaps the class of aiosmtpd's live StreamReader for
    # CrlfCommandReader (strict command line endings, DATA timer).
    ("aiosmtpd.smtp", "SMTP._cb_client_connected"),
    # Overridden: the strict RFC 5321 path grammar instead of RFC 5322's.
    ("aiosmtpd.smtp", "SMTP._getaddr"),
    # Overridden: 421 before closing an idle session.
    ("aiosmtpd.smtp", "SMTP._timeout_cb"),
    # Called: restart the idle timer (per DATA block, after the spool write).
    ("aiosmtpd.smtp", "SMTP._reset_timeout"),
    # Called by smtp_DATA, as aiosmtpd's own does.
    ("aiosmtpd.smtp", "SMTP._set_post_data_state"),
    ("aiosmtpd.smtp", "SMTP._call_handler_hook"),
    # Read: the idle timer, cancelled during the spool write.
    ("aiosmtpd.smtp", "SMTP._timeout_handle"),
    # Read: TLS is already on (a second STARTTLS is refused).
    ("aiosmtpd.smtp", "SMTP._tls_protocol"),
    # Read and written: the session's stream (smtp_DATA reads it in
    # blocks, goodbye() writes 421 past push()).
    ("aiosmtpd.smtp", "SMTP._reader"),
    ("aiosmtpd.smtp", "SMTP._writer"),
)

# aiosmtpd answers some conditions itself with fixed texts; they are mapped
# here to our replies (and metric reasons), the one place where its wire
# texts are known. aiosmtpd is pinned in pyproject.toml, and
# tests/integration/test_inbound_smtp.py checks that aiosmtpd still says each of them.
_AIOSMTPD_REPLIES: dict[str, tuple[Reply, str]] = {
    "552 Error: message size exceeds fixed maximum message size": (
        errors.MESSAGE_TOO_BIG,
        "too_big",
    ),
    "553 5.1.3 Error: malformed address": (errors.MALFORMED_ADDRESS, "bad_address"),
    "500 Command line too long": (errors.LINE_TOO_LONG, "bad_syntax"),
    # An empty command line, or one that ended in a bare LF (CrlfCommandReader).
    "500 Error: bad syntax": (errors.BAD_COMMAND_LINE, "bad_syntax"),
}


class _Gate(asyncio.Protocol):
    """The protocol every accepted connection starts with: it asks
    :meth:`Inbound.admit` and hands the transport to the session, or
    leaves the refused connection closed."""

    def __init__(self, inbound: Inbound) -> None:
        self.inbound = inbound

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        try:
            conn = self.inbound.admit(transport)
        except Exception:
            # Never a half-open connection nobody serves.
            events.error("inbound_error", exc_info=True, error="admission failed")
            transport.abort()  # type: ignore[attr-defined]
            return
        if conn is not None:
            transport.set_protocol(conn)
            conn.connection_made(transport)


#: Per class, the names aiosmtpd's SMTP.__init__ looks up with dir() and
#: inspect.getmembers() on every connection (commands, AUTH mechanisms, hooks):
#: the session's and the handler's __dir__ give just these, so it no longer
#: getattrs every attribute (a quarter of a session's set-up cost).
_NAMES: dict[type, list[str]] = {}


def _aiosmtpd_names(cls: type) -> list[str]:
    if (names := _NAMES.get(cls)) is None:
        names = _NAMES[cls] = [n for n in dir(cls) if n.startswith(("smtp_", "auth_", "handle_"))]
    return names


class _Connection(SMTP):
    """One inbound session: aiosmtpd's SMTP with strict addresses and mapped replies."""

    def __dir__(self) -> Iterable[str]:
        return _aiosmtpd_names(type(self))

    def __init__(self, inbound: Inbound, config: Config, tls: ssl.SSLContext | None) -> None:
        # aiosmtpd keeps per-command size limits in a class-level dict that
        # every connection shares; give each connection its own.
        self.command_size_limits = collections.defaultdict(lambda: SMTP.command_size_limit)
        super().__init__(
            inbound.handler,
            hostname=config.server.hostname,
            ident="ESMTP relay",
            data_size_limit=config.server.max_message_size,
            enable_SMTPUTF8=True,
            decode_data=False,
            tls_context=tls,
            timeout=config.server.timeout,
            # We offer no AUTH; with no mechanisms left, smtp_AUTH refuses.
            auth_exclude_mechanism=("LOGIN", "PLAIN"),
            loop=asyncio.get_running_loop(),
        )
        self.inbound = inbound
        #: The [server] settings this connection started with (limits, timeouts).
        self.server = config.server
        #: loop.time() of the last timer reset for a DATA line.
        self._data_timer_reset = 0.0
        #: True from the end of DATA until its reply is sent (the spool write).
        self._timer_suspended = False
        #: The content of the DATA under way when it went to a temp file.
        self.data_spill: SpoolSpill | None = None
        #: Error replies (5xx) since the session began or last queued a message.
        self.errors = 0
        #: What the per-client connection limit counts this session under.
        self.client_key = ""
        #: Counted in Inbound.counts (until closed, or evicted for a new client).
        self.counted = True
        #: loop.time() since when the session waits for the client's next
        #: command; None while a command or a DATA phase is under way.
        self.waiting_since: float | None = None
        self._name_lookup: asyncio.Task[str | None] | None = None
        self._name_known = False
        #: The client's forward-confirmed reverse DNS name, once known.
        self.client_name: str | None = None
        #: The MAIL and RCPT parameters relay implements (relay.params).
        self.parameters = SessionParameters()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.inbound.opened(self)
        if self._name_lookup is None:  # not again after STARTTLS
            resolver = self.inbound.resolver()
            assert self.session is not None
            addr = client_address(_peer_ip(self.session))
            ip = str(addr or "")
            if addr is not None and addr.is_loopback and not self.inbound.look_up_loopback:
                self.client_name = "localhost"
            elif isinstance(resolver, ReverseResolver) and ip:
                # Looked up while the client talks; DATA waits for what is left of it.
                self._name_lookup = self.loop.create_task(
                    confirmed_name(resolver, ip, self.server.reverse_dns_timeout)
                )

    def connection_lost(self, error: Exception | None) -> None:
        self.inbound.closed(self)
        if self._name_lookup is not None:
            self._name_lookup.cancel()
        super().connection_lost(error)

    async def _wait_client_name(self) -> None:
        """The confirmed name (or None) for the Received header: at most
        ``reverse_dns_timeout`` after the connection was made, in all."""
        if self._name_lookup is not None and not self._name_known:
            try:
                self.client_name = await self._name_lookup
            except Exception:
                # Only a name for a trace header: never a reason to refuse mail.
                events.error("client_name_failed", exc_info=True)
            self._name_known = True

    def _cb_client_connected(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        # The reader aiosmtpd created, made strict about command line endings.
        reader.__class__ = CrlfCommandReader
        assert isinstance(reader, CrlfCommandReader)
        reader.on_data_line = self._data_line
        reader.on_command = self._command_read
        super()._cb_client_connected(reader, writer)

    def _command_read(self) -> None:
        self.waiting_since = None

    def _data_line(self) -> None:
        # aiosmtpd resets the idle timer per command only, so [server]
        # timeout would bound the whole DATA phase: a big message on a slow
        # link got 421 mid-data. RFC 5321 section 4.5.3.2 times each data
        # block instead; reset per line received, at most every tenth of
        # the timeout (no timer churn on a fast 35 MB upload).
        now = self.loop.time()
        if now - self._data_timer_reset >= self.server.timeout / 10:
            self._data_timer_reset = now
            self._reset_timeout()

    def suspend_timeout(self) -> None:
        """Stop the idle timer until the next reply is sent (the spool write).

        RFC 5321 section 4.5.3.2: the client waits 10 minutes for the reply
        to the final dot. A timer firing during the write would drop a
        session whose message is queued anyway; the client would resend it.
        """
        self._timer_suspended = True
        if self._timeout_handle is not None:
            self._timeout_handle.cancel()

    @syntax("DATA")
    async def smtp_DATA(self, arg: str) -> None:
        """aiosmtpd 1.4's smtp_DATA, re-implemented to read the content in
        blocks (:func:`relay.datareader.read_data`).

        Same order of checks, same replies (mapped by push()), same hook;
        the refusals of the content (too big, a line too long) are ours.
        """
        if await self.check_helo_needed():
            return
        if await self.check_auth_needed("DATA"):
            return
        assert self.envelope is not None
        if not self.envelope.rcpt_tos:
            await self.push("503 Error: need RCPT command")
            return
        if arg:
            await self.push("501 Syntax: DATA")
            return
        await self._wait_client_name()
        await self.push("354 End data with <CR><LF>.<CR><LF>")
        reader = self._reader
        assert isinstance(reader, CrlfCommandReader)
        envelope, session = self.envelope, self.session
        assert session is not None
        spill = SpoolSpill(
            lambda: self.inbound.intake.begin(transaction(self, session, envelope)),
            self.inbound.intake.spool,
            self.inbound.memory,
        )
        try:
            status = await self._receive(reader, spill)
        except asyncio.CancelledError:
            # The connection was lost during DATA (aiosmtpd cancels us).
            self._writer.close()
            raise
        finally:
            # Refused, dropped or spooled: no temp file outlives the DATA
            # (once put_async took it, this is a no-op).
            spill.discard()
            spill.release()
            self.data_spill = None
        if status is None:  # end of stream
            self._writer.close()
            return
        await self.push(status)

    async def _receive(self, reader: CrlfCommandReader, spill: SpoolSpill) -> Any:
        """Read the content and run the DATA hook: the reply, None at end of stream."""
        assert self.envelope is not None
        # The idle timer restarts with every block, so it alone would let a
        # client trickle a byte a second for hours, holding the session and
        # its buffer: the whole DATA phase has a deadline too.
        deadline = self.loop.call_later(self.server.data_timeout, self._data_too_slow)
        try:
            raw, refusal = await read_data(
                reader, self.data_size_limit, self.line_length_limit, spill
            )
        finally:
            deadline.cancel()
        if raw is None:
            if refusal is None:
                return None
            self.inbound.rejected(REFUSAL_REASONS[refusal], self.session, "-", reply=refusal)
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return str(refusal)
        content = unstuff(raw)
        del raw
        self.envelope.content = self.envelope.original_content = content
        self.data_spill = spill if spill.started else None
        status = await self._call_handler_hook("DATA")
        self._set_post_data_state()  # type: ignore[no-untyped-call]
        return "250 OK" if status is MISSING else status

    @syntax("STARTTLS", when="tls_context")
    async def smtp_STARTTLS(self, arg: str) -> None:
        if self._tls_protocol is not None:
            # RFC 3207 section 4: no second STARTTLS inside TLS. aiosmtpd
            # would answer 220 and fail with a traceback; Postfix says 554.
            self.inbound.rejected("bad_syntax", self.session, "STARTTLS")
            await self.push(str(errors.TLS_ALREADY_ACTIVE))
            return
        await super().smtp_STARTTLS(arg)

    @syntax("MAIL FROM: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_MAIL(self, arg: str | None) -> None:
        self.parameters.table = MAIL_PARAMETERS
        self.parameters.tls = self._tls_protocol is not None
        await super().smtp_MAIL(arg)

    @syntax("RCPT TO: <address>", extended=" [SP <mail-parameters>]")
    async def smtp_RCPT(self, arg: str | None) -> None:
        self.parameters.table = RCPT_PARAMETERS
        await super().smtp_RCPT(arg)

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Replaces aiosmtpd's RFC 5322 header parser (comments, obsolete
        # syntax, CFWS) with the strict RFC 5321 path grammar. None makes
        # aiosmtpd answer its malformed-address reply, mapped to 501 5.1.3.
        try:
            mailbox, params = parse_path(arg)
        except AddressError:
            return None, None
        # The parameters relay implements are taken off here, before
        # aiosmtpd refuses what it does not know (555), with their case
        # (aiosmtpd upper-cases; xtext is case-sensitive). The hook refuses
        # a bad one (501 5.5.4).
        return mailbox, self.parameters.take(params)

    async def push(self, status: Any) -> None:
        text = status.decode("utf-8", "replace") if isinstance(status, bytes) else str(status)
        mapped = _AIOSMTPD_REPLIES.get(text)
        if mapped is not None:
            # aiosmtpd answered on its own (no hook ran): count and log it here.
            self.inbound.rejected(mapped[1], self.session, "-", reply=mapped[0])
            status = str(mapped[0])
        elif text.startswith("500 Error: ("):
            # aiosmtpd's exception reply carries the exception text; it must
            # never reach a client even if handle_exception itself failed.
            status = str(errors.INTERNAL_ERROR)
        error = text[:1] == "5"
        server = self.server
        if error:
            self.errors += 1
            if self.errors > server.soft_error_limit:
                # Postfix's smtpd_error_sleep_time: a harvester (RCPT after
                # RCPT for unknown users) gets slower with each try.
                await asyncio.sleep(server.error_delay)
        elif text.startswith("250 2.0.0 Ok: queued"):
            # A message was queued: the client is doing real work (Postfix
            # counts errors "without delivering mail").
            self.errors = 0
        await super().push(status)
        # After any reply but 354 (DATA goes on) the client's turn is a command.
        self.waiting_since = None if text[:1] == "3" else self.loop.time()
        if error and self.errors >= server.hard_error_limit:
            self.inbound.rejected("too_many_errors", self.session, "-", errors=self.errors)
            self.goodbye(errors.TOO_MANY_ERRORS)
        if self._timer_suspended:
            self._timer_suspended = False
            if self.transport is not None:
                self._reset_timeout()

    def _data_too_slow(self) -> None:
        self.inbound.rejected("data_timeout", self.session, "DATA")
        self.goodbye(errors.DATA_TIMEOUT)

    def _timeout_cb(self) -> None:
        # RFC 5321 section 4.5.3.2: say why before closing an idle session.
        self.goodbye(errors.IDLE_TIMEOUT)

    def goodbye(self, reply: Reply) -> None:
        """Send ``reply`` (421) and close the connection, whatever the state."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        with contextlib.suppress(ConnectionError, RuntimeError, AttributeError):
            self._writer.write(f"{reply}\r\n".encode())
        transport.close()
        if isinstance(self._reader, CrlfCommandReader):
            self._reader.closed = True


def _peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


def transaction(server: SMTP, session: Session, envelope: SmtpEnvelope) -> Transaction:
    """What relay.intake needs to know of the message aiosmtpd is receiving."""
    ssl_info = session.ssl
    return Transaction(
        peer=_peer_ip(session),
        helo=session.host_name or "",
        esmtp=bool(session.extended_smtp),
        cipher=ssl_info.get("cipher") if ssl_info else None,
        hostname=server.hostname,
        client_name=server.client_name if isinstance(server, _Connection) else None,
        mail_from=envelope.mail_from or "",
        recipients=tuple(envelope.rcpt_tos),
        smtputf8=envelope.smtp_utf8,
        body_8bit="BODY=8BITMIME" in envelope.mail_options,
        mail_parameters=_parameters(server).mail,
        rcpt_parameters=_parameters(server).rcpt,
    )


def _parameters(server: SMTP) -> SessionParameters:
    return server.parameters if isinstance(server, _Connection) else SessionParameters()


_RCPT_REASONS = {
    errors.RELAYING_DENIED: "relaying_denied",
    errors.NO_ROUTE: "no_route",
    errors.ROUTING_CHARACTERS: "routing_characters",
}


class _Handler:
    """The aiosmtpd hooks: policy at each command, checks and spool at DATA."""

    def __dir__(self) -> Iterable[str]:
        return _aiosmtpd_names(type(self))

    def __init__(self, inbound: Inbound) -> None:
        self.inbound = inbound

    async def handle_HELO(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope, hostname: str
    ) -> str:
        if not valid_helo(hostname):
            self.inbound.rejected("bad_syntax", session, "HELO")
            return str(errors.BAD_HELO)
        session.host_name = hostname
        return f"250 {server.hostname}"

    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        if not valid_helo(hostname):
            self.inbound.rejected("bad_syntax", session, "EHLO")
            return [str(errors.BAD_HELO)]
        session.host_name = hostname
        # aiosmtpd lists SIZE, 8BITMIME, SMTPUTF8 and STARTTLS (when a
        # context is set); drop its AUTH line, we offer no authentication.
        lines = [line for line in responses if not line[4:].startswith("AUTH")]
        # Their own: DSN (RFC 3461) and, over TLS, REQUIRETLS (relay.params).
        ours = [f"250-{keyword}" for keyword in ehlo_keywords(bool(session.ssl))]
        # One item, so aiosmtpd pushes the whole reply in one write: a line
        # each was a send() and a TCP segment each (6 where Postfix sends 1).
        return ["\r\n".join(lines[:-1] + ours + lines[-1:])]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        if address.lower() == POSTMASTER:
            # A reverse-path needs a domain; only RCPT has the special case.
            self.inbound.rejected("bad_address", session, "MAIL")
            return str(errors.MALFORMED_ADDRESS)
        if not address.isascii() and "SMTPUTF8" not in mail_options:
            # RFC 6531 section 3.4: non-ASCII addresses need SMTPUTF8.
            self.inbound.rejected("bad_address", session, "MAIL")
            return str(errors.NON_ASCII_ADDRESS)
        parameters = _parameters(server)
        if parameters.error:
            reply = parameters.reply
            self.inbound.rejected(
                "bad_syntax", session, "MAIL", reply=reply, error=parameters.error
            )
            return str(reply)
        parameters.mail_accepted()
        # With a hook, aiosmtpd leaves recording the sender to us.
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return str(errors.SENDER_OK)

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        config = self.inbound.config()
        reply: Reply
        reason = ""
        if address.lower() == POSTMASTER:
            # The relay's own postmaster: the first domain it serves.
            address = f"postmaster@{config.server.domains[0]}"
        if address == "<>":
            reply, reason = errors.MALFORMED_ADDRESS, "bad_address"
        elif _parameters(server).error:
            reply, reason = errors.BAD_PARAMETER, "bad_syntax"
        elif not address.isascii() and not envelope.smtp_utf8:
            reply, reason = errors.NON_ASCII_ADDRESS, "bad_address"
        elif len(envelope.rcpt_tos) >= config.server.max_recipients:
            reply, reason = errors.TOO_MANY_RECIPIENTS, "too_many_recipients"
        else:
            reply = recipient_reply(config, _peer_ip(session), address, envelope.mail_from or "")
            reason = _RCPT_REASONS.get(reply, "")
        if reason:
            self.inbound.rejected(reason, session, "RCPT", rcpt=address, reply=reply)
            return str(reply)
        # With a hook, aiosmtpd leaves recording the recipient to us. A
        # repeated recipient is acknowledged but delivered once.
        if address not in envelope.rcpt_tos:
            envelope.rcpt_tos.append(address)
            envelope.rcpt_options.extend(rcpt_options)
            _parameters(server).rcpt_accepted(address)
        return str(reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        spill = None
        if isinstance(server, _Connection):
            server.suspend_timeout()
            spill = server.data_spill

        def reject(reason: str, **fields: Any) -> None:
            self.inbound.rejected(reason, session, "DATA", **fields)

        tx = transaction(server, session, envelope)
        content = envelope.original_content or b""
        return str(await self.inbound.intake.accept(tx, content, spill, reject))

    async def handle_exception(self, error: Exception) -> str:
        # Never aiosmtpd's default "500 Error: (Class) text": no internals
        # to the client, the traceback to our log.
        events.error("inbound_error", exc_info=True, error=type(error).__name__)
        return str(errors.INTERNAL_ERROR)


# aiosmtpd's SMTP.__init__ reads the EHLO hook's inspect.signature() on every
# connection (to tell its old four-argument form from this one): 16 µs a
# session. A signature set on the function is returned as it is (5 µs).
_Handler.handle_EHLO.__signature__ = inspect.signature(_Handler.handle_EHLO)  # type: ignore[attr-defined]


# --- the server ---------------------------------------------------------------


class Inbound:
    """Listens on every ``[server] listen`` address and spools what it accepts.

    ``config`` is called at every command, so a reload applies to open
    sessions at once (except per-connection settings: size limit,
    timeouts, error limits, hostname and TLS, which new connections pick
    up). ``on_accept`` is called with each envelope after its spool write,
    and the stored body's parts (the scheduler's ``add``; see
    :class:`relay.intake.Intake`); inbound never delivers. Every new
    connection first passes :meth:`admit` (the connection limits);
    ``resolver`` names clients in the Received header.
    """

    def __init__(
        self,
        config: Callable[[], Config],
        spool: Spool,
        metrics: Metrics,
        on_accept: Callable[[Envelope, Sequence[bytes]], None],
        *,
        tls_context: Callable[[], ssl.SSLContext | None] = lambda: None,
        clock: Callable[[], float] = time.time,
        resolver: Callable[[], object] = lambda: None,
        look_up_loopback: bool = False,
    ) -> None:
        self.config = config
        #: For the client's name in the Received header: a ReverseResolver
        #: (or anything else: no look-up).
        self.resolver = resolver
        #: Loopback clients are this machine, named ``localhost`` without a
        #: query (as /etc/hosts would; RFC 6761 section 6.3), unless this is
        #: set (the tests, whose DNS server serves 127.0.0.x).
        self.look_up_loopback = look_up_loopback
        self.metrics = metrics
        #: Checks, spools and schedules each message (the reply to the final dot).
        self.intake = Intake(spool, metrics, on_accept, clock)
        self.tls_context = tls_context
        self.handler = _Handler(self)
        self.connections: set[_Connection] = set()
        self.listeners = Listeners(self._connection)
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        #: Open sessions per client, for [server] max_connections(_per_ip).
        self.counts = Connections()
        self._refusal_log = RefusalLog(time.monotonic)
        metrics.inbound_connections.set_function(lambda: self.counts.total)
        #: Message bytes all sessions hold in memory, for [server] max_memory.
        self.memory = MemoryBudget(self.config().server.max_memory)
        metrics.inbound_memory.set_function(lambda: self.memory.held)

    def admit(self, transport: asyncio.BaseTransport) -> _Connection | None:
        """A session for a new connection, or None when a limit refuses it.

        Refused: ``421 4.7.0`` and the connection is closed at once,
        before any session exists (no greeting, no parser, no timer).
        """
        config = self.config()
        peer = transport.get_extra_info("peername")
        ip = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        key = client_key(ip)
        reason = self.counts.refusal(config.server, key, may_relay(config.server, ip))
        if reason == "max_connections" and self._evict_idlest(config.server.busy_timeout):
            reason = None
        if reason is not None:
            assert reason in CONNECTION_REFUSALS
            reply = errors.TOO_MANY_CONNECTIONS
            if reason == "max_connections_per_ip":
                reply = errors.TOO_MANY_FROM_YOU
            with contextlib.suppress(ConnectionError, RuntimeError):
                transport.write(f"{reply}\r\n".encode())  # type: ignore[attr-defined]
            transport.close()
            self.metrics.connections_refused.labels(reason).inc()
            self._refusal_log.refused(key, ip, reason, self.counts.total)
            return None
        self.memory.limit = config.server.max_memory
        conn = _Connection(self, config, self.tls_context())
        conn.client_key = key
        self.counts.add(key)
        return conn

    def _evict_idlest(self, busy_timeout: float) -> bool:
        """Every session is taken: close the one that has waited longest for
        its client's next command, if that is over ``busy_timeout`` (as
        Postfix's stress mode cuts its timeout when all its servers are
        busy), so idle connections cannot lock out a client with mail."""
        now = asyncio.get_running_loop().time()
        waiting = [
            (conn.waiting_since, conn)
            for conn in self.connections
            if conn.counted and conn.waiting_since is not None
        ]
        if not waiting:
            return False
        since, idlest = min(waiting, key=lambda pair: pair[0])
        if now - since < busy_timeout:
            return False
        # Not counted from now on: its place goes to the new client at once.
        idlest.counted = False
        self.counts.remove(idlest.client_key)
        self.rejected("busy_timeout", idlest.session, "-", idle=round(now - since, 1))
        idlest.goodbye(errors.BUSY_TIMEOUT)
        return True

    def opened(self, conn: _Connection) -> None:
        self.connections.add(conn)
        self._all_closed.clear()

    def closed(self, conn: _Connection) -> None:
        if conn in self.connections:
            self.connections.discard(conn)
            if conn.counted:
                conn.counted = False
                self.counts.remove(conn.client_key)
        if not self.connections:
            self._all_closed.set()

    async def start(self) -> None:
        """Bind every listen address; raises OSError if one cannot be bound."""
        # Every refusal is our own log event; aiosmtpd's per-command chatter is not.
        logging.getLogger("mail.log").setLevel(logging.ERROR)
        reserve_descriptors(self.config().server.max_connections)
        try:
            for listen in self.config().server.listen:
                await self.listeners.bind(listen)
        except OSError:
            await self.stop(0)
            raise

    async def relisten(self, listens: Sequence[Listen]) -> tuple[list[Listen], list[Listen]]:
        """:meth:`relay.listeners.Listeners.relisten`: a reload changed ``[server] listen``."""
        return await self.listeners.relisten(listens)

    def _connection(self) -> asyncio.Protocol:
        return _Gate(self)

    @property
    def servers(self) -> list[asyncio.Server]:
        return self.listeners.servers

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs, e.g. to find a port chosen by the OS."""
        return self.listeners.addresses

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; let spool writes in progress finish (within ``grace``
        seconds) so their 250 goes out; then answer 421 to every open
        session and close it. Everything spooled stays spooled."""
        self.listeners.close()
        try:
            await asyncio.wait_for(self.intake.writes_done.wait(), grace)
        except TimeoutError:
            events.warning("shutdown_spool_write_pending", writes=self.intake.writes)
        for conn in list(self.connections):
            conn.goodbye(errors.SHUTTING_DOWN)
        with contextlib.suppress(TimeoutError):
            # Closing is immediate; this only lets connection_lost run.
            await asyncio.wait_for(self._all_closed.wait(), 1.0)
        # Let cancelled session tasks finish unwinding.
        await asyncio.sleep(0)

    def rejected(self, reason: str, session: Session | None, command: str, **fields: Any) -> None:
        """Count and log one refusal (``reason`` from metrics.REJECT_REASONS)."""
        if reason not in REJECT_REASONS:
            # A closed label set (README.md "Metrics and health"); every path is exercised by tests.
            raise ValueError(f"unknown reject reason {reason!r}")
        self.metrics.messages_rejected.labels(reason=reason).inc()
        ip = _peer_ip(session) if session is not None else ""
        extra: dict[str, Any] = {k: str(v) for k, v in fields.items()}
        events.log("rejected", reason=reason, command=command, client=ip, **extra)


def listen_texts(inbound: Inbound) -> Iterable[str]:
    """The bound addresses as host:port text, for the start-up log."""
    return address_texts(inbound.addresses)
