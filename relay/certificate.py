"""The facts of a server certificate that diagnoses and ``relay test-tls`` show.

Decoded with the stdlib only (no cryptography package). A leaf module: it
imports nothing from relay, so :mod:`relay.errors` can name its type.
"""

from __future__ import annotations

import math
import ssl
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

#: Private members of libraries used here (tests/unit/test_private_members.py):
#: the stdlib's DER certificate decoder, for a certificate that failed
#: verification (ssl only decodes a verified peer's certificate).
PRIVATE_MEMBERS = (("ssl", "_ssl._test_decode_cert"),)


@dataclass(frozen=True, slots=True)
class Certificate:
    """The parts of a server certificate a person needs to fix a TLS failure."""

    subject: str
    issuer: str
    #: subjectAltName entries as OpenSSL prints them: "DNS:mx1.example.com", "IP Address:192.0.2.1".
    sans: tuple[str, ...]
    #: OpenSSL's text, e.g. "Nov 27 12:00:00 2026 GMT" ("" when absent).
    not_before: str
    not_after: str
    #: Whole days until not_after when decoded (negative once expired).
    days_left: int

    @property
    def names(self) -> tuple[str, ...]:
        """The names the certificate is valid for (RFC 6125: the SANs; else the subject CN)."""
        names = tuple(san.partition(":")[2] for san in self.sans)
        if names:
            return names
        return tuple(
            part.partition("=")[2] for part in self.subject.split(", ") if part.startswith("CN=")
        )

    @property
    def self_signed(self) -> bool:
        return bool(self.subject) and self.subject == self.issuer

    def valid_from(self) -> str:
        return _day(self.not_before)

    def valid_until(self) -> str:
        return _day(self.not_after)

    @property
    def expires_at(self) -> float | None:
        """not_after as Unix seconds; None when absent."""
        return ssl.cert_time_to_seconds(self.not_after) if self.not_after else None

    def not_yet_valid(self, now: float | None = None) -> bool:
        if not self.not_before:
            return False
        return ssl.cert_time_to_seconds(self.not_before) > (time.time() if now is None else now)


def _day(openssl_time: str) -> str:
    """``"Nov 27 12:00:00 2026 GMT"`` -> ``"2026-11-27 12:00 UTC"``; "?" when absent."""
    if not openssl_time:
        return "?"
    return day(ssl.cert_time_to_seconds(openssl_time))


def day(seconds: float) -> str:
    """Unix seconds as ``"2026-11-27 12:00 UTC"``, the way dates of certificates are shown."""
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M UTC")


#: RFC 4514 section 3: the short names of the attributes a certificate name usually has.
_SHORT = {
    "commonName": "CN",
    "countryName": "C",
    "localityName": "L",
    "stateOrProvinceName": "ST",
    "organizationName": "O",
    "organizationalUnitName": "OU",
}


def distinguished_name(parts: Any) -> str:
    """getpeercert()'s subject/issuer tuples as ``"O=Example, CN=mx.example.com"``."""
    return ", ".join(f"{_SHORT.get(k, k)}={v}" for rdn in parts or () for (k, v) in rdn)


def decode(der: bytes) -> Certificate:
    """Decode a DER certificate.

    ``ssl._ssl._test_decode_cert`` is what CPython's own tests use to read a
    PEM file into the getpeercert() dict; it is there in 3.11.
    """
    pem = ssl.DER_cert_to_PEM_cert(der)
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as handle:
        handle.write(pem)
        handle.flush()
        decoder = ssl._ssl._test_decode_cert  # type: ignore[attr-defined]
        info: dict[str, Any] = decoder(handle.name)
    sans = tuple(f"{kind}:{value}" for kind, value in info.get("subjectAltName", ()))
    not_after = str(info.get("notAfter", ""))
    seconds = ssl.cert_time_to_seconds(not_after) - time.time() if not_after else 0.0
    days = math.floor(seconds / 86400)
    return Certificate(
        subject=distinguished_name(info.get("subject")),
        issuer=distinguished_name(info.get("issuer")),
        sans=sans,
        not_before=str(info.get("notBefore", "")),
        not_after=not_after,
        days_left=days,
    )
