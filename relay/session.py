"""Opening one outbound SMTP session: connect, EHLO, STARTTLS per policy (RFC 5321, RFC 3207).

Part of the outbound SMTP package (delivery, session, pool, probe), the
only modules that import aiosmtplib; its exceptions are mapped to relay's
failure classes here, in :func:`map_smtp_errors`, and nowhere else.
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

from relay import certificate, errors, events, tls
from relay.certificate import distinguished_name
from relay.config import Config, RouteAuth, TlsPolicy
from relay.errors import RelayError, Reply, TlsFailure, TlsPolicyFailure

# --- exception mapping (guarded by tests/test_delivery_errors.py) ----------


def remote_failure(code: int, message: str, detail: str = "") -> RelayError:
    """The next hop's reply as a failure, kept verbatim."""
    reply = Reply.parse(code, message)
    klass = errors.RemotePermanent if reply.permanent else errors.RemoteTemporary
    return klass(detail or str(reply), reply)


class StaleSession(Exception):
    """A pooled session was found closed by the server before its first reply:
    nothing of the transaction reached the host; use another session."""


@contextlib.contextmanager
def map_smtp_errors(require_tls: bool = True) -> Iterator[None]:
    """Turn every aiosmtplib (and ssl/OS) exception into a RelayError.

    The one place that knows aiosmtplib's exception hierarchy (like httpx's
    map_httpcore_exceptions). Order matters: subclasses first.
    ``require_tls``: an ssl.SSLError that is OpenSSL's verdict on the peer
    (a certificate error, an alert, a protocol mismatch) is a TLS-policy
    failure rather than a lost connection; the peer closing or resetting
    the connection mid-handshake is never a verdict (:func:`tls.interrupted`).
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
        raise remote_failure(first.code, first.message) from exc
    except aiosmtplib.SMTPResponseException as exc:
        raise remote_failure(exc.code, exc.message) from exc
    except ssl.SSLError as exc:
        if require_tls and not tls.interrupted(exc):
            raise TlsPolicyFailure(tls.classify(exc), tls.describe_failure(exc)) from exc
        raise errors.ConnectionLost(f"TLS: {tls.describe_failure(exc)}") from exc
    except (ConnectionError, TimeoutError) as exc:
        raise errors.ConnectionLost(f"{type(exc).__name__}: {exc}") from exc
    except Exception as exc:
        # aiosmtplib.SMTPException (generic), SMTPNotSupported, bugs: never
        # lose the message over them; defer and keep the traceback.
        events.error("delivery_error", exc_info=True, error=repr(exc))
        raise errors.TemporaryFailure(repr(exc), errors.INTERNAL_ERROR) from exc


#: (ip, port, tls policy, server_hostname, AUTH credentials): one next hop as a
#: connection sees it. The credentials are part of it so that a pooled session
#: is reused only by a route that authenticates (or not) the same way.
HopKey = tuple[str, int, TlsPolicy, str, RouteAuth | None]


@dataclass(slots=True)
class Session:
    """One open SMTP connection, after EHLO (and STARTTLS when it happened)."""

    smtp: aiosmtplib.SMTP
    key: HopKey
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


async def _hello(smtp: aiosmtplib.SMTP) -> None:
    """EHLO, falling back to HELO when EHLO is refused (RFC 5321 section 3.2)."""
    try:
        await smtp.ehlo()
    except aiosmtplib.SMTPHeloError as exc:
        if exc.code // 100 != 5 or not smtp.is_connected:
            raise
        await smtp.helo()


async def open_session(
    key: HopKey, cfg: Config, starttls: bool, read_certificate: bool = True
) -> Session:
    """Connect and EHLO; STARTTLS per the key's policy when ``starttls``.

    With credentials in the key, then AUTH (:func:`authenticate`).
    Raises a RelayError when the host fails (:class:`~relay.errors.AuthFailed`
    when AUTH did), :class:`HandshakeFailed` when only the STARTTLS upgrade
    did; the connection is closed either way. ``read_certificate``: see
    :func:`start_tls`.
    """
    ip, port, policy, name, auth = key
    smtp = aiosmtplib.SMTP(
        hostname=ip,
        port=port,
        local_hostname=cfg.server.hostname,
        start_tls=False,
        use_tls=False,
        timeout=cfg.delivery.command_timeout,
    )
    session = Session(smtp, key)
    try:
        with map_smtp_errors(policy.require_tls):
            await smtp.connect(timeout=cfg.delivery.connect_timeout)
            await _hello(smtp)
        session.starttls_offered = smtp.supports_extension("starttls")
        if starttls:
            await start_tls(session, policy, cfg, read_certificate)
        if auth is not None:
            await authenticate(session, auth, cfg)
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
    name = session.key[3]
    if not smtp.supports_extension("starttls"):
        if policy.require_tls:
            raise TlsPolicyFailure(TlsFailure.NO_STARTTLS)
        return
    context = tls.client_context(policy, cfg.tls.ca_file)
    try:
        with map_smtp_errors(require_tls=True):
            # SNI and verification use the name delivered to, never the IP.
            await smtp.starttls(server_hostname=name, tls_context=context)
    except TlsPolicyFailure as exc:
        if read_certificate and exc.reason in _CERTIFICATE_CHECKS:
            exc.certificate = await peek_certificate(session.key, cfg)
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
    with map_smtp_errors(policy.require_tls):
        await _hello(smtp)
    session.tls_version = transport_info(smtp, "ssl_object", lambda o: o.version())
    session.cipher = transport_info(smtp, "cipher", lambda c: c[0])
    session.verified = policy.require_ca_signed
    if policy.require_ca_signed:
        session.peer_subject = transport_info(
            smtp, "peercert", lambda c: distinguished_name(c.get("subject"))
        )
        # getpeercert() decodes a certificate only once it verified: the
        # expiry early warning (relay.expiry) reads its notAfter here.
        session.not_after = transport_info(smtp, "peercert", _not_after)


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
    host = session.key[3]
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
    with map_smtp_errors(require_tls=False):
        try:
            await method(auth.username, auth.password, timeout=cfg.delivery.command_timeout)
        except aiosmtplib.SMTPAuthenticationError as exc:
            reply = " ".join(f"{exc.code} {exc.message}".split())
            raise auth_failed(auth, host, f"{mechanism.upper()} refused: {reply}") from exc
    session.auth_mechanism = mechanism


#: Encrypt without checks: how a failed certificate is read.
_LOOK = TlsPolicy(require_tls=True, require_ca_signed=False, validate_hostname=False)


async def peek_certificate(key: HopKey, cfg: Config) -> certificate.Certificate | None:
    """The certificate the host at ``key`` presents, read without checking it; None if unread."""
    ip, port, _, name, _ = key
    try:
        session = await open_session(
            (ip, port, _LOOK, name, None), cfg, starttls=True, read_certificate=False
        )
    except (RelayError, HandshakeFailed):
        return None
    try:
        der = transport_info(session.smtp, "ssl_object", lambda o: o.getpeercert(binary_form=True))
        return certificate.decode(der) if der else None
    except (ValueError, OSError):
        # ssl.SSLError is an OSError: a certificate Python cannot decode
        # leaves the diagnosis without its facts, never the delivery broken.
        return None
    finally:
        await quit_session(session)


def _reply_in_buffer(protocol: Any) -> aiosmtplib.SMTPResponse | None:
    # aiosmtplib 5.1 parses one reply per data_received() and keeps the rest
    # of the bytes in its buffer; the replies to a pipelined group often
    # arrive together. A version-pin test guards this private method.
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
    return await reply_within(protocol.read_response(timeout=None), reply_timeout)


async def reply_within(
    reply: Awaitable[aiosmtplib.SMTPResponse], limit: float
) -> aiosmtplib.SMTPResponse:
    """Await a server reply for at most ``limit`` seconds; a timeout raises
    aiosmtplib's SMTPReadTimeoutError, as its own commands do."""
    try:
        async with asyncio.timeout(limit):
            return await reply
    except TimeoutError as exc:
        raise aiosmtplib.SMTPReadTimeoutError("Timed out waiting for server response") from exc


async def quit_session(session: Session) -> None:
    """QUIT politely; close regardless."""
    try:
        if session.smtp.is_connected:
            await session.smtp.quit(timeout=5)
    except Exception:  # noqa: S110 - a failed QUIT on a connection we drop anyway
        pass
    finally:
        session.close()


def transport_info(smtp: aiosmtplib.SMTP, key: str, pick: Callable[[Any], Any]) -> Any:
    value = smtp.get_transport_info(key)
    return pick(value) if value else None
