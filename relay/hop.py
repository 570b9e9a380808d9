"""One next hop as a connection sees it: the address, the TLS policy, the name, the credentials."""

from __future__ import annotations

from dataclasses import dataclass

from relay.config import Route, RouteAuth, TlsPolicy
from relay.routing import Candidate


@dataclass(frozen=True, slots=True)
class Hop:
    """One next hop as a connection sees it; also the pool's key."""

    ip: str
    port: int
    policy: TlsPolicy
    #: The name delivered to: SNI and certificate verification use it, never the IP.
    name: str
    #: The route's AUTH credentials: part of the hop, so that a pooled session
    #: is reused only by a route that authenticates (or not) the same way.
    auth: RouteAuth | None = None

    @classmethod
    def of(cls, route: Route, candidate: Candidate, ip: str) -> Hop:
        """The hop delivery uses for ``candidate`` at ``ip`` under ``route``.

        The candidate's own TLS policy (an MTA-STS ``enforce`` policy's)
        replaces the route's: relay.tls.enforces then decides as ever.
        """
        policy = candidate.tls or route.tls
        return cls(ip, candidate.port, policy, candidate.host.strip("[]"), route.auth)
