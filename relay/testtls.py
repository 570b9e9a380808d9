"""``relay test-tls`` for one route: probe its hosts as delivery would, and say what was found.

The command (relay.cli) and the console's "Test TLS connection" button
(relay.console.api) both run :func:`probe_route` and print
:func:`probe_json`, so the two cannot disagree. The probe itself is
relay.probe, run by a Deliverer of its own (its resolver, its sessions).
"""

from __future__ import annotations

import random
from typing import Any

from relay import errors, routing
from relay.config import Config, Route
from relay.delivery import Deliverer
from relay.dns import DnsResolver, Resolver
from relay.metrics import Metrics
from relay.probe import ProbeResult
from relay.routing import Candidate


async def _candidates(route: Route, resolver: Resolver) -> list[Candidate]:
    """The route's candidate hosts, after MX lookup, exactly as delivery orders them."""
    return await routing.candidates(route, resolver, random.Random())


async def probe_route(cfg: Config, route: Route) -> list[ProbeResult]:
    """Probe ``route``'s hosts (after MX lookup, in delivery's order) as delivery would."""
    resolver = DnsResolver(cfg.dns)
    deliverer = Deliverer(lambda: cfg, resolver, Metrics())
    try:
        return await deliverer.probe(route, await _candidates(route, resolver))
    finally:
        await deliverer.close()


def probe_json(route: Route, result: ProbeResult, window: float) -> dict[str, Any]:
    """One host's probe as ``relay test-tls --json`` and the console print it."""
    cand, cert = result.candidate, result.certificate
    return {
        "route": route.name,
        "host": cand.host,
        "table": cand.table,
        "via_mx": cand.via_mx,
        "address": result.ip,
        "port": cand.port,
        "error": result.error or None,
        "starttls": result.starttls,
        "tls_version": result.tls_version,
        "cipher": result.cipher,
        "certificate": None
        if cert is None
        else {
            "subject": cert.subject,
            "issuer": cert.issuer,
            "sans": list(cert.sans),
            "names": list(cert.names),
            "not_before": cert.not_before,
            "not_after": cert.not_after,
            "days_left": cert.days_left,
        },
        "chain_verified": result.chain_verified,
        "chain_error": result.chain_error or None,
        "hostname_matched": result.hostname_matched,
        "hostname_checked": result.hostname_checked or None,
        "checks": {
            option: {"enabled": getattr(route.tls, option), "passed": ok, "reason": why or None}
            for option, ok, why in result.checks()
        },
        "failures": [
            {
                "reason": f.value,
                "option": advice.option,
                "text": errors.TLS_FAILURE_TEXT[f],
                "problem": advice.problem,
                "fixes": list(advice.fixes),
            }
            for f, advice in zip(result.failures, result.advice(route.name), strict=True)
        ],
        "auth": None
        if not result.auth_checked
        else {
            "passed": not result.auth_error,
            "mechanism": result.auth_mechanism or None,
            "error": result.auth_error or None,
        },
        "passed": result.passed,
        "warnings": result.warnings(window),
    }
