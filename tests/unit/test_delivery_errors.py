"""Guard: every aiosmtplib exception maps to a relay failure class (relay/errors.py)."""

from __future__ import annotations

import inspect
import ssl

import aiosmtplib
import pytest

from relay import errors
from relay.errors import TlsFailure, TlsPolicyFailure
from relay.session import map_handshake_errors, map_smtp_errors


def _instance(cls: type[BaseException]) -> BaseException:
    """Build any aiosmtplib exception with plausible arguments."""
    if issubclass(cls, aiosmtplib.SMTPRecipientsRefused):
        return cls([aiosmtplib.SMTPRecipientRefused(550, "5.1.1 nope", "a@x.test")])
    params = [
        p
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.name != "self" and p.kind is p.POSITIONAL_ONLY
    ]
    if [p.name for p in params][:2] == ["code", "message"]:
        extra = ["a@x.test"] * (len(params) - 2)
        return cls(451, "4.3.0 try later", *extra)
    return cls("boom")


EXPECTED: dict[str, type[errors.RelayError]] = {
    "SMTPException": errors.TemporaryFailure,
    "SMTPNotSupported": errors.TemporaryFailure,
    "SMTPServerDisconnected": errors.ConnectionLost,
    "SMTPTimeoutError": errors.ConnectionLost,
    "SMTPReadTimeoutError": errors.ConnectionLost,
    "SMTPConnectError": errors.HostUnreachable,
    "SMTPConnectTimeoutError": errors.HostUnreachable,
    "SMTPConnectResponseError": errors.HostUnreachable,
    "SMTPResponseException": errors.RemoteTemporary,
    "SMTPHeloError": errors.RemoteTemporary,
    "SMTPDataError": errors.RemoteTemporary,
    "SMTPAuthenticationError": errors.RemoteTemporary,
    "SMTPSenderRefused": errors.RemoteTemporary,
    "SMTPRecipientRefused": errors.RemoteTemporary,
    "SMTPRecipientsRefused": errors.RemotePermanent,
}

EXPORTED = sorted(
    name
    for name in aiosmtplib.__all__
    if isinstance(getattr(aiosmtplib, name), type)
    and issubclass(getattr(aiosmtplib, name), BaseException)
)


def test_every_exported_exception_is_in_the_table():
    assert set(EXPORTED) == set(EXPECTED), "a new aiosmtplib exception needs a mapping"


@pytest.mark.parametrize("name", EXPORTED)
def test_each_exception_maps_to_its_class(name):
    exc = _instance(getattr(aiosmtplib, name))
    with pytest.raises(errors.RelayError) as caught, map_handshake_errors():
        raise exc
    assert type(caught.value) is EXPECTED[name]
    assert caught.value.__cause__ is exc


def test_remote_reply_is_kept_verbatim():
    with pytest.raises(errors.RemotePermanent) as caught, map_smtp_errors():
        raise aiosmtplib.SMTPSenderRefused(553, "5.7.1 sender not allowed", "a@x.test")
    assert caught.value.reply == errors.Reply(553, (5, 7, 1), "sender not allowed")


def test_ssl_errors_are_tls_policy_failures_when_required():
    exc = ssl.SSLCertVerificationError(1, "certificate verify failed: certificate has expired")
    exc.verify_code, exc.verify_message = 10, "certificate has expired"
    with pytest.raises(TlsPolicyFailure) as caught, map_handshake_errors():
        raise exc
    assert caught.value.reason is TlsFailure.EXPIRED
    with pytest.raises(errors.ConnectionLost), map_smtp_errors():
        raise ssl.SSLError(1, "wrong version number")


@pytest.mark.parametrize(
    "exc",
    [
        ssl.SSLEOFError(8, "EOF occurred in violation of protocol"),
        ssl.SSLZeroReturnError(6, "TLS/SSL connection has been closed (EOF)"),
        ssl.SSLSyscallError(5, "Some I/O error occurred"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ],
)
def test_peer_going_away_mid_handshake_is_not_a_tls_verdict(exc):
    # The peer closing or resetting is temporary even under require_tls.
    with pytest.raises(errors.ConnectionLost), map_handshake_errors():
        raise exc


def test_openssl_alert_is_a_tls_verdict():
    exc = ssl.SSLError(1, "[SSL: TLSV1_ALERT_PROTOCOL_VERSION] tlsv1 alert protocol version")
    with pytest.raises(TlsPolicyFailure) as caught, map_handshake_errors():
        raise exc
    assert caught.value.reason is TlsFailure.HANDSHAKE


def test_unexpected_exception_defers_with_internal_error():
    with pytest.raises(errors.TemporaryFailure) as caught, map_smtp_errors():
        raise KeyError("bug")
    assert caught.value.reply == errors.INTERNAL_ERROR


def test_relay_errors_pass_through():
    failure = errors.HostUnreachable("x")
    with pytest.raises(errors.HostUnreachable) as caught, map_smtp_errors():
        raise failure
    assert caught.value is failure
