"""The configuration as people and the audit log see it: summary lines, snapshots, diffs.

``describe`` gives check-config's and the start-up log's lines;
``snapshot`` the JSON-ready form the audit log keeps; ``diff`` what
changed between two configurations (the audit log's "config changed").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from relay.config import Config, Host, Route, Rule, TlsConfig


def describe(config: Config) -> list[str]:
    """Human-readable summary lines, one per route (for check-config and start-up logs)."""
    lines = []
    for route in config.routes:
        opts = [
            f"{opt}={'on' if getattr(route.tls, opt) else 'off'}"
            for opt in ("require_tls", "require_ca_signed", "validate_hostname")
        ]
        if route.tls.require_tls or route.tls_defers:
            # Without require_tls no host can fail the policy: nothing to show.
            opts.append(f"on_tls_failure={route.on_tls_failure}")
        if route.mx_lookup:
            opts.insert(0, "mx_lookup")
            opts.insert(1, f"mta_sts={'on' if route.mta_sts else 'off'}")
        lines.append(f"route {route.name!r}: {' '.join(opts)}")
        tables = [("primary", route.primary), ("secondary", route.secondary)]
        for table, hosts in tables:
            for host in hosts:
                label = "host" if route.single else table
                share = "" if route.single else f" load {host.load}%"
                lines.append(f"  {label} {host.name} port {host.port}{share}")
        if route.auth is not None:
            plain = ", also without TLS (auth_over_plaintext)" if route.auth.over_plaintext else ""
            lines.append(f"  auth {route.auth}{plain}")
    for i, rule in enumerate(config.rules, start=1):
        lines.append(f"rule {i}: {rule_text(rule)} -> {rule.route!r}")
    return lines


def rule_text(rule: Rule) -> str:
    """``@a.test, bob@b.test`` or ``senders @dept.test; recipients *`` (check-config)."""
    recipients = ", ".join(rule.recipients)
    if not rule.senders:
        return recipients
    senders = f"senders {', '.join(rule.senders)}"
    return f"{senders}; recipients {recipients}" if recipients else f"{senders}; any recipient"


# --- diff (for the audit log) -----------------------------------------------

#: The settings sections a diff compares field by field, in output order.
DIFF_SECTIONS = (
    "server", "queue", "delivery", "dns", "tls", "metrics", "audit", "log", "bounces",
)  # fmt: skip


def _plain(value: Any) -> Any:
    """A JSON-ready form of a config value: Paths, networks, Listen as strings."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return str(value)


def _hosts_text(hosts: Sequence[Host]) -> list[str]:
    return [f"{h.name}:{h.port} load {h.load}" for h in hosts]


def route_snapshot(route: Route) -> dict[str, Any]:
    """One route as flat ``field: value`` pairs, the unit a route diff compares.

    A single-host route shows ``host`` and ``port``; a multiple-host route
    shows its ``primary`` and ``secondary`` tables as ``host:port load N``.
    """
    fields: dict[str, Any] = {}
    if route.single:
        fields["host"] = route.primary[0].name
        fields["port"] = route.primary[0].port
    else:
        fields["primary"] = _hosts_text(route.primary)
        fields["secondary"] = _hosts_text(route.secondary)
    fields["mx_lookup"] = route.mx_lookup
    fields["require_tls"] = route.tls.require_tls
    fields["require_ca_signed"] = route.tls.require_ca_signed
    fields["validate_hostname"] = route.tls.validate_hostname
    fields["on_tls_failure"] = route.on_tls_failure
    fields["mta_sts"] = route.mta_sts
    if route.auth is not None:
        # Only when set, so a route without auth reads as before auth existed.
        # The password never: its fingerprint says whether it changed.
        fields["auth"] = str(route.auth)
        fields["credentials"] = route.auth.fingerprint
        if route.auth.over_plaintext:
            fields["auth_over_plaintext"] = True
    return fields


def _rule_snapshot(rule: Rule) -> dict[str, Any]:
    fields: dict[str, Any] = {"recipients": list(rule.recipients), "route": rule.route}
    if rule.senders:
        # Only when given: a rule without senders reads as it did before
        # senders existed, so older audit logs diff cleanly against it.
        fields["senders"] = list(rule.senders)
    return fields


#: Fields added after audit logs were first written, with the value every
#: route (or section) had before: an older snapshot without them is read as
#: having had that value, so an upgrade is not logged as a change.
_FIELDS_SINCE: dict[str, dict[str, Any]] = {
    "routes": {"on_tls_failure": "bounce", "mta_sts": True},
    "tls": {"expiry_warning": TlsConfig().expiry_warning},
}


def snapshot(config: Config) -> dict[str, Any]:
    """The whole effective configuration as JSON-ready data (what the audit log keeps).

    ``{"routes": {name: fields}, "rules": [{"recipients", "route"}], "server": {...}, ...}``
    (a rule's ``"senders"`` only when it has some).
    """
    snap: dict[str, Any] = {
        "routes": {route.name: route_snapshot(route) for route in config.routes},
        "rules": [_rule_snapshot(r) for r in config.rules],
    }
    for section in DIFF_SECTIONS:
        value = getattr(config, section)
        snap[section] = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    # (ip, port) pairs read better as the "ip:port" the config file uses.
    snap["dns"]["nameservers"] = [
        f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in config.dns.nameservers
    ]
    return snap


def _fields_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{field: [old, new]}`` for every field that differs; a missing field is None."""
    keys = list(old) + [k for k in new if k not in old]
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def _named_diff(
    old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    changed = {
        name: fields
        for name in old
        if name in new and (fields := _fields_diff(old[name], new[name]))
    }
    return {
        "added": [name for name in new if name not in old],
        "removed": [name for name in old if name not in new],
        "changed": changed,
    }


def diff_snapshots(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What changed from snapshot ``old`` to snapshot ``new`` (see :func:`diff`)."""
    # Rules have no names and their order matters (first match wins), so a
    # rule is known by its position: "rules[2]" changed means the second rule.
    old_rules = {f"rules[{i}]": r for i, r in enumerate(old.get("rules", []), start=1)}
    new_rules = {f"rules[{i}]": r for i, r in enumerate(new.get("rules", []), start=1)}
    since = _FIELDS_SINCE["routes"]
    old_routes = {name: {**since, **fields} for name, fields in old.get("routes", {}).items()}
    routes = _named_diff(old_routes, new.get("routes", {}))
    for fields in routes["changed"].values():
        if "credentials" in fields:
            # Not even the fingerprints: the audit says "credentials changed".
            fields["credentials"] = [v if v is None else "(hidden)" for v in fields["credentials"]]
    result: dict[str, Any] = {
        "routes": routes,
        "rules": _named_diff(old_rules, new_rules),
    }
    for section in DIFF_SECTIONS:
        before = {**_FIELDS_SINCE.get(section, {}), **old.get(section, {})}
        result[section] = _fields_diff(before, new.get(section, {}))
    return result


def diff(old: Config, new: Config) -> dict[str, Any]:
    """What changed from ``old`` to ``new``: pure, deterministic, JSON-serialisable.

    ``{"routes": {"added": [names], "removed": [names], "changed": {name:
    {field: [old, new]}}}, "rules": {same, keyed "rules[N]"}, "server":
    {field: [old, new]}, "queue": {...}, ...}`` with every section of
    :data:`DIFF_SECTIONS` present (empty when unchanged). Route fields are
    those of :func:`route_snapshot`; values are strings, numbers, booleans,
    None or lists of them. The file's own hash is not part of the diff.
    """
    return diff_snapshots(snapshot(old), snapshot(new))


def diff_is_empty(changes: Mapping[str, Any]) -> bool:
    """True when a :func:`diff` result records no change at all."""
    for key, value in changes.items():
        if key in ("routes", "rules"):
            if value["added"] or value["removed"] or value["changed"]:
                return False
        elif value:
            return False
    return True
