"""TLS policy per route: each check on (host fails, right reason) and off (delivers)."""

from __future__ import annotations

import ssl

import pytest

from relay import errors, tls
from relay.config import TlsPolicy
from relay.errors import TlsFailure, TlsPolicyFailure
from relay.metrics import Metrics
from tests.support import logs
from tests.support.delivery import (
    BODY,
    CA_SIGNED,
    ENCRYPT_ONLY,
    OPPORTUNISTIC,
    STRICT,
    addresses,
    candidate,
    deliverer,
    envelope,
    make_config,
    route,
)
from tests.support.pki import Pki
from tests.support.sink import Sink

pytestmark = pytest.mark.timeout(60)


# (server certificate, the policy that must fail and why, a policy that delivers)
CASES = {
    "no_starttls": (None, ENCRYPT_ONLY, TlsFailure.NO_STARTTLS, OPPORTUNISTIC),
    "self_signed": (
        {"names": ("mx1.test",), "untrusted": True},
        CA_SIGNED,
        TlsFailure.UNTRUSTED_CA,
        ENCRYPT_ONLY,
    ),
    "wrong_name": ({"names": ("other.test",)}, STRICT, TlsFailure.HOSTNAME_MISMATCH, CA_SIGNED),
    "expired": (
        {"names": ("mx1.test",), "expired": True},
        CA_SIGNED,
        TlsFailure.EXPIRED,
        ENCRYPT_ONLY,
    ),
}


def _context(pki: Pki, spec):
    if spec is None:
        return None
    return pki.server_context(
        *spec["names"], untrusted=spec.get("untrusted", False), expired=spec.get("expired", False)
    )


async def _deliver(pki: Pki, sink: Sink, policy: TlsPolicy, metrics: Metrics | None = None):
    d = deliverer(make_config(pki.ca_file), metrics=metrics)
    try:
        env = envelope()
        return await d.deliver(
            route(policy), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    finally:
        await d.close()


@pytest.mark.parametrize("case", sorted(CASES))
async def test_check_on_fails_the_host_with_its_reason(pki, case):
    spec, failing, reason, _ = CASES[case]
    metrics = Metrics()
    async with Sink(tls_context=_context(pki, spec)) as sink:
        attempt = await _deliver(pki, sink, failing, metrics)
    assert not sink.messages
    (result,) = attempt.results["b@x.test"]
    assert isinstance(result, TlsPolicyFailure) and result.reason is reason
    # Every candidate failed the policy: bounced at once with 5.7.x.
    assert attempt.outcome("b@x.test") == errors.BOUNCED
    assert attempt.last("b@x.test").status[:2] == (5, 7)
    labels = {"route": "r1", "host": "mx1.test", "reason": reason.value}
    assert metrics.registry.get_sample_value("relay_tls_failures_total", labels) == 1
    result_labels = {"route": "r1", "host": "mx1.test", "result": "tls_failed"}
    assert metrics.registry.get_sample_value("relay_delivery_attempts_total", result_labels) == 1


@pytest.mark.parametrize("case", sorted(CASES))
async def test_check_off_delivers(pki, case):
    spec, _, _, passing = CASES[case]
    async with Sink(tls_context=_context(pki, spec)) as sink:
        attempt = await _deliver(pki, sink, passing)
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    (host,) = attempt.hosts
    assert sink.messages[0].tls == host.tls_version
    assert (host.tls_version is None) == (spec is None)
    assert host.verified == passing.require_ca_signed


async def test_hostname_checked_against_ip_literal_route_host(pki):
    # An IP-literal host must match an IP SAN.
    async with Sink(tls_context=pki.server_context("127.0.0.1")) as good:
        d = deliverer(make_config(pki.ca_file))
        env = envelope()
        attempt = await d.deliver(
            route(STRICT), env, addresses(env), BODY, [candidate("127.0.0.1", good.port)]
        )
        await d.close()
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    async with Sink(tls_context=pki.server_context("mx1.test")) as named:
        d = deliverer(make_config(pki.ca_file))
        attempt = await d.deliver(
            route(STRICT), env, addresses(env), BODY, [candidate("127.0.0.1", named.port)]
        )
        await d.close()
    (result,) = attempt.results["b@x.test"]
    assert isinstance(result, TlsPolicyFailure)
    assert result.reason is TlsFailure.HOSTNAME_MISMATCH


async def test_verification_uses_the_name_not_the_ip(pki):
    # Connected to 127.0.0.1, certificate only for mx1.test: passes.
    async with Sink(tls_context=pki.server_context("mx1.test")) as sink:
        attempt = await _deliver(pki, sink, STRICT)
    assert attempt.outcome("b@x.test") == errors.DELIVERED


async def test_opportunistic_falls_back_to_plaintext_after_failed_handshake(pki):
    replies = {"STARTTLS": ["220 2.0.0 go ahead"]}
    async with Sink(tls_context=pki.server_context("mx1.test"), replies=replies) as sink:
        attempt = await _deliver(pki, sink, OPPORTUNISTIC)
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert sink.connections == 2
    assert sink.messages[0].tls is None and attempt.hosts[0].tls_version is None


async def test_required_tls_failed_handshake_fails_the_host(pki):
    replies = {"STARTTLS": "220 2.0.0 go ahead"}
    async with Sink(tls_context=pki.server_context("mx1.test"), replies=replies) as sink:
        attempt = await _deliver(pki, sink, ENCRYPT_ONLY)
    (result,) = attempt.results["b@x.test"]
    assert isinstance(result, TlsPolicyFailure) and result.reason is TlsFailure.HANDSHAKE
    assert sink.connections == 1 and not sink.messages


async def test_starttls_refused_with_454_defers_required_tls(pki):
    # RFC 3207 section 4: 454 is temporary; no verdict on the host's TLS.
    replies = {"STARTTLS": "454 4.7.0 TLS not available"}
    async with Sink(tls_context=pki.server_context("mx1.test"), replies=replies) as sink:
        attempt = await _deliver(pki, sink, ENCRYPT_ONLY)
    (result,) = attempt.results["b@x.test"]
    assert isinstance(result, errors.RemoteTemporary) and result.reply.code == 454
    assert attempt.outcome("b@x.test") == errors.DEFERRED


async def test_mixed_tls_failure_and_temporary_failure_defers(pki):
    async with (
        Sink() as plain,
        Sink(
            tls_context=pki.server_context("mx2.test"), replies={"MAIL": "451 4.3.0 later"}
        ) as busy,
    ):
        d = deliverer(make_config(pki.ca_file))
        env = envelope()
        cands = [candidate("mx1.test", plain.port), candidate("mx2.test", busy.port)]
        attempt = await d.deliver(route(STRICT), env, addresses(env), BODY, cands)
        await d.close()
    first, second = attempt.results["b@x.test"]
    assert isinstance(first, TlsPolicyFailure) and isinstance(second, errors.RemoteTemporary)
    assert attempt.outcome("b@x.test") == errors.DEFERRED


# --- tls.py on its own ------------------------------------------------------


@pytest.mark.parametrize(
    ("policy", "verify", "check_hostname"),
    [
        (OPPORTUNISTIC, ssl.CERT_NONE, False),
        (ENCRYPT_ONLY, ssl.CERT_NONE, False),
        (CA_SIGNED, ssl.CERT_REQUIRED, False),
        (STRICT, ssl.CERT_REQUIRED, True),
    ],
)
def test_client_context_per_policy(policy, verify, check_hostname):
    context = tls.client_context(policy, None)
    assert context.verify_mode == verify and context.check_hostname == check_hostname
    assert tls.client_context(policy, None) is context  # cached
    if policy.require_ca_signed:
        assert context.minimum_version == ssl.TLSVersion.TLSv1_2


def test_client_context_loads_ca_file(pki):
    context = tls.client_context(CA_SIGNED, pki.ca_file)
    assert context.cert_store_stats()["x509_ca"] >= 1


@pytest.mark.parametrize(
    ("code", "message", "reason"),
    [
        (10, "certificate has expired", TlsFailure.EXPIRED),
        (9, "certificate is not yet valid", TlsFailure.EXPIRED),
        (62, "Hostname mismatch, certificate is not valid for 'x'.", TlsFailure.HOSTNAME_MISMATCH),
        (
            64,
            "IP address mismatch, certificate is not valid for '1.2.3.4'.",
            TlsFailure.HOSTNAME_MISMATCH,
        ),
        (18, "self-signed certificate", TlsFailure.UNTRUSTED_CA),
        (20, "unable to get local issuer certificate", TlsFailure.UNTRUSTED_CA),
    ],
)
def test_classify_verification_errors(code, message, reason):
    exc = ssl.SSLCertVerificationError(1, f"certificate verify failed: {message}")
    exc.verify_code = code
    exc.verify_message = message
    assert tls.classify(exc) is reason


def test_classify_other_errors_as_handshake():
    assert tls.classify(ssl.SSLError(1, "wrong version number")) is TlsFailure.HANDSHAKE
    assert tls.classify(ConnectionResetError()) is TlsFailure.HANDSHAKE


def test_server_context_offers_the_certificate(pki):
    cert, key = pki.issue("relay.test")
    context = tls.server_context(cert, key)
    assert context.verify_mode == ssl.CERT_NONE


# --- what the failure and the attempt line say ---------------------------------------


#: case -> the names the failure's certificate carries
CERTIFICATE_NAMES = {"self_signed": ("mx1.test",), "wrong_name": ("other.test",),
                     "expired": ("mx1.test",)}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CERTIFICATE_NAMES))
async def test_certificate_failure_carries_the_certificate(pki, case):
    """OpenSSL aborts the handshake before the certificate can be read: the
    relay reads it on a second connection without checks, sending no mail."""
    spec, failing, reason, _ = CASES[case]
    async with Sink(tls_context=_context(pki, spec)) as sink:
        with logs.captured(logs.fields_of("attempt")) as lines:
            attempt = await _deliver(pki, sink, failing)
    assert not sink.messages and not any(line.startswith("MAIL") for line in sink.lines)
    (result,) = attempt.results["b@x.test"]
    assert isinstance(result, TlsPolicyFailure)
    assert result.certificate is not None
    assert result.certificate.names == CERTIFICATE_NAMES[case]
    (line,) = lines
    # The handshake was tried and the check failed: not "tls=none".
    assert line["tls"] == "failed" and line["verified"] is False
    assert line["tls_check"] == reason.value
    assert line["result"] == "tls_failed"
    diagnosis = str(line["diagnosis"])
    if case == "wrong_name":
        assert "it names: other.test; fix: use one of these as the route host: other.test" in (
            diagnosis
        )
    elif case == "expired":
        assert "the certificate of mx1.test expired on " in diagnosis
    else:
        assert 'is issued by "O=untrusted test CA' in diagnosis
        assert "add its certificate to [tls] ca_file" in diagnosis


@pytest.mark.parametrize(
    ("spec", "policy", "tls_field", "verified"),
    [
        (None, OPPORTUNISTIC, "none", False),
        (None, ENCRYPT_ONLY, "failed", False),
        ({"names": ("mx1.test",)}, ENCRYPT_ONLY, "TLSv1.3", False),
        ({"names": ("mx1.test",)}, STRICT, "TLSv1.3", True),
    ],
    ids=["plaintext", "not_offered_required", "encrypted_unverified", "verified"],
)
async def test_attempt_line_says_what_happened_to_tls(pki, spec, policy, tls_field, verified):
    async with Sink(tls_context=_context(pki, spec)) as sink:
        with logs.captured(logs.fields_of("attempt")) as lines:
            await _deliver(pki, sink, policy)
    (line,) = lines
    assert (line["tls"], line["verified"]) == (tls_field, verified)
    assert ("tls_check" in line) == (tls_field == "failed")


async def test_attempt_line_says_tls_offered_but_not_used(pki):
    replies = {"STARTTLS": ["220 2.0.0 go ahead"]}
    async with Sink(tls_context=pki.server_context("mx1.test"), replies=replies) as sink:
        with logs.captured(logs.fields_of("attempt")) as lines:
            attempt = await _deliver(pki, sink, OPPORTUNISTIC)
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    (line,) = lines
    assert line["tls"] == "not_used" and line["verified"] is False
