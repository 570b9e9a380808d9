"""Replies, failure classes and the one place that maps failures to SMTP codes.

Reply codes follow RFC 5321 section 4.2; enhanced status codes follow
RFC 3463. Every status that reaches the wire or a delivery status
notification is a :class:`Reply` built here. This module is a leaf: it
imports nothing from relay at run time (the certificate type is named
for annotations only).

The failure classes, each carrying the Reply a client or a DSN sees::

    RelayError                      451 4.3.0 unless a subclass says otherwise
    ├── TemporaryFailure            4xx: deferred, retried until queue.max_lifetime
    │   ├── DnsTemporary            SERVFAIL, timeout, no nameserver answered
    │   ├── RouteMisconfigured      a configured name does not resolve (never bounced)
    │   ├── HostUnreachable         refused, timed out, or a 4xx/5xx greeting
    │   ├── ConnectionLost          dropped or silent mid-transaction
    │   │   └── ReplyLost           ... after the final dot: maybe delivered
    │   ├── NotTried                the attempt's address budget ran out
    │   ├── AuthFailed              SMTP AUTH to the next hop failed
    │   └── RemoteTemporary         the next hop's own 4xx, verbatim
    ├── PermanentFailure            5xx: bounced now
    │   ├── NoSuchDomain            NXDOMAIN
    │   ├── NullMx                  RFC 7505 ``MX 0 .``
    │   ├── NoRoute                 no MX and no address record
    │   └── RemotePermanent         the next hop's own 5xx, verbatim
    ├── TlsPolicyFailure            one host failed the route's TLS policy (a TlsFailure)
    │   └── RequireTlsUnsupported   a REQUIRETLS message's next hop cannot take it (RFC 8689)
    └── SpoolError                  the spool could not store or update a message
        └── SpoolFull               no space left on the spool's file system

:class:`TlsFailure` is an enum of the failed check, not an exception.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from relay.certificate import Certificate


@dataclass(frozen=True, slots=True)
class Reply:
    """One SMTP reply: basic code, enhanced status code and text."""

    #: Basic reply code, e.g. 250, 451, 550.
    code: int
    #: Enhanced status code (RFC 3463), e.g. (4, 4, 1).
    status: tuple[int, int, int]
    #: Human-readable text, one line, no CR or LF.
    text: str

    def __post_init__(self) -> None:
        # The class digit of both codes must agree (RFC 3463 section 2);
        # a 4xx reply with a 5.x.x status is a bug, not a choice.
        if self.code // 100 != self.status[0]:
            raise ValueError(f"reply class {self.code} != status class {self.status}")
        if "\r" in self.text or "\n" in self.text:
            raise ValueError("reply text must be a single line")

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def temporary(self) -> bool:
        return 400 <= self.code < 500

    @property
    def status_text(self) -> str:
        return ".".join(str(part) for part in self.status)

    def __str__(self) -> str:
        """The reply as it goes on the wire (without CRLF)."""
        return f"{self.code} {self.status_text} {self.text}"

    def as_permanent(self) -> Reply:
        """The same reply moved to class 5, for bounces after max_lifetime.

        4.4.1 becomes 5.4.1 and 451 becomes 551-ish: the basic code keeps
        its second and third digits so the class of both codes changes
        together (the maddy ESC-class bug cannot happen here).
        """
        if self.permanent:
            return self
        code = 500 + self.code % 100
        return Reply(code, (5, self.status[1], self.status[2]), self.text)

    def as_temporary(self) -> Reply:
        """The same reply moved to class 4: what a recipient that waits records.

        550 5.7.5 becomes 450 4.7.5 (and :meth:`as_permanent` turns it back
        at max_lifetime), so a queued recipient never shows a 5xx.
        """
        if not self.permanent:
            return self
        code = 400 + self.code % 100
        return Reply(code, (4, self.status[1], self.status[2]), self.text)

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """Build a Reply from a remote server's code and text.

        The enhanced status code is taken from the text when present
        (RFC 2034); otherwise a generic one of the right class is used.
        """
        text = " ".join(message.split())
        klass = code // 100
        status = (klass, 0, 0)
        first, _, rest = text.partition(" ")
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and int(parts[0]) == klass:
            status = (int(parts[0]), int(parts[1]), int(parts[2]))
            text = rest
        if klass not in (2, 4, 5):
            # A reply outside 2xx/4xx/5xx where a final reply was expected
            # is a protocol error of the peer: treat it as temporary.
            return cls(451, (4, 5, 0), f"unexpected reply {code} {text}".strip())
        return cls(code, status, text)


# --- inbound replies (docs/inbound.md) --------------------------------------

RELAYING_DENIED = Reply(550, (5, 7, 1), "Relaying denied")
NO_ROUTE = Reply(550, (5, 1, 1), "No route for this recipient")
TOO_MANY_RECIPIENTS = Reply(452, (4, 5, 3), "Too many recipients")
MESSAGE_TOO_BIG = Reply(552, (5, 3, 4), "Message size exceeds fixed limit")
MALFORMED_ADDRESS = Reply(501, (5, 1, 3), "Bad address syntax")
#: A MAIL or RCPT parameter relay implements is malformed or repeated
#: (RFC 3461 section 4: NOTIFY, ORCPT, RET, ENVID; RFC 3463 5.5.4).
BAD_PARAMETER = Reply(501, (5, 5, 4), "Invalid command parameter")
BAD_SYNTAX = Reply(501, (5, 5, 4), "Syntax error in parameters or arguments")
LOOP_DETECTED = Reply(554, (5, 4, 6), "Routing loop detected: too many Received headers")
BARE_LINE_ENDING = Reply(
    550, (5, 6, 0), "Message contains bare CR or LF line endings; only CRLF is allowed"
)
BAD_HEADER = Reply(550, (5, 6, 0), "Message contains a malformed header line")
SPOOL_FAILED = Reply(451, (4, 3, 0), "Temporary local problem, please try again later")
DISK_FULL = Reply(452, (4, 3, 1), "Insufficient system storage")
INTERNAL_ERROR = Reply(451, (4, 3, 0), "Temporary local problem, please try again later")
SHUTTING_DOWN = Reply(421, (4, 3, 2), "Service shutting down, try again later")
# RFC 8689 section 2: MAIL FROM REQUIRETLS only on a TLS session; 5.7.10
# "encryption needed" (RFC 5248 registry), as 530 to a command needing TLS.
REQUIRETLS_NEEDS_TLS = Reply(530, (5, 7, 10), "REQUIRETLS needs a TLS session: STARTTLS first")
# RFC 8689 section 5 (and its 5.7.30 registration): no next hop could take it.
REQUIRETLS_UNSUPPORTED = Reply(
    550, (5, 7, 30), "REQUIRETLS support required: the next hop cannot take the message over TLS"
)
UNKNOWN_PARAMETER = Reply(555, (5, 5, 4), "MAIL FROM/RCPT TO parameter not recognized")
# RFC 6531 section 3.4: a non-ASCII address cannot go to a next hop without SMTPUTF8.
SMTPUTF8_UNSUPPORTED = Reply(
    550, (5, 6, 7), "Next hop does not support SMTPUTF8, required by a non-ASCII address"
)

# --- queue replies (docs/queue.md) ------------------------------------------

#: Recorded for a recipient that no rule routes any more (rules changed by a
#: reload): deferred, never bounced, so fixing the config lets it go out.
NO_ROUTE_NOW = Reply(451, (4, 4, 0), "No route for this recipient in the current configuration")
#: A recipient bounced at max_lifetime with no reply ever seen (RFC 3463 X.4.7).
DELIVERY_EXPIRED = Reply(554, (5, 4, 7), "Delivery time expired")
#: The DSN Status of a recipient bounced at max_lifetime (RFC 3463 4.4.7,
#: "delivery time expired", sent with Action: failed; docs/queue.md).
EXPIRED_STATUS = (4, 4, 7)

# Inbound replies to MAIL and RCPT (docs/inbound.md).
SENDER_OK = Reply(250, (2, 1, 0), "Sender ok")
RECIPIENT_OK = Reply(250, (2, 1, 5), "Recipient ok")
BAD_HELO = Reply(501, (5, 5, 4), "Invalid EHLO/HELO argument: give a domain or address literal")
NON_ASCII_ADDRESS = Reply(553, (5, 6, 7), "Non-ASCII address needs the SMTPUTF8 parameter")
LINE_TOO_LONG = Reply(500, (5, 5, 2), "Line too long (RFC 5321 section 4.5.3.1)")
NUL_IN_MESSAGE = Reply(550, (5, 6, 0), "Message contains NUL characters")
IDLE_TIMEOUT = Reply(421, (4, 4, 2), "Timeout, closing connection")
BAD_COMMAND_LINE = Reply(
    500, (5, 5, 2), "Syntax error: empty command, or a line not ending in CRLF"
)
# Inbound limits and strictness (Postfix's texts where it has one).
TLS_ALREADY_ACTIVE = Reply(554, (5, 5, 1), "Error: TLS already active")
ROUTING_CHARACTERS = Reply(
    550, (5, 7, 1), "Relaying denied: routing characters (%, !, @) in the local part"
)
TOO_MANY_ERRORS = Reply(421, (4, 7, 0), "Too many errors")
TOO_MANY_CONNECTIONS = Reply(421, (4, 7, 0), "Too many connections, try again later")
TOO_MANY_FROM_YOU = Reply(421, (4, 7, 0), "Too many connections from your address")
DATA_TIMEOUT = Reply(421, (4, 4, 2), "Timeout: the message took too long to send")
BUSY_TIMEOUT = Reply(421, (4, 4, 2), "Timeout: idle while every connection is taken")


def queued(queue_id: str) -> Reply:
    return Reply(250, (2, 0, 0), f"Ok: queued as {queue_id}")


# --- failure classes --------------------------------------------------------


class RelayError(Exception):
    """A failure with the Reply that describes it.

    ``detail`` is kept for logs only; the reply text is what a client or a
    DSN sees.
    """

    default_reply = Reply(451, (4, 3, 0), "Temporary local problem")

    def __init__(self, detail: str = "", reply: Reply | None = None) -> None:
        self.reply = reply or self.default_reply
        self.detail = detail or self.reply.text
        super().__init__(self.detail)


class TemporaryFailure(RelayError):
    """4xx: defer and retry until queue.max_lifetime, then bounce."""


class DnsTemporary(TemporaryFailure):
    """SERVFAIL, timeout, no nameserver answered."""

    default_reply = Reply(451, (4, 4, 3), "Temporary DNS failure")


class RouteMisconfigured(TemporaryFailure):
    """A name from the configuration does not resolve (NXDOMAIN, null MX).

    Deferred, never bounced: a typo in a route must not bounce everyone's
    mail. Logged loudly and counted by the caller.
    """

    default_reply = Reply(451, (4, 4, 4), "Route host does not resolve; check the relay config")


class HostUnreachable(TemporaryFailure):
    """Connection refused or timed out, or a 4xx/5xx greeting."""

    default_reply = Reply(451, (4, 4, 1), "Next hop unreachable")


class ConnectionLost(TemporaryFailure):
    """The peer dropped the connection or stopped answering mid-transaction."""

    default_reply = Reply(451, (4, 4, 2), "Connection to next hop lost")


class ReplyLost(ConnectionLost):
    """No reply to the final dot (dropped or timed out): the next hop may have the mail.

    Deferred, and not sent to another host in the same attempt: a second
    host would very likely make a duplicate (RFC 5321 section 6.1).
    """

    default_reply = Reply(451, (4, 4, 2), "No reply from next hop after the message was sent")


class NotTried(TemporaryFailure):
    """The attempt's address budget ran out before this recipient's remaining hosts.

    Recorded so that ``outcome`` defers rather than bounces on TLS failures
    at only some of the candidate hosts.
    """

    default_reply = Reply(451, (4, 4, 1), "Not every next hop could be tried in this attempt")


class AuthFailed(TemporaryFailure):
    """SMTP AUTH (RFC 4954) to a route's next hop failed: a 535 to the
    credentials, no usable mechanism offered, or no TLS to send them over.

    A failure of the host (the next candidate is tried, the mail deferred),
    not of the recipients: a wrong password is the relay's configuration to
    fix, so mail waits for it rather than bouncing (Postfix's
    smtp_sasl_auth_soft_bounce). The reply text names the route for the
    DSN; the password is never part of it.
    """

    default_reply = Reply(451, (4, 7, 0), "Authentication to the next hop failed")


class RemoteTemporary(TemporaryFailure):
    """The next hop answered 4xx; its reply is kept verbatim."""


class PermanentFailure(RelayError):
    """5xx: bounce now (only ever for mail we accepted)."""

    default_reply = Reply(554, (5, 0, 0), "Permanent failure")


class NoSuchDomain(PermanentFailure):
    default_reply = Reply(550, (5, 1, 2), "Domain does not exist (NXDOMAIN)")


class NullMx(PermanentFailure):
    """RFC 7505: the domain publishes ``MX 0 .`` and accepts no mail."""

    default_reply = Reply(556, (5, 1, 10), "Domain accepts no mail (null MX)")


class NoRoute(PermanentFailure):
    default_reply = Reply(550, (5, 4, 4), "No MX and no address record for the domain")


class RemotePermanent(PermanentFailure):
    """The next hop answered 5xx; its reply is kept verbatim."""


def remote_failure(code: int, message: str) -> RemoteTemporary | RemotePermanent:
    """The next hop's reply as a failure of its class, kept verbatim."""
    reply = Reply.parse(code, message)
    klass = RemotePermanent if reply.permanent else RemoteTemporary
    return klass(str(reply), reply)


class TlsFailure(enum.Enum):
    """Which check of a route's TLS policy failed; also the metric label.

    The values are TLS-RPT result types (RFC 8460 section 4.3), so the
    metric, the log's ``tls_check=`` and ``relay test-tls --json`` speak
    the standard's words. A 5xx to STARTTLS or a handshake OpenSSL refused
    for no certificate reason is the RFC's catch-all ``validation-failure``.
    """

    NO_STARTTLS = "starttls-not-supported"
    HANDSHAKE = "validation-failure"
    UNTRUSTED_CA = "certificate-not-trusted"
    HOSTNAME_MISMATCH = "certificate-host-mismatch"
    EXPIRED = "certificate-expired"


# The words of the reply (the DSN's Diagnostic-Code) for each failed check;
# relay.advice has the diagnosis and the fixes.
TLS_FAILURE_TEXT: dict[TlsFailure, str] = {
    TlsFailure.NO_STARTTLS: "the server did not offer STARTTLS",
    TlsFailure.HANDSHAKE: "the TLS handshake failed",
    TlsFailure.UNTRUSTED_CA: "the server certificate is not signed by a trusted CA",
    TlsFailure.HOSTNAME_MISMATCH: "the server certificate does not match the host name",
    TlsFailure.EXPIRED: "the server certificate has expired or is not yet valid",
}


class TlsCheck(enum.StrEnum):
    """The checks a route's TLS policy can require, by their option's name
    (docs/tls.md); ``relay.tls.enforces`` says which a policy requires."""

    TLS = "require_tls"
    CA_SIGNED = "require_ca_signed"
    HOSTNAME = "validate_hostname"


#: The check (the route option) each failure fails.
TLS_FAILURE_OPTION: dict[TlsFailure, TlsCheck] = {
    TlsFailure.NO_STARTTLS: TlsCheck.TLS,
    TlsFailure.HANDSHAKE: TlsCheck.TLS,
    TlsFailure.UNTRUSTED_CA: TlsCheck.CA_SIGNED,
    TlsFailure.HOSTNAME_MISMATCH: TlsCheck.HOSTNAME,
    TlsFailure.EXPIRED: TlsCheck.CA_SIGNED,
}

# RFC 3463: 5.7.4 "security features not supported", 5.7.5 "cryptographic failure".
_TLS_STATUS = {TlsFailure.NO_STARTTLS: (5, 7, 4)}


class TlsPolicyFailure(RelayError):
    """One host failed the route's TLS policy.

    ``certificate`` is the certificate the host presented, when a
    certificate check failed and it could be read (for the diagnosis).
    """

    def __init__(
        self, reason: TlsFailure, detail: str = "", certificate: Certificate | None = None
    ) -> None:
        self.reason = reason
        self.certificate = certificate
        status = _TLS_STATUS.get(reason, (5, 7, 5))
        option = TLS_FAILURE_OPTION[reason]
        text = f"TLS required by route ({option}): {TLS_FAILURE_TEXT[reason]}"
        super().__init__(detail or text, Reply(550, status, text))


#: The detail of a RequireTlsUnsupported at a host that ran STARTTLS but did
#: not list REQUIRETLS (relay.advice words the fix for it).
REQUIRETLS_NOT_OFFERED = "no REQUIRETLS after STARTTLS"


class RequireTlsUnsupported(TlsPolicyFailure):
    """A REQUIRETLS message (RFC 8689) at a host without STARTTLS, or that did
    not offer REQUIRETLS after it: 5.7.30. A TLS-policy failure, so the next
    candidate is tried and the route's ``on_tls_failure`` decides at the end."""

    def __init__(self, reason: TlsFailure, detail: str) -> None:
        super().__init__(reason, detail)
        self.reply = REQUIRETLS_UNSUPPORTED


class SpoolError(RelayError):
    """The spool could not store or update a message."""

    default_reply = SPOOL_FAILED


class SpoolFull(SpoolError):
    """No space left on the spool's file system."""

    default_reply = DISK_FULL


# --- aggregation ------------------------------------------------------------


class Outcome(enum.StrEnum):
    """One recipient's fate after an attempt (the strings of logs and metrics)."""

    DELIVERED = "delivered"
    BOUNCED = "bounced"
    DEFERRED = "deferred"


DELIVERED = Outcome.DELIVERED
BOUNCED = Outcome.BOUNCED
DEFERRED = Outcome.DEFERRED


def outcome(results: Iterable[Reply | RelayError], tls_defers: bool = False) -> Outcome:
    """Decide one recipient's fate from every candidate host's result.

    Rules (docs/queue.md): any acceptance delivers; a permanent
    reply bounces; when *every* candidate failed the TLS policy the
    recipient bounces at once, unless ``tls_defers`` (the route's
    ``on_tls_failure = "defer"``: it waits, with backoff, for a fixed
    certificate until ``max_lifetime``); anything else defers. No results
    at all (nothing to try) defers.
    """
    items = list(results)
    if not items:
        return DEFERRED
    for item in items:
        if isinstance(item, Reply) and item.code // 100 == 2:
            return DELIVERED
    for item in items:
        reply = item if isinstance(item, Reply) else item.reply
        if isinstance(item, PermanentFailure) or (isinstance(item, Reply) and reply.permanent):
            return BOUNCED
    if not tls_defers and tls_only(items):
        return BOUNCED
    return DEFERRED


def tls_only(results: Iterable[Reply | RelayError]) -> bool:
    """True when every result is a TLS-policy failure (the case ``on_tls_failure`` decides)."""
    items = list(results)
    return bool(items) and all(isinstance(item, TlsPolicyFailure) for item in items)
