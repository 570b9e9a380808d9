"""Message content rules: line endings, header sanity, the loop count, our
Received header and dot transparency.

Pure rules over bytes, no I/O. A message ends only at CRLF.CRLF; a bare CR
or bare LF anywhere in it gets the whole message refused, never normalised
(no SMTP smuggling): inbound refuses such a message, delivery refuses to
send such a body (:func:`has_bare_line_ending` both ways).
"""

from __future__ import annotations

import email.utils
from collections.abc import Sequence
from datetime import UTC, datetime

from relay import errors
from relay.addresses import client_address
from relay.errors import Reply

# RFC 5321 section 6.3 suggests 100 hops; relay allows 30 (README.md "What relay accepts").
MAX_RECEIVED = 30

_WSP = (0x20, 0x09)


def has_bare_line_ending(content: bytes) -> bool:
    """True when a CR or LF appears other than as the pair CRLF.

    Fed pieces that never split a CRLF, a content has one exactly when one
    of its pieces has. Counting in C beats a regex with look-arounds
    several times over.
    """
    pairs = content.count(b"\r\n")
    return content.count(b"\r") != pairs or content.count(b"\n") != pairs


def _valid_field_name(name: bytes) -> bool:
    # field-name = 1*ftext; ftext = %d33-57 / %d59-126 (RFC 5322 section 3.6.8).
    return bool(name) and all(33 <= b <= 126 and b != 58 for b in name)


class MessageCheck:
    """The checks of :func:`check_message`, fed the content in pieces.

    Each piece must start at the start of a line and end in CRLF (or be
    the last), as :func:`relay.datareader.read_data` hands them out, so no CRLF and no header
    line is ever split between two pieces. Fed the whole content at once it
    is :func:`check_message`.
    """

    __slots__ = (
        "max_received", "nul", "bare", "bad_header", "received", "in_header", "lines",
        "tls_optional",
    )  # fmt: skip

    def __init__(self, max_received: int = MAX_RECEIVED) -> None:
        self.max_received = max_received
        self.nul = self.bare = self.bad_header = False
        self.received = 0
        self.in_header = True
        #: Header lines seen so far (only whether it is 0 matters).
        self.lines = 0
        #: A ``TLS-Required: No`` header field (RFC 8689 section 3) was seen.
        self.tls_optional = False

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
            name, colon, value = line.partition(b":")
            if not colon or not _valid_field_name(name):
                self.bad_header = True
                return
            if name.lower() == b"received":
                self.received += 1
            elif name.lower() == b"tls-required" and value.strip().lower() == b"no":
                # "No" is the field's one value (RFC 8689 section 3).
                self.tls_optional = True

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

    Every variable part was validated before (HELO by :func:`relay.addresses.valid_helo`,
    addresses by :func:`relay.addresses.parse_path`), so nothing here can break the line.
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
