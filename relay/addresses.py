"""Addresses and domains: the RFC 5321 / RFC 6531 path grammar, domain keys, IP literals.

Pure rules, no I/O. Envelope addresses are parsed strictly by the RFC 5321
section 4.1.2 grammar (not a lenient RFC 5322 header parser), so a CR, LF,
NUL or any other control character can never enter the spool or the next
hop. Every comparison of domains goes through :func:`domain_key`, every
reading of an IP address written as text through :func:`ip_literal`.
"""

from __future__ import annotations

import functools
import ipaddress
import re
import string

#: An IPv4 or IPv6 address.
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

#: The one mailbox allowed without a domain (RFC 5321 section 4.5.1).
POSTMASTER = "postmaster"

_ATEXT = frozenset(string.ascii_letters + string.digits + "!#$%&'*+-/=?^_`{|}~")
_LDH = frozenset(string.ascii_letters + string.digits + "-")


class AddressError(ValueError):
    """The MAIL FROM / RCPT TO argument is not a valid RFC 5321 path."""


# --- IP addresses written as text --------------------------------------------


# Cached: every connection and every message reads the same few addresses
# (the client's, the next hop's) several times; parsing one costs about 10 µs.
@functools.lru_cache(maxsize=4096)
def _ip(text: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def ip_literal(name: str) -> str | None:
    """The IP address ``name`` spells, normalized, or None for a host name.

    Accepts ``192.0.2.1``, ``2001:db8::1``, ``[2001:db8::1]`` (as in
    ``[::1]:2525``), and the RFC 5321 section 4.1.3 address-literal forms
    ``[192.0.2.1]`` and ``[IPv6:2001:db8::1]``.
    """
    text = name.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
        if text[:5].lower() == "ipv6:":
            text = text[5:]
    addr = _ip(text)
    return None if addr is None else str(addr)


def is_ip_literal(name: str) -> bool:
    """``name`` is an IP address (any form :func:`ip_literal` reads), not a host name."""
    return ip_literal(name) is not None


def is_address_literal(literal: str) -> bool:
    """``literal`` is an RFC 5321 section 4.1.3 address-literal as a mailbox
    domain may be: ``[192.0.2.1]`` or ``[IPv6:2001:db8::1]``, nothing looser."""
    if not (literal.startswith("[") and literal.endswith("]")):
        return False
    inner = literal[1:-1]
    tagged = inner[:5].lower() == "ipv6:"
    addr = _ip(inner[5:] if tagged else inner)
    return addr is not None and addr.version == (6 if tagged else 4)


def client_address(ip: str) -> IPAddress | None:
    """The client's address from the peer name a socket reports, or None."""
    addr = _ip(ip.split("%")[0])
    # A dual-stack listener reports IPv4 clients as ::ffff:a.b.c.d.
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
        return addr.ipv4_mapped
    return addr


# --- domains ------------------------------------------------------------------


def domain_key(domain: str) -> str:
    """``domain`` in the one form domains are compared in: lower-case A-labels.

    RFC 6531 section 3.3 lets an SMTPUTF8 client write a domain in U-labels
    (``bücher.example``); RFC 5890 section 2.3.2.1 makes it the same domain
    as its A-label form (``xn--bcher-kva.example``), so every comparison of
    domains (config, rules, inbound, routing) goes through here. A trailing
    dot is dropped. Text the stdlib ``idna`` codec cannot convert comes
    back lower-cased, as written (validation then refuses it where needed).
    """
    text = domain.strip().rstrip(".").lower()
    if text.isascii():
        return text
    try:
        return text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return text


_HELO = re.compile(r"^(?:[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*\.?|\[[A-Za-z0-9.:]+\])$")


def valid_helo(name: str) -> bool:
    """An EHLO/HELO argument we will write into a Received header.

    A domain or an address literal (RFC 5321 section 4.1.1.1); underscores
    are tolerated (common in Windows host names). Anything else -- CR, LF,
    NUL, spaces, parentheses, non-ASCII -- is refused with 501.
    """
    return len(name) <= 255 and bool(_HELO.match(name))


# --- envelope addresses (RFC 5321 section 4.1.2, RFC 6531 section 3.3) -------


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
        if not is_address_literal(domain):
            raise AddressError(f"bad address literal {domain!r}")
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
