"""The one TLS-context builder (inbound and outbound) and TLS failure classification.

Outbound contexts follow a route's :class:`~relay.config.TlsPolicy`
(docs/tls.md; RFC 3207 STARTTLS):

- opportunistic (``require_tls = false``) and ``require_tls`` alone:
  encrypt, check nothing (RFC 7435 opportunistic security);
- ``require_ca_signed``: the chain must verify against the system store
  plus ``[tls] ca_file``; any name is fine unless ...
- ``validate_hostname``: the certificate must match the name delivered
  to (RFC 6125). The caller passes that *name* as ``server_hostname``,
  never the IP it connected to; an IP literal must match an IP SAN.
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Iterable
from pathlib import Path

from relay.config import TlsPolicy
from relay.errors import TlsCheck, TlsFailure

# OpenSSL X509_V_ERR_* codes (include/openssl/x509_vfy.h) that mean
# "the certificate is outside its validity period".
_EXPIRED_CODES = frozenset({9, 10})  # CERT_NOT_YET_VALID, CERT_HAS_EXPIRED
# X509_V_ERR_HOSTNAME_MISMATCH, X509_V_ERR_EMAIL_MISMATCH, X509_V_ERR_IP_ADDRESS_MISMATCH
_NAME_CODES = frozenset({62, 63, 64})


def enforces(policy: TlsPolicy, check: TlsCheck) -> bool:
    """Whether a host that fails ``check`` fails ``policy``.

    The one place that decides it: delivery (:mod:`relay.session`) and
    ``relay test-tls`` (:mod:`relay.probe`) both ask here.
    """
    required = {
        TlsCheck.TLS: policy.require_tls,
        TlsCheck.CA_SIGNED: policy.require_ca_signed,
        TlsCheck.HOSTNAME: policy.validate_hostname,
    }
    return required[check]


#: Every check, whatever the route says: TLS, a chain to a trusted CA, the
#: name delivered to. A REQUIRETLS message's policy (RFC 8689 section
#: 4.2.1) and an MTA-STS ``enforce`` policy's for its MX hosts (RFC 8461
#: section 4.2).
STRICT_POLICY = TlsPolicy(require_tls=True, require_ca_signed=True, validate_hostname=True)
#: The policy of a ``TLS-Required: No`` message (RFC 8689 section 4.2.2):
#: STARTTLS when offered, as opportunistic TLS; nothing required.
TLS_OPTIONAL_POLICY = TlsPolicy(require_tls=False, require_ca_signed=False, validate_hostname=False)


def message_policy(base: TlsPolicy, requiretls: bool, tls_optional: bool) -> TlsPolicy:
    """The TLS policy one message's hop follows where the hop's own policy is ``base``
    (the route's, or an MTA-STS ``enforce`` policy's: relay.hop).

    REQUIRETLS makes it strict; ``TLS-Required: No`` (never together with
    REQUIRETLS: relay.intake) makes it opportunistic, since the sender
    asked that its message go even where the route's checks, or the
    recipient domain's MTA-STS policy, fail (RFC 8689 section 5).
    """
    if requiretls:
        return STRICT_POLICY
    if tls_optional:
        return TLS_OPTIONAL_POLICY
    return base


def policy_failures(
    policy: TlsPolicy, findings: Iterable[tuple[TlsCheck, TlsFailure]]
) -> tuple[TlsFailure, ...]:
    """Of what each check found at a host, the failures that fail ``policy``, in order."""
    return tuple(failure for check, failure in findings if enforces(policy, check))


def server_context(cert: Path, key: Path) -> ssl.SSLContext:
    """The context for inbound STARTTLS with the configured certificate and key."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    # Clients are not asked for certificates: relay authorises by network.
    context.verify_mode = ssl.CERT_NONE
    return context


@functools.lru_cache(maxsize=32)
def client_context(policy: TlsPolicy, ca_file: Path | None = None) -> ssl.SSLContext:
    """The outbound context for ``policy``; cached, so build once per (policy, ca_file).

    A cached context is shared by every connection with the same policy;
    SSLContext is safe to share once configured. Call
    ``client_context.cache_clear()`` after a trust store changes on disk.
    """
    if not policy.require_ca_signed:
        # Opportunistic or encryption-only: a self-signed or expired
        # certificate still gives confidentiality against passive attackers.
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        if not policy.require_tls:
            # Opportunistic TLS should succeed with old peers rather than
            # fall back to plaintext: allow every version OpenSSL allows.
            context.minimum_version = ssl.TLSVersion.MINIMUM_SUPPORTED
        else:
            context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    # Without validate_hostname the chain must verify but any name is fine.
    context.check_hostname = policy.validate_hostname
    return context


@functools.lru_cache(maxsize=4)
def web_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """The context for HTTPS fetches (MTA-STS policies, RFC 8461 section 3.3):
    the system store plus ``[tls] ca_file``, names checked (RFC 6125)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca_file is not None:
        context.load_verify_locations(cafile=str(ca_file))
    return context


def classify(exc: BaseException) -> TlsFailure:
    """Which check of the TLS policy ``exc`` (raised by a handshake) failed."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        message = (exc.verify_message or str(exc)).lower()
        if code in _EXPIRED_CODES or "expired" in message or "not yet valid" in message:
            return TlsFailure.EXPIRED
        if code in _NAME_CODES or "mismatch" in message:
            return TlsFailure.HOSTNAME_MISMATCH
        # Self-signed, unknown issuer, bad signature, unusable chain...
        return TlsFailure.UNTRUSTED_CA
    return TlsFailure.HANDSHAKE


def interrupted(exc: BaseException) -> bool:
    """True when a TLS error means "the peer went away", not a verdict on its TLS.

    The rule: the peer closing (EOF, close_notify) or resetting the
    connection, or a socket-level error under OpenSSL, is a temporary
    problem of the connection. Every other ssl.SSLError is OpenSSL's
    verdict on the peer (a certificate error, an alert received or sent,
    a protocol or cipher mismatch, garbage instead of TLS records) and
    fails a policy that requires TLS.
    """
    interruptions = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)
    return isinstance(exc, (*interruptions, ConnectionError, TimeoutError))


def describe_failure(exc: BaseException) -> str:
    """A one-line reason for logs and ``relay test-tls`` (OpenSSL's words)."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"{exc.verify_message} (verify code {exc.verify_code})"
    return str(exc) or type(exc).__name__
