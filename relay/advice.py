"""What went wrong with a host's TLS and how to fix it: the one place for those words.

``relay test-tls``, the attempt log line, the DSN's delivery-status part
and the postmaster copy all say it with :func:`tls_advice` (delivery through
:func:`hop_advice`, which knows who set the policy); the sender's
plain-words line comes from here too (:attr:`Advice.sender`), so the
sender never reads route names or admin advice.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

from relay.certificate import Certificate, day
from relay.errors import REQUIRETLS_NOT_OFFERED, TLS_FAILURE_OPTION, TlsFailure


@dataclass(frozen=True, slots=True)
class Advice:
    """One host's TLS failure, for the sender and for the admin."""

    #: The route option whose check failed, e.g. "require_ca_signed".
    option: str
    #: For the admin: what failed at the host, with the certificate's facts.
    problem: str
    #: For the admin: what to do, most recommended first.
    fixes: tuple[str, ...]
    #: For the sender: what happened, in plain words (no route, no advice).
    sender: str

    def one_line(self) -> str:
        """``problem; fix: a; or b`` for a log field or a DSN extension field."""
        return f"{self.problem}; fix: {'; '.join(self.fixes)}"


def _names(certificate: Certificate | None) -> str:
    names = certificate.names if certificate is not None else ()
    return ", ".join(names)


def _turn_off(option: str, route: str, consequence: str) -> str:
    where = f' in route "{route}"' if route else " in the route"
    return f"or set {option} = false{where} ({consequence}; not recommended)"


def hop_advice(
    reason: TlsFailure,
    host: str,
    certificate: Certificate | None = None,
    route: str = "",
    detail: str = "",
    *,
    via_mx: str = "",
    sts_domain: str = "",
    requiretls: bool = False,
) -> Advice:
    """:func:`tls_advice`, told where the policy the host failed came from.

    The route's options are the fix only when the route set the policy. For
    a message sent with REQUIRETLS (RFC 8689) the sender set it; for a host
    under ``sts_domain``'s MTA-STS ``enforce`` policy (RFC 8461) the
    recipient domain did. The attempt log line and the DSN both ask here.
    """
    advice = tls_advice(reason, host, certificate, route, detail, via_mx=via_mx)
    if requiretls:
        return _under_requiretls(advice, host, detail == REQUIRETLS_NOT_OFFERED)
    if sts_domain:
        return _under_mta_sts(advice, sts_domain, route)
    return advice


def _route_fixes(advice: Advice) -> tuple[str, ...]:
    """The fixes that do not turn a route option off."""
    return tuple(fix for fix in advice.fixes if not fix.startswith("or set "))


def _under_mta_sts(advice: Advice, domain: str, route: str) -> Advice:
    # The route's options do not apply, so turning one off fixes nothing.
    where = f' in route "{route}"' if route else " in the route"
    problem = f"{advice.problem} (required by the MTA-STS policy of {domain}, mode enforce)"
    ignore = f"or set mta_sts = false{where} (the domain's policy is then ignored; not recommended)"
    return dataclasses.replace(advice, problem=problem, fixes=(*_route_fixes(advice), ignore))


def _under_requiretls(advice: Advice, host: str, keyword_missing: bool) -> Advice:
    # RFC 8689: the sender's REQUIRETLS overrides the route, which cannot relax it.
    if keyword_missing:
        return Advice(
            advice.option,
            f"{host} does not offer REQUIRETLS after STARTTLS, which the sender asked for",
            (
                f"enable REQUIRETLS on {host} (RFC 8689), or route such mail through a next hop "
                "that offers it",
                "or ask the sender to send without REQUIRETLS",
            ),
            "it does not support the secure delivery (REQUIRETLS) the message asked for",
        )
    problem = f"{advice.problem} (required by the sender: REQUIRETLS)"
    fixes = (*_route_fixes(advice), "or ask the sender to send without REQUIRETLS")
    return dataclasses.replace(advice, problem=problem, fixes=fixes)


def tls_advice(
    reason: TlsFailure,
    host: str,
    certificate: Certificate | None = None,
    route: str = "",
    detail: str = "",
    now: float | None = None,
    via_mx: str = "",
) -> Advice:
    """The diagnosis of ``host`` failing ``reason`` of ``route``'s TLS policy.

    ``host`` is the name delivered to (the route's host or the MX name);
    ``certificate`` the one it presented, when known; ``detail`` OpenSSL's
    words, for a handshake that failed for no certificate reason;
    ``via_mx`` the domain whose MX lookup gave ``host`` (then the name
    comes from DNS, not from the route).
    """
    option = TLS_FAILURE_OPTION[reason]
    if reason is TlsFailure.NO_STARTTLS:
        return Advice(
            option,
            f"{host} does not offer STARTTLS",
            (
                f"enable STARTTLS on {host}",
                _turn_off("require_tls", route, "mail to it then goes unencrypted"),
            ),
            "it does not support encrypted connections",
        )
    if reason is TlsFailure.HANDSHAKE:
        why = f": {detail}" if detail else ""
        return Advice(
            option,
            f"the TLS handshake with {host} failed{why}",
            (
                f"check the TLS set-up of {host}: the relay needs TLS 1.2 or later "
                "and a certificate with its private key",
                _turn_off("require_tls", route, "mail to it may then go unencrypted"),
            ),
            "a secure (encrypted) connection to it could not be set up",
        )
    if reason is TlsFailure.UNTRUSTED_CA:
        if certificate is None:
            what = "is not signed by a trusted CA"
            private = "or, if it is from a private CA, add that CA's certificate to [tls] ca_file"
        elif certificate.self_signed:
            what = f'is self-signed ("{certificate.subject}")'
            private = "or add that certificate to [tls] ca_file to trust it as its own CA"
        else:
            what = f'is issued by "{certificate.issuer}", a CA this relay does not trust'
            private = "or, if that is your private CA, add its certificate to [tls] ca_file"
        return Advice(
            option,
            f"the certificate of {host} {what}",
            (
                f"install a certificate issued by a trusted CA on {host}",
                private,
                _turn_off("require_ca_signed", route, "the host is then not authenticated"),
            ),
            "its security certificate is not issued by a trusted authority",
        )
    if reason is TlsFailure.HOSTNAME_MISMATCH:
        names = _names(certificate)
        if via_mx:
            # The name comes from the MX record, not from the route.
            carries = f"; it names: {names}" if names else ""
            return Advice(
                option,
                f"the certificate of {host} (MX of {via_mx}) does not name {host}{carries}",
                (
                    f"install a certificate on {host} that names {host}",
                    f"or point the MX record of {via_mx} to a name the certificate carries"
                    + (f" ({names})" if names else ""),
                    _turn_off("validate_hostname", route, "any certificate name is then accepted"),
                ),
                "its security certificate is for a different name",
            )
        if names:
            return Advice(
                option,
                f"the certificate of {host} does not name {host}; it names: {names}",
                (
                    f"use one of these as the route host: {names}",
                    f"or install a certificate on that server that names {host}",
                    _turn_off("validate_hostname", route, "any certificate name is then accepted"),
                ),
                "its security certificate is for a different name",
            )
        return Advice(
            option,
            f"the certificate of {host} does not name {host}",
            (
                "use the host name that appears in the server's certificate as the route host "
                "(relay test-tls shows it)",
                f"or install a certificate on that server that names {host}",
                _turn_off("validate_hostname", route, "any certificate name is then accepted"),
            ),
            "its security certificate is for a different name",
        )
    # EXPIRED: outside its validity period, one way or the other.
    if certificate is not None and certificate.not_yet_valid(now):
        return Advice(
            option,
            f"the certificate of {host} is not valid until {certificate.valid_from()} "
            f"(valid {certificate.valid_from()} to {certificate.valid_until()})",
            (
                f"check the clocks of this machine and of {host}",
                f"or install a certificate on {host} that is valid now",
            ),
            "its security certificate is not valid yet",
        )
    if certificate is not None:
        problem = (
            f"the certificate of {host} expired on {certificate.valid_until()} "
            f"(valid {certificate.valid_from()} to {certificate.valid_until()})"
        )
    else:
        problem = f"the certificate of {host} has expired or is not yet valid"
    return Advice(
        option,
        problem,
        (
            f"renew the certificate on {host}",
            f"and check the clocks of this machine and of {host}",
            _turn_off("require_ca_signed", route, "the host is then not authenticated"),
        ),
        "its security certificate has expired",
    )


def _span(seconds: float) -> str:
    """A duration the way the config writes it, in words: "21 days", "12 hours"."""
    if seconds >= 86400 and seconds % 86400 == 0:
        return f"{seconds / 86400:g} days"
    return f"{seconds / 3600:g} hours"


def expiry_warning(host: str, not_after: float, window: float, now: float | None = None) -> str:
    """The warning about a certificate that ends within ``window`` seconds (or has ended).

    Said by the daemon's ``tls_certificate_expiring`` log line and by
    ``relay test-tls`` (its ``WARN`` line and ``warnings`` in ``--json``).
    """
    left = not_after - (time.time() if now is None else now)
    days = math.floor(left / 86400)
    if left <= 0:
        when, fix = f"expired on {day(not_after)}", f"renew it on {host}"
    else:
        plural = "s" if days != 1 else ""
        when = f"expires on {day(not_after)}, in {days} day{plural}"
        fix = f"renew it on {host} before then"
    return (
        f"the certificate of {host} {when} ([tls] expiry_warning is {_span(window)}); "
        f"{fix}: routes that check certificates (require_ca_signed) cannot deliver "
        "to an expired one"
    )
