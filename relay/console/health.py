"""Per-host health for the Routes and Status pages.

HOOK (wired at merge time): host health is built elsewhere
(``relay/health.py``); :func:`host_health` is the one place the console
asks for it. Until it is wired it knows nothing and returns None, and the
pages show "-".
"""

from __future__ import annotations

from typing import Any


def host_health(route: str, host: str) -> dict[str, Any] | None:
    """The health of ``host`` in ``route`` (e.g. ``{"state": "up", ...}``), or None if unknown."""
    return None
