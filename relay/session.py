"""The outbound SMTP wire, the one module that imports aiosmtplib (RFC 5321, RFC 3207, RFC 2920).

What the rest of relay asks of a next hop, and nothing more:

- :func:`open_hop`: connect, EHLO, STARTTLS under the hop's TLS policy
  (with the opportunistic plaintext fallback, RFC 7435), AUTH (RFC 4954);
  :func:`open_session` and :func:`start_tls` are its steps, for ``relay test-tls``;
- :func:`send_mail`: one mail transaction, pipelined when the server offers
  PIPELINING, else lock-step, with the body streamed from memory or its file;
- :func:`reset` (RSET on a pooled session) and :func:`quit_session`.

aiosmtplib keeps the connection, EHLO, STARTTLS and AUTH. The transaction
writes to aiosmtplib's protocol and reads its replies directly, past the
SMTP object's command lock (a session serves one task at a time: the pool
hands it out once), reaching into the members :data:`PRIVATE_MEMBERS` lists
(pyproject.toml pins the versions they were checked with). aiosmtplib's
exceptions become relay's failures here and nowhere else.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
from aiosmtplib.email import quote_address
from aiosmtplib.protocol import SMTPProtocol

from relay import certificate, errors, events, tls
from relay.certificate import distinguished_name
from relay.config import Config, RouteAuth, TlsPolicy
from relay.envelope import Envelope
from relay.errors import RelayError, Reply, TlsCheck, TlsFailure, TlsPolicyFailure
from relay.hop import Hop
from relay.params import mail_options, rcpt_options
from relay.spoolbody import Body, BodyFile

#: aiosmtplib internals this module uses, checked by tests/unit/test_private_members.py.
PRIVATE_MEMBERS = (
    # Replies to a pipelined group read from the buffer (:func:`_reply_in_buffer`).
    ("aiosmtplib.protocol", "SMTPProtocol._read_response_from_buffer"),
    # Waiting for room in the transport while streaming a body (:func:`_drained`).
    ("aiosmtplib.protocol", "FlowControlMixin._drain_helper"),
)

# --- exception mapping (guarded by tests/unit/test_delivery_errors.py) ----------


class StaleSession(Exception):
    """A pooled session was found closed by the server before its first reply:
    nothing of the transaction reached the host; use another session."""


@contextlib.contextmanager
def map_smtp_errors() -> Iterator[None]:
    """Turn every aiosmtplib (and ssl/OS) exception into a RelayError.

    The one place that knows aiosmtplib's exception hierarchy (like httpx's
    map_httpcore_exceptions). Order matters: subclasses first. Outside a
    TLS handshake an ssl.SSLError is a lost connection (TLS is settled by
    then); :func:`map_handshake_errors` is the mapper for the handshake.
    """
    try:
        yield
    except (RelayError, StaleSession):
        raise
    except aiosmtplib.SMTPConnectResponseError as exc:
        # A 4xx/5xx greeting means "not now, not here": try the next host.
        raise errors.HostUnreachable(f"greeting {exc.code} {exc.message}") from exc
    except (aiosmtplib.SMTPConnectTimeoutError, aiosmtplib.SMTPConnectError) as exc:
        raise errors.HostUnreachable(str(exc)) from exc
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
        raise errors.ConnectionLost(str(exc)) from exc
    except aiosmtplib.SMTPRecipientsRefused as exc:
        first = exc.recipients[0] if exc.recipients else None
        if first is None:
            raise errors.TemporaryFailure("recipients refused") from exc
        raise errors.remote_failure(first.code, first.message) from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise errors.remote_failure(exc.code, exc.message) from exc
    except ssl.SSLError as exc:
        raise errors.ConnectionLost(f"TLS: {tls.describe_failure(exc)}") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise errors.ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        # aiosmtplib.SMTPException (generic), SMTPNotSupported, bugs: never
        # lose the message over them; defer and keep the traceback.
        events.error("delivery_error", exc_info=True, error=repr(exc))
        raise errors.TemporaryFailure(repr(exc), errors.INTERNAL_ERROR) from exc


@contextlib.contextmanager
def map_handshake_errors() -> Iterator[None]:
    """:func:`map_smtp_errors` for a TLS handshake (and a session that requires TLS).

    An ssl.SSLError that is OpenSSL's verdict on the peer (a certificate
    error, an alert, a protocol mismatch) is a TLS-policy failure rather
    than a lost connection; the peer closing or resetting the connection
    mid-handshake is never a verdict (:func:`tls.interrupted`).
    """
    with map_smtp_errors():
        try:
            yield
        except ssl.SSLError as exc:
            if tls.interrupted(exc):
                raise
            raise TlsPolicyFailure(tls.classify(exc), tls.describe_failure(exc)) from exc


@dataclass(slots=True)
class Session:
    """One open SMTP connection, after EHLO (and STARTTLS when it happened)."""

    smtp: aiosmtplib.SMTP
    hop: Hop
    tls_version: str | None = None
    cipher: str | None = None
    verified: bool = False
    peer_subject: str | None = None
    #: The verified certificate's notAfter, Unix seconds (None unless ``verified``).
    not_after: float | None = None
    #: The server listed STARTTLS in its EHLO reply (whether or not it was used).
    starttls_offered: bool = False
    #: The SASL mechanism the session authenticated with ("" without AUTH).
    auth_mechanism: str = ""
    idle_since: float = field(default_factory=time.monotonic)
    #: The pool's timer that closes this session once idle too long.
    expiry: asyncio.TimerHandle | None = None

    @property
    def connected(self) -> bool:
        return self.smtp.is_connected

    @property
    def pipelining(self) -> bool:
        """The server offers PIPELINING (RFC 2920)."""
        return self.smtp.supports_extension("pipelining")

    def peer_certificate(self) -> bytes | None:
        """The certificate of the TLS session in DER, whether or not it verified."""
        der: bytes | None = _transport_info(self.smtp, "ssl_object", lambda o: o.getpeercert(True))
        return der

    def close(self) -> None:
        self.smtp.close()


class HandshakeFailed(Exception):
    """STARTTLS failed at a host; opportunistic delivery falls back to plaintext.

    ``failure`` is a TlsPolicyFailure for a verdict on the host's TLS, or a
    temporary failure (4xx to STARTTLS, connection dropped or timed out).
    """

    def __init__(self, failure: RelayError) -> None:
        super().__init__(failure.detail)
        self.failure = failure


# --- opening a session --------------------------------------------------------


async def open_hop(
    hop: Hop, cfg: Config, qid: str | None = None, read_certificate: bool = True
) -> Session:
    """A session ready for mail: :func:`open_session` with STARTTLS under the hop's policy.

    Opportunistic (RFC 7435): a failed handshake must not stop the mail;
    the same host again, in plaintext, logged as ``tls_fallback`` with the
    queue id ``qid`` (no log without one). When the policy requires TLS,
    the handshake's failure is raised (``__cause__``: :class:`HandshakeFailed`).
    """
    try:
        return await open_session(hop, cfg, starttls=True, read_certificate=read_certificate)
    except HandshakeFailed as exc:
        if tls.enforces(hop.policy, TlsCheck.TLS):
            raise exc.failure from exc
        if qid is not None:
            ident = {"id": qid} if qid else {}
            events.warning(
                "tls_fallback", **ident, host=hop.name, ip=hop.ip, port=hop.port,
                error=exc.failure.detail,
            )  # fmt: skip
        return await open_session(hop, cfg, starttls=False)


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, falling back to HELO when EHLO is refused (RFC 5321 section 3.2)."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if exc.code // 100 != 5 or not smtp.is_connected:
            raise
        await smtp.helo()


async def open_session(
    hop: Hop, cfg: Config, starttls: bool, read_certificate: bool = True
) -> Session:
    """Connect and EHLO; STARTTLS per the hop's policy when ``starttls``.

    With credentials in the hop, then AUTH (:func:`authenticate`).
    Raises a RelayError when the host fails (:class:`~relay.errors.AuthFailed`
    when AUTH did), :class:`HandshakeFailed` when only the STARTTLS upgrade
    did; the connection is closed either way. ``read_certificate``: see
    :func:`start_tls`.
    """
    smtp = aiosmtplib.SMTP(
        hostname=hop.ip,
        port=hop.port,
        local_hostname=cfg.server.hostname,
        start_tls=False,
        use_tls=False,
        timeout=cfg.delivery.command_timeout,
    )
    session = Session(smtp, hop)
    try:
        # Plaintext so far: no TLS verdict can come of it.
        with map_smtp_errors():
            await smtp.connect(timeout=cfg.delivery.connect_timeout)
            await _hello(smtp)
        session.starttls_offered = smtp.supports_extension("starttls")
        if starttls:
            await start_tls(session, hop.policy, cfg, read_certificate)
        if hop.auth is not None:
            await authenticate(session, hop.auth, cfg)
    except BaseException:
        smtp.close()
        raise
    return session


#: The checks whose failure is about the certificate (its facts help fix it).
_CERTIFICATE_CHECKS = frozenset(
    {TlsFailure.UNTRUSTED_CA, TlsFailure.HOSTNAME_MISMATCH, TlsFailure.EXPIRED}
)


async def start_tls(
    session: Session, policy: TlsPolicy, cfg: Config, read_certificate: bool = True
) -> None:
    """STARTTLS under ``policy`` and EHLO again; record the TLS session's facts.

    ``read_certificate``: when a certificate check fails, connect once more
    without checks (no mail is sent) to read the certificate for the
    diagnosis: OpenSSL aborts the failed handshake before Python can see
    the certificate.
    """
    smtp = session.smtp
    if not smtp.supports_extension("starttls"):
        if session.hop.requiretls:
            raise errors.RequireTlsUnsupported(TlsFailure.NO_STARTTLS, "no STARTTLS")
        if tls.enforces(policy, TlsCheck.TLS):
            raise TlsPolicyFailure(TlsFailure.NO_STARTTLS)
        return
    context = tls.client_context(policy, cfg.tls.ca_file)
    try:
        with map_handshake_errors():
            # SNI and verification use the name delivered to, never the IP.
            await smtp.starttls(server_hostname=session.hop.name, tls_context=context)
    except TlsPolicyFailure as exc:
        if read_certificate and exc.reason in _CERTIFICATE_CHECKS:
            exc.certificate = await peek_certificate(session.hop, cfg)
        raise HandshakeFailed(exc) from exc
    except errors.RemotePermanent as exc:
        # A 5xx to STARTTLS: the host refuses TLS for good, a policy verdict.
        detail = f"STARTTLS refused: {exc.reply}"
        raise HandshakeFailed(TlsPolicyFailure(TlsFailure.HANDSHAKE, detail)) from exc
    except RelayError as exc:
        # A 4xx (RFC 3207 section 4: 454 is temporary), a dropped or reset
        # connection or a timeout during the upgrade say nothing about the
        # host's TLS: a temporary failure, deferred and moved on from.
        raise HandshakeFailed(exc) from exc
    # An alert read with the first reply after the handshake is still a
    # verdict on the host's TLS, when the policy requires TLS.
    required = tls.enforces(policy, TlsCheck.TLS)
    with map_handshake_errors() if required else map_smtp_errors():
        await _hello(smtp)
    if session.hop.requiretls and not smtp.supports_extension("requiretls"):
        # RFC 8689 section 4.2.1: relay never delivers finally; every next hop must offer it.
        raise errors.RequireTlsUnsupported(TlsFailure.HANDSHAKE, errors.REQUIRETLS_NOT_OFFERED)
    session.tls_version = _transport_info(smtp, "ssl_object", lambda o: o.version())
    session.cipher = _transport_info(smtp, "cipher", lambda c: c[0])
    session.verified = tls.enforces(policy, TlsCheck.CA_SIGNED)
    if session.verified:
        session.peer_subject = _transport_info(
            smtp, "peercert", lambda c: distinguished_name(c.get("subject"))
        )
        # getpeercert() decodes a certificate only once it verified: the
        # expiry early warning (relay.expiry) reads its notAfter here.
        session.not_after = _transport_info(smtp, "peercert", _not_after)


def _not_after(peercert: dict[str, Any]) -> float | None:
    text = peercert.get("notAfter")
    return ssl.cert_time_to_seconds(text) if text else None


#: SASL mechanisms relay speaks, most preferred first: CRAM-MD5 never sends
#: the password itself; PLAIN and LOGIN do (base64), so only over TLS.
AUTH_MECHANISMS = ("cram-md5", "plain", "login")


def auth_failed(auth: RouteAuth, host: str, why: str) -> errors.AuthFailed:
    """The failure of AUTH at ``host`` for ``auth``'s route: the reply (for the
    DSN) names the route; the detail (for the log) also the account and the fix."""
    text = f'Authentication to the next hop failed for route "{auth.route}": {why}'
    detail = (
        f'route "{auth.route}": AUTH as {auth.username!r} at {host} failed: {why}; '
        f"check auth.username and the password in {auth.password_file}"
    )
    return errors.AuthFailed(detail, Reply(451, (4, 7, 0), " ".join(text.split())))


def auth_mechanism(offered: Sequence[str]) -> str | None:
    """The mechanism to use of those the server ``offered`` (its EHLO AUTH line)."""
    names = {m.lower() for m in offered}
    return next((m for m in AUTH_MECHANISMS if m in names), None)


async def authenticate(session: Session, auth: RouteAuth, cfg: Config) -> None:
    """SMTP AUTH (RFC 4954) with ``auth``'s credentials, once, with one mechanism.

    Only on an encrypted session unless the route sets auth_over_plaintext.
    One mechanism is tried, not each in turn: a wrong password then counts
    once against the account, not three times. Raises AuthFailed.
    """
    smtp = session.smtp
    host = session.hop.name
    if session.tls_version is None and not auth.over_plaintext:
        why = "no TLS session, and the password is sent only over TLS"
        raise auth_failed(auth, host, f"{why} (the host did not offer STARTTLS or it failed)")
    if not smtp.supports_extension("auth"):
        raise auth_failed(auth, host, "the host does not offer AUTH")
    mechanism = auth_mechanism(smtp.server_auth_methods)
    if mechanism is None:
        offered = " ".join(smtp.server_auth_methods) or "none"
        raise auth_failed(auth, host, f"no mechanism in common (host offers {offered})")
    method = {
        "cram-md5": smtp.auth_crammd5,
        "plain": smtp.auth_plain,
        "login": smtp.auth_login,
    }[mechanism]
    with map_smtp_errors():
        try:
            await method(auth.username, auth.password, timeout=cfg.delivery.command_timeout)
        except aiosmtplib.SMTPAuthenticationError as exc:
            reply = " ".join(f"{exc.code} {exc.message}".split())
            raise auth_failed(auth, host, f"{mechanism.upper()} refused: {reply}") from exc
    session.auth_mechanism = mechanism


#: Encrypt without checks: how a failed certificate is read.
LOOK = TlsPolicy(require_tls=True, require_ca_signed=False, validate_hostname=False)


async def peek_certificate(hop: Hop, cfg: Config) -> certificate.Certificate | None:
    """The certificate the host at ``hop`` presents, read without checking it; None if unread."""
    look = Hop(hop.ip, hop.port, LOOK, hop.name)
    try:
        session = await open_session(look, cfg, starttls=True, read_certificate=False)
    except (RelayError, HandshakeFailed):
        return None
    try:
        der = session.peer_certificate()
        return certificate.decode(der) if der else None
    except (ValueError, OSError):
        # ssl.SSLError is an OSError: a certificate Python cannot decode
        # leaves the diagnosis without its facts, never the delivery broken.
        return None
    finally:
        await quit_session(session)


async def reset(session: Session, cfg: Config) -> None:
    """RSET (RFC 5321 section 4.1.1.5): clears any leftover transaction
    state; on a pooled session it doubles as a liveness check."""
    with map_smtp_errors():
        await session.smtp.rset(timeout=cfg.delivery.command_timeout)


async def quit_session(session: Session) -> None:
    """QUIT politely; close regardless."""
    try:
        if session.smtp.is_connected:
            await session.smtp.quit(timeout=5)
    except Exception:  # noqa: S110 - a failed QUIT on a connection we drop anyway
        pass
    finally:
        session.close()


def _transport_info(smtp: aiosmtplib.SMTP, key: str, pick: Callable[[Any], Any]) -> Any:
    value = smtp.get_transport_info(key)
    return pick(value) if value else None


# --- the mail transaction -----------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sent:
    """How one mail transaction ended (refused recipients were reported as they came)."""

    #: The recipients the next hop accepted (250 or 251 to RCPT), in order.
    accepted: tuple[str, ...]
    #: For the accepted recipients, the reply to the final dot or the 5xx to
    #: DATA; with none accepted, the last refusal (nothing to record).
    reply: Reply
    #: The next hop offered DSN (RFC 3461) and was given the sender's
    #: NOTIFY, ORCPT, RET and ENVID: its own DSNs tell the sender the rest.
    dsn: bool = False


async def send_mail(
    session: Session,
    envelope: Envelope,
    recipients: Sequence[str],
    body: Body,
    cfg: Config,
    reused: bool = False,
    on_refused: Callable[[str, Reply], None] | None = None,
) -> Sent:
    """MAIL, RCPT per recipient, DATA and the body: one transaction (RFC 5321 section 3.3).

    With PIPELINING (RFC 2920) the commands go out as one group (after an
    RSET on a ``reused`` session): two round trips instead of five.
    ``on_refused(address, reply)`` hears each refusal as it arrives, so it
    stands if the connection is lost later. Raises a RelayError when the
    host failed the transaction (a refused MAIL, a 4xx to DATA,
    :class:`errors.ReplyLost` after the dot), :class:`StaleSession` if a
    reused session turns out closed before its first reply.
    """
    smtp = session.smtp
    # TLS is settled by now: a TLS error mid-transaction is a lost
    # connection, not a policy failure.
    with map_smtp_errors():
        encoding = "utf-8" if envelope.smtputf8 else "ascii"
        size = len(body) if isinstance(body, bytes) else body.size
        options = mail_options(envelope, size, smtp.supports_extension)
        # quote_address: as aiosmtplib's mail() and rcpt() quote ("" -> "<>").
        mail = b" ".join(
            [b"MAIL FROM:" + quote_address(envelope.mail_from).encode(encoding)]
            + [o.encode("ascii") for o in options]
        )
        dsn = smtp.supports_extension("dsn")
        rcpts = [
            b" ".join(
                [b"RCPT TO:" + quote_address(a).encode(encoding)]
                + [o.encode("ascii") for o in rcpt_options(envelope, a, dsn)]
            )
            for a in recipients
        ]
        timeout = cfg.delivery.command_timeout
        accepted: list[str] = []
        last: Reply | None = None
        mail_ok = False

        def rcpt_reply(address: str, response: aiosmtplib.SMTPResponse) -> None:
            nonlocal last
            if response.code in (aiosmtplib.SMTPStatus.completed, 251):
                accepted.append(address)
                return
            last = Reply.parse(response.code, response.message)
            if on_refused is not None:
                on_refused(address, last)

        if session.pipelining:
            # Section 3.1: RSET, MAIL and RCPT may appear anywhere in a
            # group, DATA only last.
            group = [b"RSET"] * reused + [mail, *rcpts, b"DATA"]
            first_rcpt = reused + 1

            def on_reply(index: int, response: aiosmtplib.SMTPResponse) -> None:
                nonlocal mail_ok
                if index == reused:
                    mail_ok = response.code == aiosmtplib.SMTPStatus.completed
                elif mail_ok and first_rcpt <= index < first_rcpt + len(recipients):
                    rcpt_reply(recipients[index - first_rcpt], response)

            replies = await pipeline(smtp, group, timeout, fresh=not reused, on_reply=on_reply)
            mail_reply, data_reply = replies[reused], replies[-1]
        else:
            mail_reply = await smtp.execute_command(mail, timeout=timeout)
            data_reply = None
            if mail_reply.code == aiosmtplib.SMTPStatus.completed:
                for address, command in zip(recipients, rcpts, strict=True):
                    rcpt_reply(address, await smtp.execute_command(command, timeout=timeout))
        if mail_reply.code != aiosmtplib.SMTPStatus.completed:
            raise errors.remote_failure(mail_reply.code, mail_reply.message)
        if not accepted:
            if data_reply is None:
                await smtp.rset(timeout=timeout)
            elif data_reply.code == aiosmtplib.SMTPStatus.start_input:
                # Section 3.1: a server that took DATA with no valid
                # recipient gets an empty message it will refuse.
                await _send_body(smtp, b"", cfg)
            assert last is not None
            return Sent((), last, dsn)
        if data_reply is None:
            data_reply = await smtp.execute_command(b"DATA", timeout=timeout)
        if data_reply.code // 100 in (2, 3) and data_reply.code != 354:
            # Not an answer DATA can have: a confused (or out of step)
            # server; never take it as the message's fate.
            raise errors.TemporaryFailure(f"unexpected reply to DATA: {data_reply.code}")
        try:
            if data_reply.code != aiosmtplib.SMTPStatus.start_input:
                raise aiosmtplib.SMTPDataError(data_reply.code, data_reply.message)
            response = await _send_body(smtp, body, cfg)
        except aiosmtplib.SMTPDataError as exc:
            reply = Reply.parse(exc.code, exc.message)
            if reply.temporary:
                # A 4xx to DATA: this host failed the transaction; the
                # recipients stay open for the next candidate.
                raise errors.remote_failure(exc.code, exc.message) from exc
            return Sent(tuple(accepted), reply, dsn)
    return Sent(tuple(accepted), Reply.parse(response.code, response.message), dsn)


# --- pipelining (RFC 2920) ----------------------------------------------------


def _reply_in_buffer(protocol: Any) -> aiosmtplib.SMTPResponse | None:
    # aiosmtplib 5.1 parses one reply per data_received() and keeps the rest
    # of the bytes in its buffer; the replies to a pipelined group often
    # arrive together. Listed in PRIVATE_MEMBERS.
    reply: aiosmtplib.SMTPResponse | None = protocol._read_response_from_buffer()
    return reply


#: Commands written before their replies are read (RFC 2920 lets a client
#: send a long list as several groups). aiosmtplib refuses more than 32 KiB
#: of unread replies ("Response too long", a 5xx that would bounce every
#: recipient): 50 replies stay far below that even at 512 bytes each.
PIPELINE_GROUP_MAX = 50


async def pipeline(
    smtp: aiosmtplib.SMTP,
    commands: Sequence[bytes],
    reply_timeout: float,
    fresh: bool = True,
    on_reply: Callable[[int, aiosmtplib.SMTPResponse], None] | None = None,
) -> list[aiosmtplib.SMTPResponse]:
    """RFC 2920 command pipelining: write ``commands`` in groups of up to
    PIPELINE_GROUP_MAX, reading one reply per command, in order, after each
    group. The caller checks that the server offers PIPELINING and that
    only the last command may change the session's state (DATA, section 3.1).

    ``fresh=False`` (a pooled session whose group starts with RSET, the
    liveness check): if the connection turns out closed before the first
    reply, or the RSET is not answered 250 (a 421 from a server timing the
    session out), :class:`StaleSession`: the server took none of the
    transaction. Other losses raise as aiosmtplib's own commands do, and
    close the connection. ``on_reply(index, reply)`` sees each reply as it
    arrives, so what was answered before a loss is not lost with it.
    """
    protocol = smtp.protocol
    if protocol is None or not smtp.is_connected:
        if not fresh:
            raise StaleSession()
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    for command in commands:
        # Same guard as aiosmtplib's execute_command: no command injection.
        if b"\r" in command or b"\n" in command:
            raise ValueError("Command contains a line break")
    replies: list[aiosmtplib.SMTPResponse] = []
    try:
        for first in range(0, len(commands), PIPELINE_GROUP_MAX):
            group = commands[first : first + PIPELINE_GROUP_MAX]
            protocol.write(b"".join(command + b"\r\n" for command in group))
            for n in range(len(group)):
                # No await between one reply and the check of the buffer for
                # the next: read_response() marks a reply expected before it
                # yields. (At a group's start the buffer is empty.)
                buffered = _reply_in_buffer(protocol) if n else None
                reply = buffered or await _next_reply(protocol, reply_timeout)
                if not fresh and not replies and reply.code != aiosmtplib.SMTPStatus.completed:
                    smtp.close()
                    raise StaleSession()
                if on_reply is not None:
                    on_reply(len(replies), reply)
                replies.append(reply)
    except aiosmtplib.SMTPServerDisconnected as exc:
        smtp.close()
        if not replies and not fresh:
            raise StaleSession() from exc
        raise
    except aiosmtplib.SMTPTimeoutError:
        smtp.close()
        raise
    if any(r.code == aiosmtplib.SMTPStatus.domain_unavailable for r in replies):
        # 421: the server is closing the session (as aiosmtplib does).
        smtp.close()
    return replies


async def _next_reply(protocol: Any, reply_timeout: float) -> aiosmtplib.SMTPResponse:
    # The reply's future is awaited directly (timeout=None): its result
    # wakes this task at the next turn of the loop, before that turn's
    # reads. aiosmtplib's own timeout (wait_for) adds a turn, in which it
    # drops bytes that arrive while it holds a parsed reply -- the next
    # replies of a group that came in more than one segment.
    return await _reply_within(protocol.read_response(timeout=None), reply_timeout)


async def _reply_within(
    reply: Awaitable[aiosmtplib.SMTPResponse], limit: float
) -> aiosmtplib.SMTPResponse:
    """Await a server reply for at most ``limit`` seconds; a timeout raises
    aiosmtplib's SMTPReadTimeoutError, as its own commands do."""
    try:
        async with asyncio.timeout(limit):
            return await reply
    except TimeoutError as exc:
        raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc


# --- the body -----------------------------------------------------------------

#: Bytes read from a spooled body file and written per step (delivery of a
#: large message): memory per session stays about twice this.
SEND_CHUNK = 256 << 10


def read_piece(body: BodyFile, offset: int, chunk: int) -> bytes:
    """Up to ``chunk`` bytes of ``body`` from ``offset``, one less when they
    would end between a CR and its LF, so a piece after one that ends in
    CRLF starts a line and dot-stuffing per piece is exact. Blocking."""
    piece = body.read(offset, chunk)
    if len(piece) > 1 and piece.endswith(b"\r") and offset + len(piece) < body.size:
        piece = piece[:-1]
    return piece


def _stuffed(data: bytes, line_start: bool = True) -> bytes:
    """RFC 5321 section 4.5.2: a line starting with "." gets one more.

    ``data`` is CRLF-only and never splits a CRLF, so a line starts after a
    CRLF, or at its start when ``line_start`` (a body, or a piece of one
    that follows a CRLF): bytes.replace does it in C (a multi-line ``^\\.``
    regex took 0.8 ms for 100 KiB, 5x as long).
    """
    stuffed = data.replace(b"\r\n.", b"\r\n..")
    return b"." + stuffed if line_start and stuffed.startswith(b".") else stuffed


async def _send_body(smtp: aiosmtplib.SMTP, body: Body, cfg: Config) -> aiosmtplib.SMTPResponse:
    """After the 354: the body and the final dot; the 250 reply to the dot.

    aiosmtplib's data() waits for 354 and for the reply to the dot with one
    timeout and copies the body three times. Here the 354 waited
    ``command_timeout``; the reply to the dot waits ``data_timeout`` (RFC
    5321 section 4.5.3.2.6: 10 minutes); once the dot is written a lost
    connection or timeout raises :class:`errors.ReplyLost` (the next hop may
    have the message). ``body`` is CRLF-only (relay.delivery checks it), so
    dot-stuffing is all its encoding; a body in a file goes in pieces.
    """
    protocol = smtp.protocol
    if protocol is None:
        raise aiosmtplib.SMTPServerDisconnected("Connection lost")
    if isinstance(body, bytes):
        if body and not body.endswith(b"\r\n"):
            body += b"\r\n"
        protocol.write(_stuffed(body) + b".\r\n")
        # read_response marks the reply as expected before it first yields,
        # so the reply cannot arrive unseen between the write and the wait.
        waiting = protocol.read_response(timeout=cfg.delivery.data_timeout)
    else:
        # Waiting for the reply from the start marks it as expected, so a
        # reply sent early (before our dot) is not dropped as unsolicited.
        reply = asyncio.ensure_future(protocol.read_response(timeout=None))
        try:
            await _send_file(protocol, body, reply, cfg.delivery.command_timeout)
        except BaseException:
            await _forget(reply)
            raise
        waiting = _reply_within(reply, cfg.delivery.data_timeout)
    try:
        response = await waiting
    except (aiosmtplib.SMTPServerDisconnected, aiosmtplib.SMTPTimeoutError) as exc:
        smtp.close()
        raise errors.ReplyLost(f"after the final dot: {exc}") from exc
    if response.code != aiosmtplib.SMTPStatus.completed:
        raise aiosmtplib.SMTPDataError(response.code, response.message)
    return response


async def _send_file(
    protocol: SMTPProtocol,
    body: BodyFile,
    reply: asyncio.Future[aiosmtplib.SMTPResponse],
    limit: float,
) -> None:
    """Write ``body`` piece by piece, dot-stuffed, then the final dot.

    Each piece waits until the transport has room again (its buffer below
    the high-water mark), for at most ``limit`` seconds, so a slow next hop
    costs one piece of memory, not the body. Raises aiosmtplib's
    exceptions: before the dot, the next hop cannot have the message.
    """
    loop = asyncio.get_running_loop()
    offset = 0
    line_start = True
    while offset < body.size:
        piece = await loop.run_in_executor(None, read_piece, body, offset, SEND_CHUNK)
        if not piece:
            raise errors.TemporaryFailure("spooled body shrank during delivery")
        offset += len(piece)
        # Pieces never split a CRLF: every "CRLF ." is inside one piece.
        protocol.write(_stuffed(piece, line_start))
        line_start = piece.endswith(b"\r\n")
        del piece
        await _drained(protocol, reply, limit)
    # As data(): a body not ending in CRLF gets one before the dot.
    protocol.write(b".\r\n" if line_start else b"\r\n.\r\n")


async def _drained(
    protocol: SMTPProtocol, reply: asyncio.Future[aiosmtplib.SMTPResponse], limit: float
) -> None:
    """Wait until the transport takes more; raise if the next hop answered or left early."""
    if reply.done():
        early = reply.result()  # raises SMTPServerDisconnected when it went away
        code = early.code if early.code // 100 in (4, 5) else 451
        raise aiosmtplib.SMTPResponseException(
            code, f"reply before the end of the data: {early.message}"
        )
    try:
        async with asyncio.timeout(limit):
            # FlowControlMixin's drain, the one StreamWriter.drain() uses
            # (listed in PRIVATE_MEMBERS).
            await protocol._drain_helper()
    except TimeoutError as exc:
        raise aiosmtplib.SMTPTimeoutError("Timed out sending the message") from exc


async def _forget(reply: asyncio.Future[aiosmtplib.SMTPResponse]) -> None:
    """Stop waiting for a reply (the transaction failed before the dot)."""
    if not reply.done():
        reply.cancel()
        await asyncio.gather(reply, return_exceptions=True)
    elif not reply.cancelled():
        reply.exception()  # retrieved: no "never retrieved" log
