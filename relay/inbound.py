"""Inbound SMTP: aiosmtpd listeners, recipient policy, message checks, spool before 250.

Implements the receiving side of RFC 5321 with SIZE (RFC 1870), 8BITMIME
(RFC 6152), SMTPUTF8 (RFC 6531) and STARTTLS (RFC 3207). The rules:

* Envelope addresses are parsed strictly by the RFC 5321 section 4.1.2
  grammar (not aiosmtpd's lenient RFC 5322 header parser), so a CR, LF, NUL
  or any other control character can never enter the spool or the next hop.
* A message ends only at CRLF.CRLF; a bare CR or bare LF anywhere in it gets
  the whole message refused, never normalised (no SMTP smuggling).
* ``250 queued as`` is sent only after :meth:`relay.spool.Spool.put` has
  made message and envelope durable.

aiosmtpd is imported in this module only: the rest of relay does not depend on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import email.utils
import ipaddress
import logging
import re
import resource
import ssl
import string
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol

from aiosmtpd.smtp import MISSING, SMTP, Session, syntax
from aiosmtpd.smtp import Envelope as SmtpEnvelope

from relay import errors, events
from relay.admission import (
    Connections,
    MemoryBudget,
    RefusalLog,
    client_key,
    raise_fd_limit,
)
from relay.config import Config, Listen, domain_key
from relay.dns import ReverseResolver, confirmed_name
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.errors import Reply, SpoolError, SpoolFull
from relay.metrics import CONNECTION_REFUSALS, REJECT_REASONS, Metrics
from relay.spool import Spool
from relay.spoolbody import IN_MEMORY_MAX, BodyWriter
from relay.spoolfiles import new_id

# RFC 5321 section 6.3 suggests 100 hops; relay allows 30 (README.md "What relay accepts").
MAX_RECEIVED = 30
#: The one mailbox allowed without a domain (RFC 5321 section 4.5.1).
POSTMASTER = "postmaster"

# --- envelope addresses (RFC 5321 section 4.1.2, RFC 6531 section 3.3) -------

_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset(string.ascii_letters + string.digits + "-")


class AddressError(ValueError):
    """The MAIL FROM / RCPT TO argument is not a valid RFC 5321 path."""


def _non_ascii_ok(ch: str) -> bool:
    # UTF8-non-ascii (RFC 6531 section 3.3), but never a C1 control or a
    # lone surrogate (aiosmtpd's surrogateescape for invalid UTF-8).
    code = ord(ch)
    return code > 0x9F and not 0xD800 <= code <= 0xDFFF and ch.isprintable()


def _is_atext(ch: str) -> bool:
    return ch in _ATEXT or (ord(ch) > 127 and _non_ascii_ok(ch))


def _check_dot_string(local: str) -> None:
    # Dot-string = Atom *("." Atom); no empty atoms, so no leading,
    # trailing or doubled dots, and no "@" (which is not atext).
    atoms = local.split(".")
    if not all(atoms) or not all(_is_atext(ch) for atom in atoms for ch in atom):
        raise AddressError(f"bad local part {local!r}")


def _check_quoted_string(quoted: str) -> None:
    # Quoted-string = DQUOTE *QcontentSMTP DQUOTE; qtextSMTP is %d32-33 /
    # %d35-91 / %d93-126, quoted-pairSMTP is "\" %d32-126: no controls.
    body = quoted[1:-1]
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\":
            if i + 1 >= len(body) or not 32 <= ord(body[i + 1]) <= 126:
                raise AddressError("bad quoted-pair")
            i += 2
            continue
        ascii_ok = 32 <= ord(ch) <= 126 and ch != '"'
        if not ascii_ok and not (ord(ch) > 127 and _non_ascii_ok(ch)):
            raise AddressError("bad character in quoted local part")
        i += 1


def _check_domain(domain: str) -> None:
    # Domain = sub-domain *("." sub-domain); sub-domain = Let-dig [Ldh-str],
    # or a U-label under SMTPUTF8 (RFC 6531 section 3.3).
    if not domain or len(domain.encode("utf-8", "surrogateescape")) > 255:
        raise AddressError("bad domain length")
    for label in domain.split("."):
        if not label or label.startswith("-") or label.endswith("-") or len(label) > 63:
            raise AddressError(f"bad domain label {label!r}")
        if not all(ch in _LDH or (ord(ch) > 127 and _non_ascii_ok(ch)) for ch in label):
            raise AddressError(f"bad domain label {label!r}")


def _check_address_literal(literal: str) -> None:
    # address-literal = "[" ( IPv4 / "IPv6:" IPv6 / General ) "]" (section 4.1.3).
    inner = literal[1:-1]
    try:
        if inner[:5].lower() == "ipv6:":
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError(f"bad address literal {literal!r}") from None


def _split_mailbox(mailbox: str) -> tuple[str, str]:
    """Local part and domain of ``Mailbox = Local-part "@" ( Domain / address-literal )``."""
    if mailbox.startswith('"'):
        end = 1
        while end < len(mailbox) and mailbox[end] != '"':
            end += 2 if mailbox[end] == "\\" else 1
        local, rest = mailbox[: end + 1], mailbox[end + 1 :]
        if not rest.startswith("@") or len(local) < 2:
            raise AddressError("quoted local part must be followed by @domain")
        _check_quoted_string(local)
        return local, rest[1:]
    local, at, domain = mailbox.partition("@")
    if not at:
        raise AddressError("no @domain")
    _check_dot_string(local)
    return local, domain


def check_mailbox(mailbox: str) -> tuple[str, str]:
    """Validate one RFC 5321 Mailbox; return (local part, domain). Raises AddressError."""
    local, domain = _split_mailbox(mailbox)
    if domain.startswith("[") and domain.endswith("]"):
        _check_address_literal(domain)
    else:
        # A second "@" (user@other.test@example.com) lands here and fails.
        _check_domain(domain)
    return local, domain


def _path_end(arg: str) -> int:
    """Index of the ">" closing the path, skipping quoted strings."""
    quoted = False
    i = 1
    while i < len(arg):
        ch = arg[i]
        if quoted and ch == "\\":
            i += 2
            continue
        if ch == '"':
            quoted = not quoted
        elif ch == ">" and not quoted:
            return i
        i += 1
    raise AddressError("no closing '>'")


def parse_path(arg: str) -> tuple[str, str]:
    """Split a MAIL FROM / RCPT TO argument into (mailbox, parameters).

    ``Path = "<" [ A-d-l ":" ] Mailbox ">"`` (RFC 5321 section 4.1.2). The
    null reverse-path comes back as ``"<>"``. A source route is checked
    and dropped: section 3.6.1 says a server SHOULD ignore the route and
    send to the final mailbox, so policy applies to that mailbox only.
    The mailbox is returned exactly as written (quotes kept), so the next
    hop receives what the client sent. Raises AddressError.
    """
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in arg):
        # CR, LF, NUL, TAB...: never part of a path or a parameter.
        raise AddressError("control character in argument")
    if not arg.startswith("<"):
        raise AddressError("the path must be in angle brackets")
    end = _path_end(arg)
    inner, rest = arg[1:end], arg[end + 1 :]
    if rest and not rest.startswith(" "):
        raise AddressError("junk after the path")
    if inner == "":
        return "<>", rest.strip()
    if inner.lower() == POSTMASTER:
        # RFC 5321 section 4.5.1: "RCPT TO:<Postmaster>" MUST be accepted.
        return inner, rest.strip()
    if inner.startswith("@"):
        route, colon, inner = inner.partition(":")
        if not colon:
            raise AddressError("source route without ':'")
        for hop in route.split(","):
            if not hop.startswith("@"):
                raise AddressError("bad source route")
            _check_domain(hop[1:])
    check_mailbox(inner)
    return inner, rest.strip()


def domain_of(mailbox: str) -> str:
    """The domain of a mailbox already checked by :func:`parse_path`, lower-cased."""
    return mailbox.rpartition("@")[2].lower()


# --- recipient policy (docs/inbound.md) ------------------------------------


def client_address(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%")[0])
    except ValueError:
        return None
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


def may_relay(config: Config, ip: str) -> bool:
    """True when the client's address is in ``[server] relay_networks``."""
    addr = client_address(ip)
    return addr is not None and any(addr in net for net in config.server.relay_networks)


#: Characters a next hop may read as a route inside a local part.
ROUTING_CHARACTERS = frozenset("%!@")


def has_routing_characters(mailbox: str) -> bool:
    """True when the local part holds ``%``, ``!`` or (quoted) ``@``."""
    return not ROUTING_CHARACTERS.isdisjoint(mailbox.rpartition("@")[0])


def recipient_reply(config: Config, client_ip: str, mailbox: str, sender: str = "") -> Reply:
    """Accept or refuse one recipient (a mailbox from :func:`parse_path`) of
    mail from ``sender`` (rules may match the sender too).

    * an address literal (``user@[192.0.2.1]``): refused for everyone,
      550 5.7.1 -- it names no domain the rules could route;
    * a domain in ``domains``: accepted when a rule matches, else 550 5.1.1
      -- for every client, trusted or not: its public MX is usually this
      relay, so sending it there would loop ("mail for X loops back to
      myself", as Postfix says);
    * a client in ``relay_networks``: accepted, any other domain;
    * anything else: 550 5.7.1 relaying denied.

    The domain is the part after the *last* "@", the one RFC 5321 routes
    by; ``%``, ``!`` and quoted ``@`` in the local part are never
    interpreted here (section 2.3.11: only the destination host does).
    But the next hop may interpret them (``user%other.test@ours`` is
    sendmail's "percent hack"), turning our route into an open relay, so
    for a served domain they are refused (550 5.7.1) to clients outside
    ``relay_networks`` unless ``allow_routing_characters`` (Postfix's
    ``allow_untrusted_routing = no``).
    It is compared as A-labels, so ``user@bücher.example`` (RFC 6531
    section 3.3) is the served domain ``xn--bcher-kva.example``.
    """
    domain = domain_of(mailbox)
    if domain.startswith("["):
        return errors.RELAYING_DENIED
    if domain_key(domain) in config.server.domains:
        if (
            has_routing_characters(mailbox)
            and not config.server.allow_routing_characters
            and not may_relay(config, client_ip)
        ):
            return errors.ROUTING_CHARACTERS
        return errors.RECIPIENT_OK if config.route_for(mailbox, sender) else errors.NO_ROUTE
    if may_relay(config, client_ip):
        return errors.RECIPIENT_OK
    return errors.RELAYING_DENIED


# --- message checks and the Received header ----------------------------------

_HELO = re.compile(r"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[A-Za-z0-9.:]+\])$")
_WSP = (0x20, 0x09)


def valid_helo(name: str) -> bool:
    """An EHLO/HELO argument we will write into a Received header.

    A domain or an address literal (RFC 5321 section 4.1.1.1); underscores
    are tolerated (common in Windows host names). Anything else -- CR, LF,
    NUL, spaces, parentheses, non-ASCII -- is refused with 501.
    """
    return len(name) <= 255 and bool(_HELO.match(name))


def has_bare_line_ending(content: bytes) -> bool:
    """True when a CR or LF appears other than as the pair CRLF."""
    pairs = content.count(b"\r\n")
    return content.count(b"\r") != pairs or content.count(b"\n") != pairs


def _valid_field_name(name: bytes) -> bool:
    # field-name = 1*ftext; ftext = %d33-57 / %d59-126 (RFC 5322 section 3.6.8).
    return bool(name) and all(33 <= b <= 126 and b != 58 for b in name)


class MessageCheck:
    """The checks of :func:`check_message`, fed the content in pieces.

    Each piece must start at the start of a line and end in CRLF (or be
    the last), as :func:`read_data` hands them out, so no CRLF and no header
    line is ever split between two pieces. Fed the whole content at once it
    is :func:`check_message`.
    """

    __slots__ = ("max_received", "nul", "bare", "bad_header", "received", "in_header", "lines")

    def __init__(self, max_received: int = MAX_RECEIVED) -> None:
        self.max_received = max_received
        self.nul = self.bare = self.bad_header = False
        self.received = 0
        self.in_header = True
        #: Header lines seen so far (only whether it is 0 matters).
        self.lines = 0

    def feed(self, content: bytes) -> None:
        if b"\x00" in content:
            self.nul = True
        if has_bare_line_ending(content):
            self.bare = True
        if self.in_header and not self.bad_header and content:
            self._headers(content)

    def _headers(self, content: bytes) -> None:
        if content.startswith(b"\r\n"):
            # An empty line: the header section ended with the last piece
            # (or the message has none).
            self.in_header = False
            return
        # find + slice, not partition: partition would copy the whole body too.
        end = content.find(b"\r\n\r\n")
        if end >= 0:
            self.in_header = False
        lines = (content if end < 0 else content[:end]).split(b"\r\n")
        if not lines[-1]:
            # A piece (or a message of headers only) ends in CRLF.
            lines.pop()
        for line in lines:
            first = self.lines == 0
            self.lines += 1
            if line[:1] and line[0] in _WSP:
                if first:
                    self.bad_header = True
                    return
                continue
            name, colon, _ = line.partition(b":")
            if not colon or not _valid_field_name(name):
                self.bad_header = True
                return
            if name.lower() == b"received":
                self.received += 1

    def result(self) -> tuple[Reply, str] | None:
        """Why the message must be refused (reply, metric reason), or None."""
        if self.nul:
            return errors.NUL_IN_MESSAGE, "bad_content"
        if self.bare:
            return errors.BARE_LINE_ENDING, "bare_line_ending"
        if self.bad_header:
            return errors.BAD_HEADER, "bad_header"
        if self.received > self.max_received:
            return errors.LOOP_DETECTED, "loop"
        return None


def check_message(content: bytes, max_received: int = MAX_RECEIVED) -> tuple[Reply, str] | None:
    """Why the message must be refused (reply, metric reason), or None.

    Refuses NUL anywhere, a bare CR or bare LF anywhere (Postfix's
    smtpd_forbid_bare_newline idea: refused, never normalised), a header
    section line that is neither ``name:`` nor a continuation -- a leading
    continuation line would fold into our Received header -- and more than
    ``max_received`` Received headers (a mail loop).
    """
    check = MessageCheck(max_received)
    check.feed(content)
    return check.result()


def protocol_keyword(esmtp: bool, tls: bool, smtputf8: bool) -> str:
    """The Received ``with`` keyword: RFC 3848 (ESMTP, ESMTPS) and RFC 6531 (UTF8SMTP[S])."""
    if not esmtp:
        return "SMTP"
    base = "UTF8SMTP" if smtputf8 else "ESMTP"
    return base + ("S" if tls else "")


def _tcp_info(ip: str, name: str | None) -> str:
    """RFC 5321 section 4.4 TCP-info as Postfix writes it: ``name [ip]``,
    the name forward-confirmed (:func:`relay.dns.confirmed_name`) or ``unknown``."""
    addr = client_address(ip)
    if addr is None:
        return f"{name or 'unknown'} [unknown]"
    # RFC 5321 section 4.1.3: IPv6 literals carry the "IPv6:" tag.
    literal = f"[IPv6:{addr}]" if addr.version == 6 else f"[{addr}]"
    return f"{name or 'unknown'} {literal}"


def received_header(
    *,
    helo: str,
    client_ip: str,
    hostname: str,
    protocol: str,
    queue_id: str,
    recipients: Sequence[str],
    when: float,
    cipher: tuple[str, str, int] | None = None,
    client_name: str | None = None,
) -> bytes:
    """Our trace header (RFC 5321 section 4.4), folded, ending in CRLF.

    Every variable part was validated before (HELO by :func:`valid_helo`,
    addresses by :func:`parse_path`), so nothing here can break the line.
    The ``for`` clause names the recipient only when there is exactly one,
    so one recipient never learns about the others.
    """
    stamp = email.utils.format_datetime(datetime.fromtimestamp(when, UTC))
    lines = [f"Received: from {helo} ({_tcp_info(client_ip, client_name)})"]
    by = f"by {hostname} (relay) with {protocol}"
    if cipher:
        by += f" (using {cipher[1]} with cipher {cipher[0]} ({cipher[2]} bits))"
    lines.append(by)
    last = f"id {queue_id}"
    if len(recipients) == 1:
        last += f"\r\n\tfor <{recipients[0]}>"
    lines.append(f"{last}; {stamp}")
    return ("\r\n\t".join(lines) + "\r\n").encode("utf-8")


# --- aiosmtpd glue ----------------------------------------------------------

# aiosmtpd answers some conditions itself with fixed texts; they are mapped
# here to our replies (and metric reasons), the one place where its wire
# texts are known. Pinned to aiosmtpd 1.4.6 by tests/test_inbound_smtp.py.
_AIOSMTPD_REPLIES: dict[str, tuple[Reply, str]] = {
    "552 Error: Too much mail data": (errors.MESSAGE_TOO_BIG, "too_big"),
    "552 Error: message size exceeds fixed maximum message size": (
        errors.MESSAGE_TOO_BIG,
        "too_big",
    ),
    "553 5.1.3 Error: malformed address": (errors.MALFORMED_ADDRESS, "bad_address"),
    "500 Line too long (see RFC5321 4.5.3.1.6)": (errors.LINE_TOO_LONG, "bad_syntax"),
    "500 Command line too long": (errors.LINE_TOO_LONG, "bad_syntax"),
    # An empty command line, or one that ended in a bare LF (_CrlfCommandReader).
    "500 Error: bad syntax": (errors.BAD_COMMAND_LINE, "bad_syntax"),
}


class _CrlfCommandReader(asyncio.StreamReader):
    """aiosmtpd's stream reader, refusing command lines that end in a bare LF.

    aiosmtpd reads commands up to LF (``readuntil()``) and DATA lines up to
    CRLF. RFC 5321 section 2.3.8 says lines end in CRLF only; a command
    ending in a bare LF is turned into an empty line, which aiosmtpd
    answers with its syntax error (mapped to 500 5.5.2 below), so the
    command is refused rather than executed. DATA lines (read up to CRLF)
    are returned untouched, and each one calls ``on_data_line``.
    """

    #: Called after each DATA line is read (the session's idle timer).
    on_data_line: Callable[[], None] | None = None
    #: Called after each command line is read (the session is busy).
    on_command: Callable[[], None] | None = None
    #: Set when the session said 421: commands already buffered (pipelined)
    #: must not run, so every later read ends the session's task.
    closed = False

    async def readuntil(self, separator: bytes = b"\n") -> bytes:  # type: ignore[override]
        if self.closed:
            raise asyncio.CancelledError
        line = await super().readuntil(separator)
        # A bare CR just before the CRLF ("DATA\r\r\n") would vanish in
        # aiosmtpd's rstrip and the command would run: refuse it like a bare
        # LF. A CR inside an argument is left to the argument checks (501).
        if separator == b"\n" and self.on_command is not None:
            self.on_command()
        if separator == b"\n" and (not line.endswith(b"\r\n") or line.endswith(b"\r\r\n")):
            return b"\n"
        if separator == b"\r\n" and self.on_data_line is not None:
            self.on_data_line()
        return line

    async def read(self, n: int = -1) -> bytes:
        if self.closed:
            raise asyncio.CancelledError
        return await super().read(n)

    def unread(self, data: bytes) -> None:
        """Put back what a block read took past the end of DATA (pipelined commands)."""
        self._buffer[0:0] = data  # type: ignore[attr-defined]


#: Bytes asked for per read while receiving DATA.
DATA_BLOCK = 1 << 16
_DATA_END = b"\r\n.\r\n"
#: aiosmtpd's own replies, which push() maps to ours (and counts).
_TOO_MUCH = "552 Error: Too much mail data"
_TOO_LONG = "500 Line too long (see RFC5321 4.5.3.1.6)"


class Spill(Protocol):
    """Where :func:`read_data` puts the content of a large message as it comes."""

    @property
    def threshold(self) -> int:
        """Unflushed raw content above this many bytes goes to :meth:`write`."""

    def holding(self, size: int) -> None:
        """:func:`read_data` holds ``size`` bytes of content in memory now."""

    async def write(self, raw: bytes) -> None:
        """Take ``raw``: still dot-stuffed, whole lines (starting at a line
        start, ending in CRLF, except the last piece which ends the content)."""

    def abandon(self) -> None:
        """The message is refused (too big, line too long): drop what was written."""


async def read_data(
    reader: _CrlfCommandReader,
    size_limit: int | None,
    line_limit: int,
    spill: Spill | None = None,
) -> tuple[bytes | None, str | None]:
    """Read DATA content up to CRLF.CRLF in blocks: (raw content, None), or
    (None, aiosmtpd's refusal) when too big or a line too long, or (None,
    None) at end of stream. The raw content is still dot-stuffed and ends
    in CRLF (or is empty); bytes read past the terminator are put back.

    With ``spill``, once more than ``spill.threshold`` bytes are held the
    complete lines go to ``spill.write`` as they come, and so does the rest
    at the end: the content is then (b"", None) and ``spill`` has it all.
    On a refusal the spill is abandoned; at end of stream the caller
    cleans up. Below the threshold nothing changes (the fast path).

    aiosmtpd reads DATA one line per await, which cost about 8 ms of CPU
    per 100 KiB message (docs/performance.md); this reads up to DATA_BLOCK at once and
    finds the terminator with bytes.find. Limits as aiosmtpd: the size
    counts every line with its CRLF; a line longer than ``line_limit``
    with its CRLF is refused.
    """
    # The CRLF before the terminator may be the one that ended "DATA":
    # start with it so an empty message is found like any other. buf[i] is
    # content byte i - 2 + shift: shift counts the bytes dropped or spilled.
    buf = bytearray(b"\r\n")
    shift = 0
    refusal: str | None = None
    spilled = False
    while True:
        start = max(0, len(buf) - len(_DATA_END) + 1)
        block = await reader.read(DATA_BLOCK)
        if not block:
            return None, None
        if reader.on_data_line is not None:
            # Data is flowing: restart the idle timer (per block, not per line).
            reader.on_data_line()
        buf += block
        if spill is not None:
            spill.holding(len(buf))
        end = buf.find(_DATA_END, start)
        if end >= 0:
            break
        if refusal is None and size_limit and shift + len(buf) - 2 > size_limit + len(_DATA_END):
            refusal = _TOO_MUCH
        elif refusal is None and spill is not None and len(buf) > spill.threshold:
            flushed, refusal = await _spill_lines(buf, spill, line_limit)
            shift += flushed
            spilled = spilled or flushed > 0
            spill.holding(len(buf))
        if refusal is not None:
            if spilled and spill is not None:
                spill.abandon()
                spilled = False
            # Refused whatever comes next: keep only a tail that may hold
            # the start of the terminator, and read on to the end.
            shift += len(buf) - len(_DATA_END)
            del buf[: -len(_DATA_END)]
    reader.unread(bytes(buf[end + len(_DATA_END) :]))
    if size_limit and shift + end > size_limit:
        refusal = _TOO_MUCH
    if refusal is None:
        raw = bytes(memoryview(buf)[2 : end + 2])
        del buf
        if longest_line(raw) + 2 > line_limit:
            refusal = _TOO_LONG
        elif spilled and spill is not None:
            if raw:
                await spill.write(raw)
            return b"", None
        else:
            return raw, None
    if spilled and spill is not None:
        spill.abandon()
    return None, refusal


async def _spill_lines(buf: bytearray, spill: Spill, line_limit: int) -> tuple[int, str | None]:
    """Hand buf's complete lines to ``spill``; keep the last CRLF and what
    follows it in ``buf`` (so ``buf`` again starts with a CRLF, as at the
    start: a terminator or a "CRLF ." can never be cut). Returns the bytes
    spilled, and aiosmtpd's refusal when a line is too long."""
    last = buf.rfind(b"\r\n")
    if last >= 2:
        raw = bytes(memoryview(buf)[2 : last + 2])
        if longest_line(raw) + 2 > line_limit:
            return 0, _TOO_LONG
        del buf[:last]
        await spill.write(raw)
    else:
        last = 0
    if len(buf) - 1 > line_limit:
        # The line under way is too long already (its last byte may be
        # the CR of its CRLF, hence - 1, not - 2).
        return last, _TOO_LONG
    return last, None


def longest_line(raw: bytes) -> int:
    """Length of the longest CRLF-terminated line, without its CRLF.

    Splits about 1 MiB at a time (cut at a CRLF): split and len run in C,
    and a 30 MiB message never becomes 30 MiB of small line objects.
    """
    longest = start = 0
    size = len(raw)
    while start < size:
        end = raw.find(b"\r\n", min(start + _LINE_WINDOW, size))
        stop = size if end < 0 else end
        longest = max(longest, *map(len, raw[start:stop].split(b"\r\n")))
        start = stop + 2
    return longest


_LINE_WINDOW = 1 << 20


def unstuff(raw: bytes) -> bytes:
    """RFC 5321 section 4.5.2: a line's leading dot is transparency; drop it."""
    if raw.startswith(b"."):
        raw = raw[1:]
    return raw.replace(b"\r\n.", b"\r\n")


#: Content held in memory while DATA is received, before the rest goes to
#: the spool's temp file (see relay.spoolbody.IN_MEMORY_MAX).
SPILL_THRESHOLD = IN_MEMORY_MAX


class _Spill:
    """A large message's content on its way into the spool (:class:`Spill`).

    The first piece decides the queue id and writes our Received header,
    then each piece is unstuffed, checked (:class:`MessageCheck`) and
    appended to a :class:`relay.spoolbody.BodyWriter`. A spool error is kept
    for the reply after the final dot (the client must send the rest
    first); later pieces are then only checked. ``budget`` is shared by
    every session: while it is exhausted, everything spills at once.
    """

    def __init__(
        self,
        start: Callable[[], tuple[Envelope, bytes]],
        spool: Spool,
        budget: MemoryBudget,
    ) -> None:
        self._budget = budget
        #: The bytes this session counts in the budget now.
        self._held = 0
        self._start = start
        self._spool = spool
        self.check = MessageCheck()
        #: The provisional envelope (queue id, client) the header was made for.
        self.envelope: Envelope | None = None
        self.writer: BodyWriter | None = None
        self.failure: SpoolError | None = None

    @property
    def threshold(self) -> int:
        # Over the memory budget every session spills at once (whole lines:
        # what stays is a partial line and the block just read).
        return 0 if self._budget.exhausted else SPILL_THRESHOLD

    def holding(self, size: int) -> None:
        self._budget.held += size - self._held
        self._held = size

    def release(self) -> None:
        """The DATA is over: its content no longer counts."""
        self.holding(0)

    @property
    def started(self) -> bool:
        return self.envelope is not None

    async def write(self, raw: bytes) -> None:
        content = unstuff(raw)
        del raw
        self.check.feed(content)
        prefix = b""
        if self.envelope is None:
            self.envelope, prefix = self._start()
            self.writer = self._spool.body_writer(self.envelope.id)
        if self.failure is not None or self.writer is None:
            return
        try:
            await self.writer.write(content, prefix)
        except SpoolError as exc:
            self.failure = exc

    def abandon(self) -> None:
        self.discard()
        self.envelope = None

    def discard(self) -> None:
        """Remove the temp file unless the spool took it (put_async)."""
        if self.writer is not None:
            self.writer.discard()


#: File descriptors kept for the spool, deliveries and metrics beyond
#: ``max_connections`` when raising the open-files limit.
FD_RESERVE = 1024


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


class _Connection(SMTP):
    """One inbound session: aiosmtpd's SMTP with strict addresses and mapped replies."""

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
        self.data_spill: _Spill | None = None
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
        reader.__class__ = _CrlfCommandReader
        assert isinstance(reader, _CrlfCommandReader)
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
        if now - self._data_timer_reset >= self._timeout_duration / 10:
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
        """aiosmtpd 1.4's smtp_DATA with the content read in blocks (:func:`read_data`).

        Same order of checks, same replies (mapped by push()), same hook.
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
        assert isinstance(reader, _CrlfCommandReader)
        envelope, session = self.envelope, self.session
        assert session is not None
        spill = _Spill(
            lambda: self.inbound.begin(self, session, envelope),
            self.inbound.spool,
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

    async def _receive(self, reader: _CrlfCommandReader, spill: _Spill) -> Any:
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
            self._set_post_data_state()  # type: ignore[no-untyped-call]
            return refusal
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

    def _getaddr(self, arg: str) -> tuple[str | None, str | None]:
        # Replaces aiosmtpd's RFC 5322 header parser (comments, obsolete
        # syntax, CFWS) with the strict RFC 5321 path grammar. None makes
        # aiosmtpd answer its malformed-address reply, mapped to 501 5.1.3.
        try:
            return parse_path(arg)
        except AddressError:
            return None, None

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
        if isinstance(self._reader, _CrlfCommandReader):
            self._reader.closed = True


def _peer_ip(session: Session) -> str:
    peer = session.peer
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return str(peer or "")


_RCPT_REASONS = {
    errors.RELAYING_DENIED: "relaying_denied",
    errors.NO_ROUTE: "no_route",
    errors.ROUTING_CHARACTERS: "routing_characters",
}


class _Handler:
    """The aiosmtpd hooks: policy at each command, checks and spool at DATA."""

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
        return [line for line in responses if not line[4:].startswith("AUTH")]

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
        return str(reply)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        spill = None
        if isinstance(server, _Connection):
            server.suspend_timeout()
            spill = server.data_spill
        return str(await self.inbound.accept(server, session, envelope, spill))

    async def handle_exception(self, error: Exception) -> str:
        # Never aiosmtpd's default "500 Error: (Class) text": no internals
        # to the client, the traceback to our log.
        events.error("inbound_error", exc_info=True, error=type(error).__name__)
        return str(errors.INTERNAL_ERROR)


# --- the server ---------------------------------------------------------------


class Inbound:
    """Listens on every ``[server] listen`` address and spools what it accepts.

    ``config`` is called at every command, so a reload applies to open
    sessions at once (except per-connection settings: size limit,
    timeouts, error limits, hostname and TLS, which new connections pick
    up). ``on_accept`` is called with each envelope after its spool write,
    and the stored body's parts (the scheduler's ``add``); inbound never
    delivers. Every new connection first passes :meth:`admit` (the
    connection limits); ``resolver`` names clients in the Received header.
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
        self.spool = spool
        self.metrics = metrics
        self.on_accept = on_accept
        self.tls_context = tls_context
        self.clock = clock
        self.handler = _Handler(self)
        self.connections: set[_Connection] = set()
        self.servers: list[asyncio.Server] = []
        #: The same servers by the listen address they were bound for.
        self._listening: dict[Listen, asyncio.Server] = {}
        self._writes = 0
        self._writes_done = asyncio.Event()
        self._writes_done.set()
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
        reason = self.counts.refusal(config.server, key, may_relay(config, ip))
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
        # One descriptor per connection, plus the spool's and the deliveries'.
        wanted = self.config().server.max_connections + FD_RESERVE
        before, now = raise_fd_limit(wanted)
        if now != before:
            events.log("fd_limit_raised", soft_before=before, soft=now)
        if now != resource.RLIM_INFINITY and now < wanted:
            # Past it accept() fails (EMFILE) before any 421 can be sent.
            events.warning("fd_limit_low", soft=now, wanted=wanted)
        try:
            for listen in self.config().server.listen:
                await self._bind(listen)
        except OSError:
            await self.stop(0)
            raise

    async def _bind(self, listen: Listen) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(self._connection, listen.host, listen.port)
        self.servers.append(server)
        self._listening[listen] = server

    def _unbind(self, listen: Listen) -> None:
        # asyncio.Server.close() stops accepting but leaves the connections
        # it accepted open: their sessions carry on to the end.
        server = self._listening.pop(listen)
        self.servers.remove(server)
        server.close()

    async def relisten(self, listens: Sequence[Listen]) -> tuple[list[Listen], list[Listen]]:
        """Make the listeners match ``listens`` (a reload changed ``[server] listen``).

        Addresses in both stay bound, untouched. Removed ones stop
        accepting (first, so that e.g. ``0.0.0.0:2525`` can become
        ``127.0.0.1:2525``), sessions they accepted carry on; then new ones
        are bound. If one cannot be bound, the listeners are put back as
        they were and the OSError is raised. Returns (added, removed).
        """
        wanted = list(dict.fromkeys(listens))
        removed = [listen for listen in self._listening if listen not in wanted]
        added = [listen for listen in wanted if listen not in self._listening]
        for listen in removed:
            self._unbind(listen)
        bound: list[Listen] = []
        try:
            for listen in added:
                await self._bind(listen)
                bound.append(listen)
        except OSError:
            for listen in bound:
                self._unbind(listen)
            for listen in removed:
                try:
                    await self._bind(listen)
                except OSError as exc:
                    events.error("listen_lost", listen=str(listen), error=str(exc))
            raise
        return added, removed

    def _connection(self) -> asyncio.Protocol:
        return _Gate(self)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs, e.g. to find a port chosen by the OS."""
        return [
            (str(sock.getsockname()[0]), int(sock.getsockname()[1]))
            for server in self.servers
            for sock in server.sockets
        ]

    async def stop(self, grace: float = 10.0) -> None:
        """Stop accepting; let spool writes in progress finish (within ``grace``
        seconds) so their 250 goes out; then answer 421 to every open
        session and close it. Everything spooled stays spooled."""
        for server in self.servers:
            server.close()
        self.servers.clear()
        self._listening.clear()
        try:
            await asyncio.wait_for(self._writes_done.wait(), grace)
        except TimeoutError:
            events.warning("shutdown_spool_write_pending", writes=self._writes)
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

    async def accept(
        self,
        server: SMTP,
        session: Session,
        envelope: SmtpEnvelope,
        spill: _Spill | None = None,
    ) -> Reply:
        """Check the message, spool it durably, then hand it to ``on_accept``.

        The content is ``envelope.original_content``, or, for a large
        message, already in ``spill``'s temp file (checked piece by piece,
        with the Received header :meth:`begin` made).
        """
        content = envelope.original_content or b""
        problem = check_message(content) if spill is None else spill.check.result()
        if problem is not None:
            self.rejected(problem[1], session, "DATA", reply=problem[0])
            return problem[0]
        if spill is None:
            env = self._envelope(session, envelope)
            header = self._received(server, session, env)
        else:
            assert spill.envelope is not None
            env = self._envelope(session, envelope, spill.envelope.id)
            header = b""
            if spill.failure is not None:
                # The disk filled (or failed) during the DATA.
                return self._not_spooled(env, session, spill.failure)
        write = self._spool(env, header, content, spill.writer if spill is not None else None)
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # The session was cancelled (client gone, shutdown) while the
            # write went on. If it lands, the message is durable and must be
            # scheduled now, not at the next start, although no 250 reached
            # the client (which will likely send it again).
            write.add_done_callback(lambda task: self._landed_unanswered(task, env))
            raise
        except SpoolError as exc:
            return self._not_spooled(env, session, exc)
        self.metrics.messages_received.inc()
        events.log(
            "accepted",
            id=env.id,
            from_=f"<{env.mail_from}>",
            to=",".join(f"<{r.address}>" for r in env.recipients),
            size=env.size,
            client=env.client.ip,
            helo=env.client.helo,
            tls=env.client.tls or "no",
        )
        try:
            # A spilled message has no body in memory: the scheduler reads it.
            self.on_accept(env, (header, content) if spill is None else ())
        except Exception:
            # The message is durable; the scheduler finds it at the next start.
            events.error("schedule_failed", exc_info=True, id=env.id)
        return errors.queued(env.id)

    def _not_spooled(self, env: Envelope, session: Session, exc: SpoolError) -> Reply:
        """Log and count a failed spool write; the reply (452 when the disk is full)."""
        events.error("spool_failed", id=env.id, error=exc.detail)
        if isinstance(exc, SpoolFull):
            self.rejected("disk_full", session, "DATA")
            return errors.DISK_FULL
        self.rejected("spool_error", session, "DATA")
        return errors.SPOOL_FAILED

    def begin(
        self, server: SMTP, session: Session, envelope: SmtpEnvelope
    ) -> tuple[Envelope, bytes]:
        """A large message starts going to disk: its queue id and Received header.

        Its header is made now, not after the final dot, since it is the
        first thing in the file: the time stamp says when the message
        passed :data:`SPILL_THRESHOLD` (sendmail also stamps the start). The
        envelope's ``received_at`` is still the time of acceptance.
        """
        env = self._envelope(session, envelope)
        return env, self._received(server, session, env)

    @staticmethod
    def _received(server: SMTP, session: Session, env: Envelope) -> bytes:
        cipher = session.ssl.get("cipher") if session.ssl else None
        name = server.client_name if isinstance(server, _Connection) else None
        return received_header(
            client_name=name,
            helo=env.client.helo,
            client_ip=env.client.ip,
            hostname=server.hostname,
            protocol=protocol_keyword(session.extended_smtp, bool(cipher), env.smtputf8),
            queue_id=env.id,
            recipients=[r.address for r in env.recipients],
            when=env.received_at,
            cipher=cipher,
        )

    def _landed_unanswered(self, write: asyncio.Future[list[str]], env: Envelope) -> None:
        if write.cancelled() or write.exception() is not None:
            return
        events.warning("accepted_unanswered", id=env.id, client=env.client.ip, size=env.size)
        self.metrics.messages_received.inc()
        try:
            self.on_accept(env, ())
        except Exception:
            events.error("schedule_failed", exc_info=True, id=env.id)

    def _spool(
        self, env: Envelope, header: bytes, content: bytes, body: BodyWriter | None
    ) -> asyncio.Future[list[str]]:
        """Start the durable write: fsynced, renamed, directory fsynced (that
        fsync shared with concurrent sessions). Shutdown waits for it."""
        self._writes += 1
        self._writes_done.clear()
        try:
            if body is None:
                # header and content written one after the other: no joined copy.
                write = self.spool.put_async(env, content, prefix=header)
            else:
                write = self.spool.put_async(env, content, body=body)
        except BaseException:
            self._written(None)
            raise
        write.add_done_callback(self._written)
        return write

    def _written(self, write: asyncio.Future[list[str]] | None) -> None:
        self._writes -= 1
        if not self._writes:
            self._writes_done.set()

    def _envelope(
        self, session: Session, envelope: SmtpEnvelope, queue_id: str | None = None
    ) -> Envelope:
        now = self.clock()
        sender = envelope.mail_from or ""
        cipher = session.ssl.get("cipher") if session.ssl else None
        return Envelope(
            id=queue_id or new_id(),
            mail_from="" if sender == "<>" else sender,
            recipients=[Recipient(address) for address in envelope.rcpt_tos],
            client=ClientInfo(
                ip=str(client_address(_peer_ip(session)) or _peer_ip(session)),
                helo=session.host_name or "",
                tls=str(cipher[1]) if cipher else "",
            ),
            received_at=now,
            next_attempt=now,
            smtputf8=envelope.smtp_utf8,
            body_8bit="BODY=8BITMIME" in envelope.mail_options,
        )


def listen_texts(inbound: Inbound) -> Iterable[str]:
    """The bound addresses as host:port text, for the start-up log."""
    for host, port in inbound.addresses:
        yield f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
