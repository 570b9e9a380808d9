"""A throwaway test CA (trustme) that writes PEM files for external processes.

Postfix, swaks and the relay subprocess read certificates from files, so
this helper writes everything to disk with permissions those processes can
read (Postfix loads keys as root before dropping privileges).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import trustme


@dataclass(frozen=True)
class CertFiles:
    """A leaf certificate (chain: leaf then intermediates) and its private key."""

    cert: Path
    key: Path


@dataclass
class TestCA:
    """A trustme CA whose certificate lives at ``ca_file``."""

    __test__ = False  # not a pytest test class despite the name

    ca: trustme.CA
    directory: Path
    ca_file: Path

    @classmethod
    def create(cls, directory: Path, organization: str = "relay e2e test CA") -> TestCA:
        directory.mkdir(parents=True, exist_ok=True)
        ca = trustme.CA(organization_name=organization)
        ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(str(ca_file))
        return cls(ca=ca, directory=directory, ca_file=ca_file)

    def issue(self, *names: str, stem: str | None = None) -> CertFiles:
        """Issue a leaf for DNS names / IP literals ``names``; write ``<stem>.crt/.key``."""
        if not names:
            raise ValueError("a certificate needs at least one name")
        stem = stem or names[0].replace("*", "_").replace(":", "_")
        leaf = self.ca.issue_cert(*names)
        cert = self.directory / f"{stem}.crt"
        key = self.directory / f"{stem}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in leaf.cert_chain_pems))
        leaf.private_key_pem.write_to_path(str(key))
        key.chmod(0o600)
        return CertFiles(cert=cert, key=key)
