"""The outbound wire has one adapter, and the TLS policy one place that decides."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from relay import tls
from relay.config import TlsPolicy
from relay.errors import TLS_FAILURE_OPTION, TlsCheck, TlsFailure
from tests.support.paths import ROOT

RELAY = ROOT / "relay"


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_session_is_the_only_module_that_imports_aiosmtplib():
    importers = sorted(
        str(path.relative_to(RELAY.parent))
        for path in RELAY.rglob("*.py")
        if "aiosmtplib" in _imports(path)
    )
    assert importers == ["relay/session.py"]


@pytest.mark.parametrize("failure", list(TlsFailure))
def test_a_failure_fails_exactly_the_policies_that_require_its_check(failure):
    check = TLS_FAILURE_OPTION[failure]
    for on in (False, True):
        options = {c.value: not on for c in TlsCheck} | {check.value: on}
        policy = TlsPolicy(**options)
        assert tls.enforces(policy, check) is on
        assert tls.policy_failures(policy, [(check, failure)]) == ((failure,) if on else ())


def test_policy_failures_keep_the_order_of_the_checks():
    findings = [
        (TlsCheck.CA_SIGNED, TlsFailure.UNTRUSTED_CA),
        (TlsCheck.HOSTNAME, TlsFailure.HOSTNAME_MISMATCH),
    ]
    assert tls.policy_failures(TlsPolicy(), findings) == (
        TlsFailure.UNTRUSTED_CA,
        TlsFailure.HOSTNAME_MISMATCH,
    )
    assert tls.policy_failures(TlsPolicy(True, True, False), findings) == (TlsFailure.UNTRUSTED_CA,)
