"""One next hop as a connection sees it: the address, the TLS policy, the name, the credentials."""

from __future__ import annotations

from dataclasses import dataclass

from relay import tls
from relay.config import Route, RouteAuth, TlsPolicy
from relay.envelope import Envelope
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
    #: The message asks REQUIRETLS (RFC 8689): ``policy`` is strict and the
    #: host must offer REQUIRETLS after STARTTLS (relay.session).
    requiretls: bool = False

    @classmethod
    def of(
        cls, route: Route, candidate: Candidate, ip: str, envelope: Envelope | None = None
    ) -> Hop:
        """The hop delivery uses for ``candidate`` at ``ip`` under ``route``
        (for ``envelope``, whose REQUIRETLS or TLS-Required can change the policy).

        The candidate's own TLS policy (an MTA-STS ``enforce`` policy's)
        replaces the route's; the message may then tighten or waive it
        (relay.tls.message_policy), and relay.tls.enforces decides as ever.
        """
        requiretls = envelope is not None and envelope.requiretls
        tls_optional = envelope is not None and envelope.tls_optional
        policy = tls.message_policy(candidate.tls or route.tls, requiretls, tls_optional)
        name = candidate.host.strip("[]")
        return cls(ip, candidate.port, policy, name, route.auth, requiretls)
