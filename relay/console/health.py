"""Per-host health for the Routes and Status pages.

The daemon's host health (relay.health) is the one source: the console
reads its snapshot, the same data ``relay status`` prints, and indexes it
by route and configured host.
"""

from __future__ import annotations

from typing import Any

#: (route name, configured host name) -> that host's health entry.
HealthIndex = dict[tuple[str, str], dict[str, Any]]


def index(snapshot: list[dict[str, Any]]) -> HealthIndex:
    """Each configured host's entry of a health snapshot, by (route, host).

    An entry has ``state`` ("up"/"down"), ``since``, ``last_error`` and,
    while down, ``next_probe`` (epoch seconds).
    """
    return {
        (route["route"], host["host"]): {
            key: host.get(key) for key in ("state", "since", "last_error", "next_probe")
        }
        for route in snapshot
        for host in route.get("hosts", ())
    }


def host_health(health: HealthIndex, route: str, host: str) -> dict[str, Any] | None:
    """The health of ``host`` in ``route``, or None if the daemon knows nothing of it."""
    return health.get((route, host))
