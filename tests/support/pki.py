"""Test PKI: a trusted trustme CA, an untrusted one, and server certificates.

``Pki(tmp_path)`` writes ``ca.pem`` (use it as ``[tls] ca_file``) and
issues certificates as ready-to-use server contexts built by
relay.tls.server_context, so the sinks exercise our own builder::

    pki = Pki(tmp_path)
    ctx = pki.server_context("mx1.test", "127.0.0.1")   # good
    ctx = pki.server_context("mx1.test", untrusted=True) # unknown CA ("self-signed")
    ctx = pki.server_context("other.test")               # wrong name for mx1.test
    ctx = pki.server_context("mx1.test", expired=True)   # expired yesterday
"""

from __future__ import annotations

import datetime
import itertools
import ssl
from pathlib import Path

import trustme

from relay import tls

_serial = itertools.count()


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = trustme.CA(organization_name="relay test CA")
        #: A CA nobody trusts: its certificates fail require_ca_signed.
        self.untrusted_ca = trustme.CA(organization_name="untrusted test CA")
        #: The trust anchor file for ``[tls] ca_file``.
        self.ca_file = self.dir / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def issue(
        self, *names: str, untrusted: bool = False, expired: bool = False
    ) -> tuple[Path, Path]:
        """Issue a leaf certificate for ``names``; return (chain file, key file)."""
        ca = self.untrusted_ca if untrusted else self.ca
        now = datetime.datetime.now(datetime.UTC)
        kwargs = {}
        if expired:
            kwargs = {
                "not_before": now - datetime.timedelta(days=30),
                "not_after": now - datetime.timedelta(days=1),
            }
        leaf = ca.issue_cert(*names, **kwargs)
        n = next(_serial)
        cert, key = self.dir / f"leaf{n}.crt", self.dir / f"leaf{n}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        return cert, key

    def server_context(
        self, *names: str, untrusted: bool = False, expired: bool = False
    ) -> ssl.SSLContext:
        """A server-side context presenting a certificate for ``names``."""
        return tls.server_context(*self.issue(*names, untrusted=untrusted, expired=expired))
