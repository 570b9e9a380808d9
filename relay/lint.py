"""Warnings about a valid config: settings that are allowed but almost surely not meant.

``relay check-config`` prints them under ``warnings:`` and still exits 0:
the relay runs such a config as written. Each is a :class:`Problem`, so it
names the rule, route or host the way the errors do.
"""

from __future__ import annotations

from relay.addresses import is_ip_literal
from relay.config import Config, Host, Route, address_key
from relay.configload import Problem


def warnings(config: Config) -> list[Problem]:
    """Every warning about ``config``, in file order: rules, then routes."""
    found, live_routes = _rules(config)
    for index, route in enumerate(config.routes, start=1):
        where = f"routes[{index}] {route.name!r}"
        if route.name not in live_routes and route.name != config.bounces.route:
            found.append(
                Problem(where, "", "no rule that can match sends mail to it (nor [bounces] route)")
            )
        found.extend(_ip_hosts(where, route))
        if route.tls_defers and not route.tls.require_tls:
            found.append(
                Problem(
                    where,
                    "on_tls_failure",
                    '"defer" has no effect: require_tls is off, so no host can fail the '
                    "TLS policy (mail goes in plaintext when TLS fails)",
                )
            )
        if route.auth is not None and route.auth.over_plaintext:
            found.append(Problem(where, "auth_over_plaintext", _plaintext_auth(route)))
    return found


def _covers(earlier: str, pattern: str) -> bool:
    """True when every recipient ``pattern`` matches is matched by ``earlier`` already."""
    if earlier == "*":
        return True
    if pattern == "*":
        return False
    if earlier.startswith("@"):
        return pattern.rpartition("@")[2] == earlier[1:]
    return not pattern.startswith("@") and pattern == earlier


def _key(pattern: str) -> str:
    # The same normal form Rule.matches compares in (A-label domains).
    return address_key(pattern) if "@" in pattern else pattern


def _rules(config: Config) -> tuple[list[Problem], set[str]]:
    """Patterns an earlier rule always takes first (first match wins), and the routes
    of the rules that can still match.

    Only a rule that takes any sender (no ``senders``, or ``"*"`` among
    them) shadows later rules: one restricted to some senders leaves the
    same recipients from every other sender to the rules after it.
    """
    found: list[Problem] = []
    live_routes: set[str] = set()
    seen: list[tuple[int, str]] = []  # (rule number, pattern) of every earlier any-sender rule
    for index, rule in enumerate(config.rules, start=1):
        where = f"rules[{index}]"
        # A rule by sender only takes every recipient of those senders.
        recipients = rule.recipients or ("*",)
        dead: list[str] = []
        for raw in recipients:
            pattern = _key(raw)
            taker = next((f for f in seen if _covers(f[1], pattern)), None)
            if taker is not None:
                dead.append(f"{raw!r} (rules[{taker[0]}] {taker[1]!r} matches it first)")
        if len(dead) == len(recipients):
            found.append(Problem(where, "", "can never match: " + "; ".join(dead)))
        else:
            live_routes.add(rule.route)
            for text in dead:
                found.append(Problem(where, "recipients", f"never matches {text}"))
        if not rule.senders or "*" in rule.senders:
            seen.extend((index, _key(raw)) for raw in recipients)
    return found, live_routes


def _plaintext_auth(route: Route) -> str:
    if route.tls.require_tls:
        # Every connection is encrypted before AUTH: the option changes nothing.
        return "has no effect: require_tls = true sends the password only over TLS; remove it"
    return (
        "the password may be sent without TLS, readable on the network; if the host "
        "offers STARTTLS, set require_tls = true and remove auth_over_plaintext"
    )


def _ip_hosts(where: str, route: Route) -> list[Problem]:
    """IP-address hosts under validate_hostname: certificates are issued to names."""
    if not route.tls.validate_hostname or route.mx_lookup:
        return []
    tables: list[tuple[str, tuple[Host, ...]]] = [
        ("primary", route.primary),
        ("secondary", route.secondary),
    ]
    found = []
    for table, hosts in tables:
        for number, host in enumerate(hosts, start=1):
            if not is_ip_literal(host.name):
                continue
            field = "host" if route.single else f"{table}[{number}].host"
            found.append(
                Problem(
                    where,
                    field,
                    f"{host.name!r} is an IP address and validate_hostname is on: the "
                    "certificate must then list this address, which CA-issued ones rarely "
                    "do; use the host name the server's certificate carries",
                )
            )
    return found
