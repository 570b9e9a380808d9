"""Which route a recipient takes, and the ordered candidate hosts of a route.

STUB: interface only; implemented under issue #4.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Candidate:
    """One next hop to try, in order."""

    #: The name to connect to and to verify the certificate against
    #: (the route's host, or the MX host's name), or an IP literal.
    host: str
    port: int
    #: The domain whose MX gave this host, when the route does MX lookup.
    via_mx: str | None = None
    #: "primary" or "secondary".
    table: str = "primary"
    #: The host as written in the route (metric label: config values only).
    configured: str = ""
