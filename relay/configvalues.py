"""The syntax of single configuration values: durations, host names, host:port, ports.

Pure rules, shared by the file reader (relay.configload), the console's
forms and the commands that take such values on their command line.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
from collections.abc import Sequence
from typing import Any

from relay.addresses import is_ip_literal
from relay.config import Listen

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

ALLOWED_PORTS = "25, 587, or 1024-65535"


def parse_duration(text: str) -> float:
    """``"30s"``, ``"15m"``, ``"4h"``, ``"5d"`` (also ``"500ms"``) to seconds."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not a duration; use a number and a unit: 30s, 15m, 4h, 5d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def is_hostname(name: str) -> bool:
    """RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens."""
    if not name or len(name) > 253:
        return False
    labels = name.rstrip(".").split(".")
    return all(_LABEL.match(label) for label in labels)


def is_mail_address(text: str) -> bool:
    """A plain ``local@domain`` address (ASCII, no display name, no brackets)."""
    local, at, domain = text.rpartition("@")
    return (
        bool(at and local)
        and text.isascii()
        and not any(c.isspace() or c in '<>"(),;:\\[]' for c in local)
        and is_hostname(domain)
    )


def parse_listen(text: str) -> Listen:
    """``"127.0.0.1:2525"``, ``"[::1]:2525"`` or ``"localhost:2525"``."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a host:port string")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:2525)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, as [::1]:2525")
    elif not (is_ip_literal(host) or is_hostname(host)):
        raise ValueError(f"{text!r}: {host!r} is not an IP address or host name")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return Listen(host, int(port_text))


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"ip"`` or ``"ip:port"`` (``"[v6]:port"``); port defaults to 53."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string")
    if is_ip_literal(text) and not text.startswith("["):
        return (text, 53)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not is_ip_literal(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not an IP address or ip:port")
    return (host, int(port))


def suggest(word: str, known: Sequence[str]) -> str | None:
    """The known name the user most likely meant by ``word``, if any."""
    close = difflib.get_close_matches(word, known, n=1)
    if close:
        return close[0]
    # Abbreviations such as "mx" for "mx_lookup".
    starts = [k for k in known if k.startswith(word) or word.startswith(k)]
    return starts[0] if len(starts) == 1 else None


def check_port(port: Any) -> str | None:
    """The problem with an outbound port, or None when it is allowed."""
    if isinstance(port, bool) or not isinstance(port, int):
        return f"{port!r} is not a whole number; use {ALLOWED_PORTS}"
    if port == 465:
        return (
            "port 465 (implicit TLS) is not supported; use 587 or 25, "
            "where the relay upgrades with STARTTLS"
        )
    if port in (25, 587) or 1024 <= port <= 65535:
        return None
    return f"port {port} is not allowed; use {ALLOWED_PORTS}"
