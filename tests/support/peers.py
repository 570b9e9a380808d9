"""The real peers the tests talk to, and what a test does when one is missing.

A test that needs a peer this machine lacks FAILS, naming the Debian
package that provides it (scripts/install-system-deps installs them all):
a green run must mean the peers were really exercised. A developer on a
machine without them can set ``RELAY_TEST_PEERS=optional``: such tests
are then skipped, each with its reason (pytest's ``-ra`` prints them).

What the machine cannot do whatever is installed (run Postfix's master
without root, mount a tmpfs) is an environment limit, not a missing
package: those tests skip with the reason.
"""

from __future__ import annotations

import os
import subprocess

import pytest

SWAKS = "/usr/bin/swaks"
DNSMASQ = "/usr/sbin/dnsmasq"
POSTFIX_BINARIES = (
    "/usr/sbin/postfix",
    "/usr/sbin/sendmail",
    "/usr/sbin/postqueue",
    "/usr/lib/postfix/sbin/master",
    "/usr/sbin/smtp-source",
    "/usr/sbin/smtp-sink",
)

_swaks_tls: str | None = None


def missing(reason: str, package: str) -> None:
    """Fail (or, with RELAY_TEST_PEERS=optional, skip) naming ``package``."""
    text = f"{reason}: install the Debian package {package} (scripts/install-system-deps does)"
    if os.environ.get("RELAY_TEST_PEERS") == "optional":
        pytest.skip(text)
    pytest.fail(text, pytrace=False)


def _executable(path: str) -> bool:
    return os.path.isfile(path) and os.access(path, os.X_OK)


def require_binary(path: str, package: str) -> str:
    """``path`` if it is an executable, else fail naming ``package``."""
    if not _executable(path):
        missing(f"{path} is not installed", package)
    return path


def require_swaks(tls: bool = False) -> str:
    """swaks' path; with ``tls``, also that it can speak TLS (Net::SSLeay)."""
    global _swaks_tls
    require_binary(SWAKS, "swaks")
    if tls:
        if _swaks_tls is None:
            done = subprocess.run(
                [SWAKS, "--support"], capture_output=True, text=True, timeout=30, check=False
            )
            supported = "=== TLS supported" in done.stdout + done.stderr
            _swaks_tls = "ok" if supported else "swaks cannot do TLS (requires Net::SSLeay)"
        if _swaks_tls != "ok":
            missing(_swaks_tls, "libnet-ssleay-perl")
    return SWAKS


def require_dnsmasq() -> str:
    return require_binary(DNSMASQ, "dnsmasq-base")


def require_postfix() -> None:
    """Postfix's binaries are installed and this process may start its master."""
    for binary in POSTFIX_BINARIES:
        require_binary(binary, "postfix")
    if os.geteuid() != 0:
        pytest.skip("Postfix's master must be started as root (run the tests as root)")
