"""The TLS probe behind ``relay test-tls``: STARTTLS, chain and name checks (RFC 3207, RFC 6125).

It connects to a route's hosts as delivery would and sends no mail. For a
route with AUTH credentials it also logs in once as delivery would (RFC 4954).

Part of the outbound SMTP package (delivery, session, pool, probe); it
needs no aiosmtplib of its own: sessions come from :mod:`relay.session`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from relay import certificate, errors, tls
from relay.addresses import ip_literal
from relay.advice import Advice, expiry_warning, tls_advice
from relay.certificate import Certificate
from relay.config import Config, Route, TlsPolicy
from relay.errors import RelayError, TlsCheck, TlsFailure, TlsPolicyFailure
from relay.expiry import expires_soon
from relay.hop import Hop
from relay.routing import Candidate
from relay.session import (
    LOOK,
    HandshakeFailed,
    open_hop,
    open_session,
    quit_session,
    start_tls,
)

#: The IPs to connect to for a candidate, under the route's DNS policy
#: (the Deliverer's own lookup, so its metrics and log lines apply).
AddressLookup = Callable[[Route, Candidate], Awaitable[list[str]]]


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """What ``relay test-tls`` found at one address of one candidate host."""

    candidate: Candidate
    ip: str | None = None
    starttls: bool = False
    tls_version: str | None = None
    cipher: str | None = None
    #: Why STARTTLS was offered but no TLS session came up.
    tls_error: str = ""
    certificate: Certificate | None = None
    #: The chain verified against the system store + [tls] ca_file.
    chain_verified: bool = False
    chain_error: str = ""
    #: The certificate matched ``hostname_checked`` (a name or IP literal).
    hostname_matched: bool = False
    hostname_checked: str = ""
    hostname_error: str = ""
    #: The route's TLS policy failures at this host, in check order.
    failures: tuple[TlsFailure, ...] = ()
    #: Failure to reach or speak SMTP to the host, if any.
    error: str = ""
    #: The route has AUTH credentials and they were tried as delivery would.
    auth_checked: bool = False
    #: The SASL mechanism that was accepted ("" if none was).
    auth_mechanism: str = ""
    #: Why AUTH failed (never the password), "" when it passed or was not checked.
    auth_error: str = ""

    @property
    def passed(self) -> bool:
        return not self.error and not self.failures and not self.auth_error

    def advice(self, route: str) -> list[Advice]:
        """What failed and how to fix it, for each of :attr:`failures`."""
        name = self.candidate.host.strip("[]")
        details = {TlsFailure.HANDSHAKE: self.tls_error}
        return [
            tls_advice(
                failure,
                name,
                self.certificate,
                route,
                details.get(failure, ""),
                via_mx=self.candidate.via_mx or "",
            )  # fmt: skip
            for failure in self.failures
        ]

    def warnings(self, window: float, now: float | None = None) -> list[str]:
        """What passes but needs attention: a certificate ending within ``window`` seconds."""
        cert = self.certificate
        end = cert.expires_at if cert is not None else None
        if end is None or not expires_soon(end, window, now):
            return []
        return [expiry_warning(self.candidate.host.strip("[]"), end, window, now)]

    def checks(self) -> list[tuple[str, bool, str]]:
        """(option, would pass, why not) for each TLS option, on or off in the route."""
        text = errors.TLS_FAILURE_TEXT
        if not self.starttls:
            tls_why = text[TlsFailure.NO_STARTTLS]
        elif self.tls_version is None:
            tls_why = f"{text[TlsFailure.HANDSHAKE]}: {self.tls_error}"
        else:
            tls_why = ""
        tls_ok = not tls_why
        chain_why = "" if self.chain_verified else (self.chain_error or "no TLS session")
        name_why = "" if self.hostname_matched else (self.hostname_error or "no TLS session")
        return [
            (TlsCheck.TLS, tls_ok, tls_why),
            (TlsCheck.CA_SIGNED, tls_ok and self.chain_verified, chain_why),
            (TlsCheck.HOSTNAME, tls_ok and self.hostname_matched, name_why),
        ]


async def probe_hosts(
    route: Route,
    candidates: Sequence[Candidate],
    addresses: AddressLookup,
    config: Callable[[], Config],
) -> list[ProbeResult]:
    """Connect to every address of every candidate as delivery would; send no mail."""
    results: list[ProbeResult] = []
    for candidate in candidates:
        try:
            ips = await addresses(route, candidate)
        except RelayError as exc:
            results.append(ProbeResult(candidate, error=f"DNS: {exc.detail}"))
            continue
        for ip in ips:
            results.append(await _probe_one(route, candidate, ip, config()))
    return results


async def _probe_one(route: Route, candidate: Candidate, ip: str, cfg: Config) -> ProbeResult:
    """The TLS looks at one address, then AUTH when the route has credentials."""
    result = await _probe_tls(route, candidate, ip, cfg)
    if route.auth is None or result.error:
        return result
    mechanism, error = await _check_auth(route, candidate, ip, cfg)
    return dataclasses.replace(
        result, auth_checked=True, auth_mechanism=mechanism, auth_error=error
    )


async def _check_auth(route: Route, candidate: Candidate, ip: str, cfg: Config) -> tuple[str, str]:
    """Connect as delivery does (the route's TLS policy, then AUTH) and QUIT:
    (the mechanism accepted, "") or ("", why it failed)."""
    hop = Hop.of(route, candidate, ip)
    try:
        session = await open_hop(hop, cfg, read_certificate=False)
    except RelayError as exc:
        if isinstance(exc.__cause__, HandshakeFailed):
            return "", f"no TLS session: {exc.detail}"
        return "", exc.detail
    mechanism = session.auth_mechanism
    await quit_session(session)
    return mechanism.upper(), ""


async def _probe_tls(route: Route, candidate: Candidate, ip: str, cfg: Config) -> ProbeResult:
    """Three looks at one address: the certificate, the chain, the name.

    What each look found is a finding; the route's policy
    (:func:`relay.tls.policy_failures`, as delivery asks it) says which fail.
    """
    name = candidate.host.strip("[]")
    # First look: encrypt without checks, to read the certificate even
    # when it would fail verification.
    try:
        session = await open_session(Hop(ip, candidate.port, LOOK, name), cfg, starttls=False)
    except RelayError as exc:
        return ProbeResult(candidate, ip, error=exc.detail)
    if not session.starttls_offered:
        await quit_session(session)
        failures = tls.policy_failures(route.tls, [(TlsCheck.TLS, TlsFailure.NO_STARTTLS)])
        return ProbeResult(candidate, ip, failures=failures)
    try:
        await start_tls(session, LOOK, cfg)
    except (HandshakeFailed, RelayError) as exc:
        session.close()
        failure = exc.failure if isinstance(exc, HandshakeFailed) else exc
        failures = tls.policy_failures(route.tls, [(TlsCheck.TLS, TlsFailure.HANDSHAKE)])
        return ProbeResult(
            candidate, ip, starttls=True, failures=failures, tls_error=failure.detail
        )
    der = session.peer_certificate()
    cert = certificate.decode(der) if der else None
    version, cipher = session.tls_version, session.cipher
    await quit_session(session)
    # Second look: the chain alone; third: the name, as delivery checks it.
    chain = await _check(candidate, ip, TlsPolicy(True, True, False), cfg)
    named: TlsPolicyFailure | None
    if chain is None:
        named = await _check(candidate, ip, TlsPolicy(True, True, True), cfg)
    elif cert is not None and _matches(name, cert.sans):
        named = None
    else:
        named = TlsPolicyFailure(TlsFailure.HOSTNAME_MISMATCH, f"no SAN matches {name}")
    findings = [(TlsCheck.CA_SIGNED, chain), (TlsCheck.HOSTNAME, named)]
    return ProbeResult(
        candidate,
        ip,
        starttls=True,
        tls_version=version,
        cipher=cipher,
        certificate=cert,
        chain_verified=chain is None,
        chain_error=chain.detail if chain else "",
        hostname_matched=named is None,
        hostname_checked=name,
        hostname_error=named.detail if named else "",
        failures=tls.policy_failures(
            route.tls, [(check, found.reason) for check, found in findings if found is not None]
        ),
    )


async def _check(
    candidate: Candidate, ip: str, policy: TlsPolicy, cfg: Config
) -> TlsPolicyFailure | None:
    """Handshake under ``policy``; the failure, or None when it passed."""
    hop = Hop(ip, candidate.port, policy, candidate.host.strip("[]"))
    try:
        # The certificate was read by the first look: no second read here.
        session = await open_session(hop, cfg, starttls=True, read_certificate=False)
    except HandshakeFailed as exc:
        if isinstance(exc.failure, TlsPolicyFailure):
            return exc.failure
        return TlsPolicyFailure(TlsFailure.HANDSHAKE, exc.failure.detail)
    except TlsPolicyFailure as exc:
        return exc
    except RelayError as exc:
        return TlsPolicyFailure(TlsFailure.HANDSHAKE, exc.detail)
    await quit_session(session)
    return None


def _matches(name: str, sans: Sequence[str]) -> bool:
    """RFC 6125 matching of ``name`` against "DNS:..."/"IP Address:..." SANs (for display)."""
    literal = ip_literal(name)
    for san in sans:
        kind, _, value = san.partition(":")
        if literal is not None:
            if kind == "IP Address" and ip_literal(value) == literal:
                return True
            continue
        if kind != "DNS":
            continue
        value, host = value.lower().rstrip("."), name.lower().rstrip(".")
        if value == host:
            return True
        if value.startswith("*.") and "." in host and host.split(".", 1)[1] == value[2:]:
            return True
    return False
