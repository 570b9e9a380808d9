"""The one way tests write a relay config: TOML text rendered from Python values.

``route`` and ``rule`` render one ``[[routes]]`` / ``[[rules]]`` table each,
as text that concatenates (``route(...) + route(...)``); ``relay_toml``
renders whole configs from sections (``{"server": {...}, "queue": {...}}``)
followed by such routes and rules. The presets other helpers offer
(tests/support/integ.py, inbound.py, procs.py, console.py) only choose
values and hand them to ``relay_toml``::

    text = relay_toml(
        {"server": {"hostname": "relay.test", "domains": ["corp.test"]},
         "queue": {"path": str(tmp_path / "spool")}},
        routes=route("Corp", "127.0.0.1", sink.port),
        rules=rule("Corp", "@corp.test"),
    )
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

TomlValue = str | int | float | bool | Path | Sequence[str]

#: A route's TLS checks by level, as ``route(..., **TLS_LEVELS["full"])``.
TLS_LEVELS: dict[str, dict[str, bool]] = {
    "opportunistic": {},
    "required": {"require_tls": True},
    "ca": {"require_tls": True, "require_ca_signed": True},
    "full": {"require_tls": True, "require_ca_signed": True, "validate_hostname": True},
}

#: A next hop of a multiple-host route: (host, port, load).
HostEntry = tuple[str, int, int]


def value(item: object) -> str:
    """One TOML value: booleans, numbers, strings (and paths), lists of them."""
    if isinstance(item, bool):
        return "true" if item else "false"
    if isinstance(item, int | float):
        return str(item)
    if isinstance(item, list | tuple):
        return "[" + ", ".join(value(one) for one in item) + "]"
    # TOML basic strings accept JSON's escapes.
    return json.dumps(str(item), ensure_ascii=False)


def table(header: str, items: Mapping[str, object]) -> str:
    """``[header]`` (or ``[[header]]``) and its keys; a list of mappings is an
    array of tables inside it (``[[routes.primary]]``)."""
    lines = [header]
    nested: list[str] = []
    name = header.strip("[]")
    for key, item in items.items():
        if isinstance(item, list | tuple) and item and isinstance(item[0], Mapping):
            for sub in item:
                nested.append(table(f"[[{name}.{key}]]", sub))
        else:
            lines.append(f"{key} = {value(item)}")
    return "\n".join(lines) + "\n" + "".join(nested)


def route(
    name: str,
    host: str = "127.0.0.1",
    port: int = 25,
    *,
    mx_lookup: bool = False,
    require_tls: bool = False,
    require_ca_signed: bool = False,
    validate_hostname: bool = False,
    primary: Sequence[HostEntry] = (),
    secondary: Sequence[HostEntry] = (),
    **keys: object,
) -> str:
    """One ``[[routes]]`` table; TLS checks off unless asked for (``TLS_LEVELS``).

    With ``primary`` (and ``secondary``) (host, port, load) entries it is a
    multiple-host route and ``host``/``port`` are not written. ``keys`` are
    further route keys (``on_tls_failure="bounce"``...).
    """
    items: dict[str, object] = {"name": name}
    if not primary:
        items |= {"host": host, "port": port}
    items |= {
        "mx_lookup": mx_lookup,
        "require_tls": require_tls,
        "require_ca_signed": require_ca_signed,
        "validate_hostname": validate_hostname,
        **keys,
    }
    for tier, entries in (("primary", primary), ("secondary", secondary)):
        if entries:
            items[tier] = [{"host": h, "port": p, "load": w} for h, p, w in entries]
    return table("[[routes]]", items)


def rule(route_name: str, *recipients: str, **keys: object) -> str:
    """One ``[[rules]]`` table: ``recipients`` patterns to ``route_name``."""
    return table("[[rules]]", {"recipients": list(recipients), "route": route_name, **keys})


def relay_toml(
    sections: Mapping[str, Mapping[str, object]], routes: str = "", rules: str = ""
) -> str:
    """A whole config: each section as a table, then the routes and the rules."""
    parts = [table(f"[{name}]", items) for name, items in sections.items()]
    return "\n".join([*parts, routes, rules])


def merged(
    defaults: Mapping[str, Mapping[str, object]], overrides: Mapping[str, Mapping[str, object]]
) -> dict[str, dict[str, object]]:
    """``defaults`` with each section of ``overrides`` merged key by key over it."""
    out = {name: dict(items) for name, items in defaults.items()}
    for name, items in overrides.items():
        out[name] = {**out.get(name, {}), **items}
    return out


def first_route_name(routes: str) -> str:
    """The name of the first ``[[routes]]`` table in ``routes`` text."""
    marker = "[[routes]]\nname = "
    return str(json.loads(routes.split(marker, 1)[1].split("\n", 1)[0]))


def daemon_toml(
    folder: Path,
    smtp: int | Sequence[int],
    metrics: int | None,
    domains: Sequence[str],
    routes: str,
    rules: str,
    **sections: Mapping[str, object],
) -> str:
    """A ``relay run`` config: SMTP on 127.0.0.1 port(s) ``smtp``, metrics on
    ``metrics`` (None: off), spool and audit log in ``folder``; ``sections``
    are merged over those."""
    ports = [smtp] if isinstance(smtp, int) else list(smtp)
    defaults: dict[str, dict[str, object]] = {
        "server": {
            "hostname": "relay.test",
            "listen": [f"127.0.0.1:{port}" for port in ports],
            "domains": list(domains),
        },
        "queue": {"path": folder / "spool"},
        "metrics": {"listen": f"127.0.0.1:{metrics}" if metrics else ""},
        "audit": {"path": folder / "audit.log"},
    }
    return relay_toml(merged(defaults, sections), routes, rules)
