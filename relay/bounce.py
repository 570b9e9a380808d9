"""Delivery status notifications (RFC 3464) for mail this relay accepted but cannot deliver.

A DSN is ``multipart/report; report-type=delivery-status`` (RFC 6522) with
three parts: a plain-words explanation, the machine-readable
``message/delivery-status`` fields, and the original message's headers
(``text/rfc822-headers``), or the whole message (``message/rfc822``) when
its sender asked for it (RFC 3461 RET=FULL). The sender's ENVID and each
recipient's ORCPT come back as Original-Envelope-Id and Original-Recipient
(RFC 3464 sections 2.2.1, 2.3.1). Internationalised addresses use the RFC 6533
types (``utf-8`` address type, ``message/global-delivery-status``,
``message/global-headers``) and make the DSN an SMTPUTF8 message.

:func:`build_dsn` is pure: same input, same bytes except the fresh
Message-ID and MIME boundary. The message is assembled line by line rather
than through ``email.generator`` so that the bytes are exactly what the
RFCs ask for: CRLF only, no line over 998 octets (RFC 5322 section 2.1.1),
7-bit fields in ``message/delivery-status``. Dates, Message-IDs and header
parsing come from the stdlib ``email`` package.
"""

from __future__ import annotations

import enum
import re
import secrets
import textwrap
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email import utils
from email.parser import BytesHeaderParser
from email.policy import compat32

from relay.advice import Advice, hop_advice
from relay.certificate import Certificate
from relay.envelope import Envelope, Recipient
from relay.errors import (
    NoRoute,
    NoSuchDomain,
    NullMx,
    RelayError,
    Reply,
    TlsFailure,
    TlsPolicyFailure,
)


class BounceReason(enum.Enum):
    """Why recipients bounced; the value is the relay_bounces_total label."""

    REMOTE_PERMANENT = "remote_permanent"
    TLS_POLICY = "tls_policy"
    EXPIRED = "expired"
    DOUBLE_BOUNCE = "double_bounce"
    DNS_PERMANENT = "dns_permanent"


@dataclass(frozen=True, slots=True)
class TlsIssue:
    """One host that failed the route's TLS policy, and which check it failed."""

    #: The name delivered to (the route's host or the MX name).
    host: str
    reason: TlsFailure
    #: The address tried ("" when unknown).
    ip: str = ""
    #: The certificate it presented, when a certificate check failed and it was read.
    certificate: Certificate | None = None
    #: OpenSSL's words (logs, and the handshake diagnosis).
    detail: str = ""
    #: The domain whose MX lookup gave ``host`` ("" for a host from the route).
    via_mx: str = ""
    #: The domain whose MTA-STS ``enforce`` policy the host failed ("" if none).
    sts_domain: str = ""
    #: The message asked for REQUIRETLS: the sender set the policy, not the route.
    requiretls: bool = False

    @property
    def where(self) -> str:
        return f"{self.host} [{self.ip}]" if self.ip else self.host

    def advice(self, route: str) -> Advice:
        return hop_advice(
            self.reason, self.host, self.certificate, route, self.detail,
            via_mx=self.via_mx, sts_domain=self.sts_domain, requiretls=self.requiretls,
        )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Failure:
    """One recipient listed in a DSN: what failed, where and when."""

    address: str
    #: The reply for the Diagnostic-Code: the next hop's, or our own for TLS/DNS/expiry.
    reply: Reply
    reason: BounceReason
    #: "host [ip]" of the last next hop tried, "host" when it was not reached
    #: at an address (DNS); "" when none was.
    remote_mta: str = ""
    #: Hosts that failed the TLS policy (for the fix-it text).
    tls: tuple[TlsIssue, ...] = ()
    #: Seconds since the epoch of the last attempt, or None if never attempted.
    last_attempt: float | None = None
    #: The route the recipient took ("" if unknown), for the delivery-status
    #: part and the postmaster copy (never the sender's text).
    route: str = ""
    #: The DSN Status when it differs from the reply's (4.4.7 at max_lifetime).
    status: tuple[int, int, int] | None = None
    #: True when ``reply`` came over the wire from ``remote_mta`` (its 4xx/5xx);
    #: False when the relay wrote it (TLS policy, DNS, unreachable, expiry).
    remote: bool = False

    @property
    def status_text(self) -> str:
        return ".".join(str(part) for part in (self.status or self.reply.status))


_DNS_PERMANENT = (NoSuchDomain, NullMx, NoRoute)


def reason_for(results: Iterable[Reply | RelayError]) -> BounceReason:
    """The bounce reason of a recipient whose outcome was "bounced".

    Every candidate failing the TLS policy is ``tls_policy``; a permanent
    DNS answer for the destination (NXDOMAIN, null MX, no address) is
    ``dns_permanent``; anything else is the next hop's 5xx.
    """
    items = list(results)
    if items and all(isinstance(item, TlsPolicyFailure) for item in items):
        return BounceReason.TLS_POLICY
    if any(isinstance(item, _DNS_PERMANENT) for item in items):
        return BounceReason.DNS_PERMANENT
    return BounceReason.REMOTE_PERMANENT


def needs_smtputf8(envelope: Envelope, failed: Sequence[Failure]) -> bool:
    """True when the DSN carries a non-ASCII address and must go out with SMTPUTF8."""
    addresses = [envelope.mail_from, *(f.address for f in failed)]
    return envelope.smtputf8 or not all(a.isascii() for a in addresses)


# --- small formatting helpers ------------------------------------------------

_MAX_LINE = 998  # RFC 5322 section 2.1.1, without the CRLF
_FOLD_AT = 76


def _ascii(text: str) -> str:
    """Fields of message/delivery-status are US-ASCII (RFC 3464 section 2.1.2)."""
    return text.encode("ascii", "replace").decode("ascii")


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _field(name: str, value: str) -> list[str]:
    """A header field folded at white space; words longer than a line are split."""
    words = _one_line(value).split(" ")
    lines: list[str] = []
    line = f"{name}:"
    for word in words:
        while len(word) > _MAX_LINE - 2:
            # No white space to fold at: split the word (never exceed 998).
            lines.append(line)
            line = " " + word[: _MAX_LINE - 2]
            word = word[_MAX_LINE - 2 :]
        if len(line) + 1 + len(word) > _FOLD_AT and line != f"{name}:":
            lines.append(line)
            line = " " + word
        else:
            line = f"{line} {word}" if word else line
    lines.append(line)
    return lines


def _date(seconds: float) -> str:
    return utils.format_datetime(datetime.fromtimestamp(seconds, UTC))


def _remote_name(remote_mta: str) -> str:
    """``"mx.example.com [192.0.2.1]"`` -> ``"mx.example.com"`` for the Remote-MTA field."""
    return remote_mta.split(" ", 1)[0].strip("[]")


def _address_field(address: str, utf8: bool) -> str:
    # RFC 6533 section 3: the "utf-8" address type for internationalised addresses.
    return f"utf-8; {address}" if utf8 and not address.isascii() else f"rfc822; {address}"


def _original_headers(original: bytes) -> bytes:
    """The header block of the original message, CRLF-normalised."""
    end = original.find(b"\r\n\r\n")
    head = original if end < 0 else original[: end + 2]
    lines = re.split(rb"\r\n|\r|\n", head)
    out: list[bytes] = []
    for line in lines:
        if not line:
            continue
        while len(line) > _MAX_LINE:
            out.append(line[:_MAX_LINE])
            line = b" " + line[_MAX_LINE:]
        out.append(line)
    return b"".join(part + b"\r\n" for part in out)


def _original_message_id(headers: bytes) -> str | None:
    parsed = BytesHeaderParser(policy=compat32).parsebytes(headers)
    value = parsed.get("Message-ID")
    if not isinstance(value, str):
        return None
    value = _one_line(value)
    match = re.fullmatch(r"<[^<>\s]+>", value)
    return match.group(0) if match else None


# --- the human-readable part --------------------------------------------------


def _wrap(text: str, indent: str = "") -> list[str]:
    # A "- item" continues under the item's text, not under its dash.
    hanging = indent + ("  " if text.startswith("- ") else "")
    return textwrap.wrap(
        text,
        width=_FOLD_AT,
        initial_indent=indent,
        subsequent_indent=hanging,
        break_long_words=True,
        break_on_hyphens=False,
    ) or [indent.rstrip()]


def _explain(failure: Failure) -> list[str]:
    """Plain words for the sender about one recipient: what failed, at which host.

    No route names and no admin advice: those are for the postmaster
    (the delivery-status part and :func:`build_postmaster_copy`).
    """
    lines = [f"<{failure.address}>:"]
    where = f" at host {failure.remote_mta}" if failure.remote_mta else ""
    if failure.reason is BounceReason.TLS_POLICY:
        lines += _wrap(
            "The message was not sent: this mail system sends mail for this "
            "recipient only over a secure (encrypted and verified) connection, "
            "and no receiving mail server could provide one:",
            "    ",
        )
        for issue in failure.tls:
            lines += _wrap(f"- {issue.where}: {issue.advice(failure.route).sender}", "      ")
    elif failure.reason is BounceReason.EXPIRED:
        lines += _wrap(
            "The message could not be delivered for too long and the mail system "
            f"gave up. The last error{where} was: {failure.reply}",
            "    ",
        )
    elif failure.reason is BounceReason.DNS_PERMANENT:
        lines += _wrap(f"The recipient's domain does not accept mail: {failure.reply}", "    ")
    else:
        lines += _wrap(
            f"The next mail server{where} refused the recipient. It replied: {failure.reply}",
            "    ",
        )
    return lines


def _human_text(
    envelope: Envelope,
    failed: Sequence[Failure],
    hostname: str,
    postmaster_told: bool,
    full: bool = False,
) -> list[str]:
    attached = "Your message is attached." if full else "The headers of your message are attached."
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        *_wrap(
            f"Your message (queue id {envelope.id}) could not be delivered to the "
            "following recipients. This is a permanent error; the mail system will not "
            f"try again. {attached}"
        ),
        "",
    ]
    for failure in failed:
        lines += [*_explain(failure), ""]
    if postmaster_told:
        lines += [*_wrap("The postmaster of this mail system has been told."), ""]
    elif any(f.reason in _RELAY_SIDE for f in failed):
        lines += [
            *_wrap(
                "If this keeps happening, please forward this message to the postmaster "
                f"of {hostname}: the attached report tells them what went wrong."
            ),
            "",
        ]
    return lines


#: Failures the relay's postmaster can fix (a remote 5xx is the recipient side's).
_RELAY_SIDE = (BounceReason.TLS_POLICY, BounceReason.EXPIRED)


def _diagnosis(failure: Failure) -> list[str]:
    """For the postmaster: the route, each host tried, the check it failed and the fix."""
    route = f' (route "{failure.route}")' if failure.route else ""
    lines = [f"<{failure.address}>{route}:"]
    if failure.reason is BounceReason.TLS_POLICY:
        lines += _wrap("Every host failed the route's TLS policy:", "    ")
        for issue in failure.tls:
            advice = issue.advice(failure.route)
            lines += _wrap(f"- {issue.where}: {advice.option} failed: {advice.problem}", "      ")
            for fix in advice.fixes:
                lines += _wrap(f"fix: {fix}", "        ")
    else:
        where = f" at host {failure.remote_mta}" if failure.remote_mta else ""
        lines += _wrap(f"{failure.reason.value}{where}: {failure.reply}", "    ")
    return lines


def _postmaster_text(envelope: Envelope, failed: Sequence[Failure], hostname: str) -> list[str]:
    sender = f"<{envelope.mail_from}>"
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        *_wrap(
            f"A message from {sender} (queue id {envelope.id}) could not be delivered "
            "to the recipients below; its sender has been sent a delivery status "
            "notification without these details. The diagnosis:"
        ),
        "",
    ]
    for failure in failed:
        lines += [*_diagnosis(failure), ""]
    return lines


# --- the delivery-status part -------------------------------------------------


def _message_fields(envelope: Envelope, hostname: str) -> list[str]:
    """RFC 3464 section 2.2: the per-message fields, the sender's ENVID first."""
    lines = _field("Original-Envelope-Id", envelope.envid) if envelope.envid else []
    return [
        *lines,
        *_field("Reporting-MTA", f"dns; {hostname}"),
        *_field("X-Relay-Queue-ID", envelope.id),
        *_field("Arrival-Date", _date(envelope.received_at)),
    ]


def _recipient_fields(envelope: Envelope, address: str, utf8: bool) -> list[str]:
    """Original-Recipient (the client's ORCPT, RFC 3464 section 2.3.1) and Final-Recipient."""
    clean = (lambda s: s) if utf8 else _ascii
    orcpt = next((r.orcpt for r in envelope.recipients if r.address == address), "")
    addr_type, _, original = orcpt.partition(";")
    lines = _field("Original-Recipient", clean(f"{addr_type}; {original}")) if orcpt else []
    return [*lines, *_field("Final-Recipient", clean(_address_field(address, utf8)))]


def _status_fields(
    envelope: Envelope, failed: Sequence[Failure], hostname: str, utf8: bool
) -> list[str]:
    clean = (lambda s: s) if utf8 else _ascii
    # RFC 3464 section 2.2: per-message fields first, then a block per recipient.
    lines = _message_fields(envelope, hostname)
    for failure in failed:
        lines.append("")
        lines += _recipient_fields(envelope, failure.address, utf8)
        lines += _field("Action", "failed")
        lines += _field("Status", failure.status_text)
        # RFC 3464 section 2.3.5: the host the relay tried to pass the
        # recipient to, whether it answered or failed a TLS check. A name
        # without an address was never reached (DNS): no Remote-MTA.
        if failure.remote_mta.endswith("]"):
            lines += _field("Remote-MTA", clean(f"dns; {_remote_name(failure.remote_mta)}"))
        # RFC 3464 section 2.3.6: "smtp;" is a reply the remote host sent;
        # the relay's own diagnosis (TLS policy, DNS, unreachable) gets its own type.
        kind = "smtp" if failure.remote else "X-Relay"
        lines += _field("Diagnostic-Code", clean(f"{kind}; {failure.reply}"))
        if failure.last_attempt is not None:
            lines += _field("Last-Attempt-Date", _date(failure.last_attempt))
        # RFC 3464 section 7: extension fields "X-" for the postmaster.
        if failure.route:
            lines += _field("X-Relay-Route", clean(failure.route))
        for issue in failure.tls:
            advice = issue.advice(failure.route)
            text = f"{issue.where}: {advice.option} failed: {advice.one_line()}"
            lines += _field("X-Relay-Diagnosis", clean(text))
    return lines


# --- delay warnings -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Delay:
    """One recipient still being retried, listed in a delay warning."""

    address: str
    #: The last error (a temporary failure, or our own diagnosis).
    reply: Reply
    #: "host [ip]" of the last next hop tried, as in :class:`Failure`.
    remote_mta: str = ""
    #: True when ``reply`` came over the wire from ``remote_mta``.
    remote: bool = False
    #: Seconds since the epoch of the last attempt.
    last_attempt: float | None = None
    route: str = ""

    @property
    def status_text(self) -> str:
        # RFC 3464 section 2.3.4: a "delayed" action goes with a 4.x.y status;
        # a permanent-looking last reply (one host's TLS verdict while others
        # were only unreachable) is still a temporary state of this recipient.
        _, subject, detail = self.reply.status
        return f"4.{subject}.{detail}"


def _delay_text(
    envelope: Envelope, delayed: Sequence[Delay], hostname: str, give_up: float
) -> list[str]:
    waited = _age(envelope.received_at, give_up)
    lines = [
        f"This is the mail system at host {hostname}.",
        "",
        "####################################################################",
        "# THIS IS A WARNING ONLY.  YOU DO NOT NEED TO RESEND YOUR MESSAGE. #",
        "####################################################################",
        "",
        *_wrap(
            f"Your message (queue id {envelope.id}) could not be delivered to the "
            f"following recipients yet. The mail system will keep trying until "
            f"{_date(give_up)} ({waited} after it arrived) and tell you if it then "
            "still fails. The headers of your message are attached."
        ),
        "",
    ]
    for item in delayed:
        where = f" at host {item.remote_mta}" if item.remote_mta else ""
        lines += [f"<{item.address}>:", *_wrap(f"The last error{where} was: {item.reply}", "    ")]
        lines.append("")
    return lines


def _age(start: float, end: float) -> str:
    hours = max(0.0, end - start) / 3600
    return f"{hours / 24:g} days" if hours >= 48 else f"{hours:g} hours"


def _delay_fields(
    envelope: Envelope, delayed: Sequence[Delay], hostname: str, give_up: float, utf8: bool
) -> list[str]:
    clean = (lambda s: s) if utf8 else _ascii
    lines = _message_fields(envelope, hostname)
    for item in delayed:
        lines.append("")
        lines += _recipient_fields(envelope, item.address, utf8)
        lines += _field("Action", "delayed")
        lines += _field("Status", item.status_text)
        if item.remote_mta.endswith("]"):
            lines += _field("Remote-MTA", clean(f"dns; {_remote_name(item.remote_mta)}"))
        kind = "smtp" if item.remote else "X-Relay"
        lines += _field("Diagnostic-Code", clean(f"{kind}; {item.reply}"))
        if item.last_attempt is not None:
            lines += _field("Last-Attempt-Date", _date(item.last_attempt))
        # RFC 3464 section 2.3.9: when the relay gives up ([queue] max_lifetime).
        lines += _field("Will-Retry-Until", _date(give_up))
        if item.route:
            lines += _field("X-Relay-Route", clean(item.route))
    return lines


def build_delay_warning(
    envelope: Envelope,
    delayed: Sequence[Delay],
    *,
    hostname: str,
    original: bytes,
    now: datetime,
    give_up: float,
) -> bytes:
    """The RFC 3464 report telling ``envelope.mail_from`` that ``delayed``
    recipients are still being retried (``Action: delayed``, a 4.x.y
    ``Status``, the last error and ``Will-Retry-Until`` = ``give_up``).

    Raises ValueError for a null sender or no recipients (never to ``<>``).
    """
    if not envelope.mail_from:
        raise ValueError("never send a DSN to the null reverse-path")
    if not delayed:
        raise ValueError("a delay warning needs at least one delayed recipient")
    utf8 = delay_needs_smtputf8(envelope, delayed)
    text = _delay_text(envelope, delayed, hostname, give_up)
    fields = _delay_fields(envelope, delayed, hostname, give_up, utf8)
    to = f"<{envelope.mail_from}>"
    subject = "Delayed Mail (still being retried)"
    return _assemble(original, hostname, now, to, subject, text, fields, utf8)


def delay_needs_smtputf8(envelope: Envelope, delayed: Sequence[Delay]) -> bool:
    """True when the delay warning carries a non-ASCII address (sent with SMTPUTF8)."""
    addresses = [envelope.mail_from, *(d.address for d in delayed)]
    return envelope.smtputf8 or not all(a.isascii() for a in addresses)


# --- "relayed" notices (RFC 3461 section 4.2) ------------------------------------


def build_relayed(
    envelope: Envelope,
    relayed: Sequence[Recipient],
    *,
    hostname: str,
    original: bytes,
    now: datetime,
) -> bytes:
    """The RFC 3464 report telling ``envelope.mail_from`` that ``relayed``
    recipients, who asked NOTIFY=SUCCESS, were handed to a next hop that
    does not offer DSN (``Action: relayed``, ``Status: 2.0.0``): no further
    notice will come. Headers only (RFC 3461 section 4.3: a DSN without a
    failure returns no content). Raises ValueError for a null sender.
    """
    if not envelope.mail_from:
        raise ValueError("never send a DSN to the null reverse-path")
    if not relayed:
        raise ValueError("a relayed notice needs at least one recipient")
    utf8 = relayed_needs_smtputf8(envelope, relayed)
    clean = (lambda s: s) if utf8 else _ascii
    text = [
        f"This is the mail system at host {hostname}.",
        "",
        *_wrap(
            f"Your message (queue id {envelope.id}) was delivered to the mail servers "
            "of the following recipients, as you asked to be told. Those servers do "
            "not send delivery notifications, so you will not hear more about it. "
            "The headers of your message are attached."
        ),
        "",
    ]
    fields = _message_fields(envelope, hostname)
    for rcpt in relayed:
        where = f" at host {rcpt.remote_mta}" if rcpt.remote_mta else ""
        reply = f": {rcpt.last_reply}" if rcpt.last_reply else ""
        text += [f"<{rcpt.address}>:", *_wrap(f"Relayed{where}{reply}", "    "), ""]
        fields.append("")
        fields += _recipient_fields(envelope, rcpt.address, utf8)
        fields += [*_field("Action", "relayed"), *_field("Status", "2.0.0")]
        if rcpt.remote_mta.endswith("]"):
            fields += _field("Remote-MTA", clean(f"dns; {_remote_name(rcpt.remote_mta)}"))
        if rcpt.last_reply is not None and rcpt.last_remote:
            fields += _field("Diagnostic-Code", clean(f"smtp; {rcpt.last_reply}"))
    to = f"<{envelope.mail_from}>"
    subject = "Successful Mail Delivery Report"
    return _assemble(original, hostname, now, to, subject, text, fields, utf8)


def relayed_needs_smtputf8(envelope: Envelope, relayed: Sequence[Recipient]) -> bool:
    """True when the relayed notice carries a non-ASCII address (sent with SMTPUTF8)."""
    addresses = [envelope.mail_from, *(r.address for r in relayed)]
    return envelope.smtputf8 or not all(a.isascii() for a in addresses)


# --- assembly -------------------------------------------------------------------


def build_dsn(
    envelope: Envelope,
    failed: Sequence[Failure],
    *,
    hostname: str,
    original: bytes,
    now: datetime,
    postmaster_told: bool = False,
    full: bool = False,
) -> bytes:
    """The RFC 3464 report telling ``envelope.mail_from`` that ``failed`` recipients bounced.

    ``original`` is the spooled message: only its headers are returned
    unless ``full`` (the sender's RET=FULL, and ``original`` is all of it).
    ``now`` is the Date of the report. ``postmaster_told``: a postmaster
    copy goes out too (``[bounces] notify``), and the text says so.
    Raises ValueError for a null sender or no failures: those never get a
    DSN (no bounce loops).
    """
    if not envelope.mail_from:
        raise ValueError("never bounce the null reverse-path")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    text = _human_text(envelope, failed, hostname, postmaster_told, full)
    to = f"<{envelope.mail_from}>"
    subject = "Undelivered Mail Returned to Sender"
    utf8 = needs_smtputf8(envelope, failed)
    fields = _status_fields(envelope, failed, hostname, utf8)
    return _assemble(original, hostname, now, to, subject, text, fields, utf8, full)


def build_postmaster_copy(
    envelope: Envelope,
    failed: Sequence[Failure],
    *,
    hostname: str,
    original: bytes,
    now: datetime,
    notify: Sequence[str],
) -> bytes:
    """The copy of a DSN for ``[bounces] notify``: the same report, with the
    full diagnosis (route, each host, the check it failed, the fix) in its
    text. Sent with the null sender like any DSN, so it never bounces back.
    """
    if not notify:
        raise ValueError("a postmaster copy needs at least one address")
    if not failed:
        raise ValueError("a DSN needs at least one failed recipient")
    text = _postmaster_text(envelope, failed, hostname)
    to = ", ".join(f"<{address}>" for address in notify)
    subject = "Postmaster Copy: Undelivered Mail"
    return _report(envelope, failed, hostname, original, now, to, subject, text)


def _report(
    envelope: Envelope,
    failed: Sequence[Failure],
    hostname: str,
    original: bytes,
    now: datetime,
    to: str,
    subject: str,
    text: list[str],
) -> bytes:
    utf8 = needs_smtputf8(envelope, failed)
    fields = _status_fields(envelope, failed, hostname, utf8)
    return _assemble(original, hostname, now, to, subject, text, fields, utf8)


def _assemble(
    original: bytes,
    hostname: str,
    now: datetime,
    to: str,
    subject: str,
    text: list[str],
    fields: list[str],
    utf8: bool,
    full: bool = False,
) -> bytes:
    """The multipart/report around ``text`` and the delivery-status ``fields``;
    the original's headers, or all of it when ``full``."""
    boundary = f"=_relay_{secrets.token_hex(12)}"
    headers = _original_headers(original)
    original_id = _original_message_id(headers)
    if full:
        returned = _returned(original, utf8, boundary)
    else:
        returned = _returned_headers(headers, utf8, boundary)
    top = [
        *_field("From", f"Mail Delivery System <MAILER-DAEMON@{hostname}>"),
        *_field("To", to),
        *_field("Subject", subject),
        *_field("Date", utils.format_datetime(now.astimezone(UTC))),
        *_field("Message-ID", utils.make_msgid("dsn", domain=hostname)),
    ]
    if original_id:
        top += [*_field("In-Reply-To", original_id), *_field("References", original_id)]
    top += [
        # RFC 3834 section 5: a DSN is an automatic reply, so auto-responders stay quiet.
        *_field("Auto-Submitted", "auto-replied"),
        "MIME-Version: 1.0",
        *_field(
            "Content-Type",
            f'multipart/report; report-type=delivery-status; boundary="{boundary}"',
        ),
        "",
        "This is a MIME-encapsulated delivery status notification.",
    ]
    if not utf8:
        # Without SMTPUTF8 keep the whole DSN 7-bit; a stray non-ASCII reply
        # text is not worth a transfer encoding.
        text = [_ascii(line) for line in text]
    text_ascii = all(line.isascii() for line in text)
    human = [
        f"--{boundary}",
        "Content-Type: text/plain; charset=" + ("us-ascii" if text_ascii else "utf-8"),
        "Content-Transfer-Encoding: " + ("7bit" if text_ascii else "8bit"),
        "Content-Description: Notification",
        "",
        *text,
    ]
    status_type = "message/global-delivery-status" if utf8 else "message/delivery-status"
    status = [
        f"--{boundary}",
        f"Content-Type: {status_type}",
        "Content-Description: Delivery report",
        "",
        *fields,
        "",
    ]
    text_bytes = "\r\n".join([*top, *human, *status]).encode("utf-8")
    return text_bytes + b"\r\n" + returned


def _returned_headers(headers: bytes, utf8: bool, boundary: str) -> bytes:
    """The last part: the original's header section."""
    # RFC 6533 section 3.3: message/global-headers for headers that may be UTF-8.
    headers_type = "message/global-headers" if utf8 else "text/rfc822-headers"
    if not utf8 and not headers.isascii():
        headers = headers.decode("ascii", "replace").encode("ascii", "replace")
    head_part = [
        f"--{boundary}",
        f"Content-Type: {headers_type}",
        "Content-Description: Undelivered Message Headers",
        "",
    ]
    return "\r\n".join(head_part).encode() + b"\r\n" + headers + _closing(boundary)


def _returned(original: bytes, utf8: bool, boundary: str) -> bytes:
    """The last part: the whole original (RET=FULL), lines cut at 998 octets."""
    # RFC 6533 section 3.2: message/global for a message that may be UTF-8.
    kind = "message/global" if utf8 else "message/rfc822"
    lines = re.split(rb"\r\n|\r|\n", original)
    if lines and not lines[-1]:
        lines.pop()
    body = b"".join(
        line[i : i + _MAX_LINE] + b"\r\n"
        for line in lines
        for i in range(0, len(line) or 1, _MAX_LINE)
    )
    part = [
        f"--{boundary}",
        f"Content-Type: {kind}",
        "Content-Description: Undelivered Message",
        "Content-Transfer-Encoding: " + ("7bit" if body.isascii() else "8bit"),
        "",
    ]
    return "\r\n".join(part).encode() + b"\r\n" + body + _closing(boundary)


def _closing(boundary: str) -> bytes:
    return f"\r\n--{boundary}--\r\n".encode("ascii")
