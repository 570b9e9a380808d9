"""Test PKI: a trusted trustme CA, an untrusted one, and certificate files.

``Pki(directory)`` writes ``ca.pem`` (use it as ``[tls] ca_file``, or hand
it to Postfix and swaks) and issues leaf certificates as files, since
Postfix, swaks and the relay subprocess read them from disk; for the
in-process sinks it builds server contexts with relay.tls.server_context,
so they exercise our own builder::

    pki = Pki(tmp_path / "pki")
    files = pki.issue("relay.test", stem="relay")        # CertFiles(cert, key)
    ctx = pki.server_context("mx1.test", "127.0.0.1")   # good
    ctx = pki.server_context("mx1.test", untrusted=True) # issued by an unknown CA
    ctx = pki.self_signed_context()                      # a certificate that signed itself
    ctx = pki.server_context("other.test")               # wrong name for mx1.test
    ctx = pki.server_context("mx1.test", expired=True)   # expired yesterday
    ctx = pki.server_context("mx1.test", expires_in=datetime.timedelta(days=10))
"""

from __future__ import annotations

import datetime
import itertools
import ssl
from pathlib import Path
from typing import NamedTuple

import trustme

from relay import tls

_serial = itertools.count()


class CertFiles(NamedTuple):
    """A leaf certificate (chain: leaf then intermediates) and its private key."""

    cert: Path
    key: Path


class Pki:
    def __init__(self, directory: Path, organization: str = "relay test CA") -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name=organization)
        #: A CA nobody trusts: its certificates fail require_ca_signed.
        self.untrusted_ca = trustme.CA(organization_name="untrusted test CA")
        #: The trust anchor file for ``[tls] ca_file``.
        self.ca_file = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(
        self,
        *names: str,
        untrusted: bool = False,
        expired: bool = False,
        stem: str | None = None,
        expires_in: datetime.timedelta | None = None,
    ) -> CertFiles:
        """Issue a leaf for DNS names / IP literals ``names``; write ``<stem>.crt/.key``.

        ``expires_in``: the certificate's notAfter is that far from now
        (valid since yesterday); trustme's own default is years ahead.

        The default stem is the first name plus a serial number, so issuing the
        same name twice (good and expired, say) never overwrites a file.
        """
        if not names:
            raise ValueError("a certificate needs at least one name")
        ca = self.untrusted_ca if untrusted else self.ca
        now = datetime.datetime.now(datetime.UTC)
        kwargs = {}
        if expired:
            kwargs = {
                "not_before": now - datetime.timedelta(days=30),
                "not_after": now - datetime.timedelta(days=1),
            }
        elif expires_in is not None:
            kwargs = {
                "not_before": now - datetime.timedelta(days=1),
                "not_after": now + expires_in,
            }
        leaf = ca.issue_cert(*names, **kwargs)
        if stem is None:
            stem = f"{names[0].replace('*', '_').replace(':', '_')}-{next(_serial)}"
        cert, key = self.dir / f"{stem}.crt", self.dir / f"{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        return CertFiles(cert, key)

    def self_signed_context(self) -> ssl.SSLContext:
        """A server context presenting a self-signed certificate (the untrusted CA's own)."""
        cert, key = self.dir / "self-signed.crt", self.dir / "self-signed.key"
        self.untrusted_ca.cert_pem.write_to_path(str(cert))
        self.untrusted_ca.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        return tls.server_context(cert, key)

    def server_context(
        self,
        *names: str,
        untrusted: bool = False,
        expired: bool = False,
        expires_in: datetime.timedelta | None = None,
    ) -> ssl.SSLContext:
        """A server-side context presenting a certificate for ``names``."""
        files = self.issue(*names, untrusted=untrusted, expired=expired, expires_in=expires_in)
        return tls.server_context(*files)
