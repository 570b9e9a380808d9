"""relay.advice: the diagnosis and the fixes fit the failed check and the certificate's facts."""

from __future__ import annotations

from datetime import UTC, datetime

from relay.advice import hop_advice, tls_advice
from relay.certificate import Certificate
from relay.errors import REQUIRETLS_NOT_OFFERED, TlsFailure

NOW = datetime(2026, 6, 1, tzinfo=UTC).timestamp()


def _certificate(not_before: str, not_after: str, subject: str = "CN=mx1.test") -> Certificate:
    return Certificate(
        subject=subject,
        issuer="O=Example CA, CN=Example CA R1",
        sans=("DNS:mx1.test", "DNS:mail.example.test", "IP Address:192.0.2.1"),
        not_before=not_before,
        not_after=not_after,
        days_left=0,
    )


def test_expired_gives_the_dates() -> None:
    cert = _certificate("Jan  1 00:00:00 2026 GMT", "Mar 31 12:00:00 2026 GMT")
    advice = tls_advice(TlsFailure.EXPIRED, "mx1.test", cert, "Corp", now=NOW)
    assert advice.option == "require_ca_signed"
    assert advice.problem == (
        "the certificate of mx1.test expired on 2026-03-31 12:00 UTC "
        "(valid 2026-01-01 00:00 UTC to 2026-03-31 12:00 UTC)"
    )
    assert advice.fixes[0] == "renew the certificate on mx1.test"
    assert advice.sender == "its security certificate has expired"


def test_not_yet_valid_is_told_apart_from_expired() -> None:
    cert = _certificate("Jul  1 00:00:00 2026 GMT", "Dec 31 00:00:00 2026 GMT")
    advice = tls_advice(TlsFailure.EXPIRED, "mx1.test", cert, "Corp", now=NOW)
    assert advice.problem.startswith("the certificate of mx1.test is not valid until 2026-07-01")
    assert advice.fixes[0] == "check the clocks of this machine and of mx1.test"
    assert "not valid yet" in advice.sender


def test_name_mismatch_lists_every_name_the_certificate_carries() -> None:
    cert = _certificate("Jan  1 00:00:00 2026 GMT", "Dec 31 00:00:00 2026 GMT")
    advice = tls_advice(TlsFailure.HOSTNAME_MISMATCH, "relay-in.example.test", cert, "Corp")
    assert advice.problem.endswith("it names: mx1.test, mail.example.test, 192.0.2.1")
    assert advice.fixes[0] == (
        "use one of these as the route host: mx1.test, mail.example.test, 192.0.2.1"
    )
    assert 'validate_hostname = false in route "Corp"' in advice.fixes[-1]


def test_without_the_certificate_the_advice_still_fits() -> None:
    mismatch = tls_advice(TlsFailure.HOSTNAME_MISMATCH, "mx1.test")
    assert "relay test-tls shows it" in mismatch.fixes[0]
    untrusted = tls_advice(TlsFailure.UNTRUSTED_CA, "mx1.test")
    assert "[tls] ca_file" in untrusted.fixes[1]
    expired = tls_advice(TlsFailure.EXPIRED, "mx1.test")
    assert "has expired or is not yet valid" in expired.problem


def test_no_starttls_and_handshake_give_no_certificate_advice() -> None:
    for reason in (TlsFailure.NO_STARTTLS, TlsFailure.HANDSHAKE):
        advice = tls_advice(reason, "mx1.test", route="Corp", detail="wrong version number")
        assert advice.option == "require_tls"
        text = advice.one_line()
        assert "certificate issued" not in text and "ca_file" not in text
        assert 'require_tls = false in route "Corp"' in text
    handshake = tls_advice(TlsFailure.HANDSHAKE, "mx1.test", detail="wrong version number")
    assert handshake.problem == "the TLS handshake with mx1.test failed: wrong version number"


def test_self_signed_is_named_as_such() -> None:
    cert = Certificate("CN=mx1.test", "CN=mx1.test", ("DNS:mx1.test",), "", "", 0)
    advice = tls_advice(TlsFailure.UNTRUSTED_CA, "mx1.test", cert)
    assert advice.problem == 'the certificate of mx1.test is self-signed ("CN=mx1.test")'
    assert advice.fixes[0] == "install a certificate issued by a trusted CA on mx1.test"


def test_name_mismatch_at_an_mx_host_does_not_say_route_host() -> None:
    cert = _certificate("Jan  1 00:00:00 2026 GMT", "Dec 31 00:00:00 2026 GMT")
    advice = tls_advice(
        TlsFailure.HOSTNAME_MISMATCH, "mx.example.test", cert, via_mx="example.test"
    )
    assert advice.problem.startswith("the certificate of mx.example.test (MX of example.test)")
    assert advice.fixes[0] == "install a certificate on mx.example.test that names mx.example.test"
    assert "MX record of example.test" in advice.fixes[1]
    assert "route host" not in advice.one_line()


def test_a_requiretls_message_is_not_fixed_by_the_route() -> None:
    # RFC 8689: the sender set the policy; turning a route option off changes nothing.
    missing = hop_advice(
        TlsFailure.HANDSHAKE, "mx1.test", route="Corp", detail=REQUIRETLS_NOT_OFFERED,
        requiretls=True,
    )  # fmt: skip
    assert missing.problem == (
        "mx1.test does not offer REQUIRETLS after STARTTLS, which the sender asked for"
    )
    assert "REQUIRETLS" in missing.sender
    untrusted = hop_advice(TlsFailure.UNTRUSTED_CA, "mx1.test", route="Corp", requiretls=True)
    assert untrusted.problem.endswith("(required by the sender: REQUIRETLS)")
    for advice in (missing, untrusted):
        assert not any("= false" in fix for fix in advice.fixes), advice.fixes
        assert advice.fixes[-1] == "or ask the sender to send without REQUIRETLS"


def test_an_mta_sts_host_is_fixed_by_the_domain_or_mta_sts_false() -> None:
    advice = hop_advice(TlsFailure.EXPIRED, "mx1.test", route="Corp", sts_domain="corp.test")
    assert advice.problem.endswith("(required by the MTA-STS policy of corp.test, mode enforce)")
    assert [fix for fix in advice.fixes if "= false" in fix] == [
        'or set mta_sts = false in route "Corp" (the domain\'s policy is then ignored; '
        "not recommended)"
    ]
    plain = hop_advice(TlsFailure.EXPIRED, "mx1.test", route="Corp")
    assert plain == tls_advice(TlsFailure.EXPIRED, "mx1.test", route="Corp")
