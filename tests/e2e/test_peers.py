"""A test whose peer is missing fails naming the Debian package (tests/support/peers.py)."""

from __future__ import annotations

import pytest

from tests.support import peers


def test_missing_peer_fails_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RELAY_TEST_PEERS", raising=False)
    with pytest.raises(pytest.fail.Exception) as failed:
        peers.require_binary("/nonexistent/swaks", "swaks")
    assert "/nonexistent/swaks is not installed" in str(failed.value)
    assert "install the Debian package swaks" in str(failed.value)


def test_missing_peer_skips_when_peers_are_optional(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELAY_TEST_PEERS", "optional")
    with pytest.raises(pytest.skip.Exception) as skipped:
        peers.require_binary("/nonexistent/dnsmasq", "dnsmasq-base")
    assert "dnsmasq-base" in str(skipped.value)


def test_installed_peers_pass() -> None:
    # This machine is set up by scripts/install-system-deps, so each check passes.
    assert peers.require_swaks(tls=True) == peers.SWAKS
    assert peers.require_dnsmasq() == peers.DNSMASQ
