"""One delivery attempt over a route's candidates with aiosmtplib.

STUB: result types only; implemented under issue #4.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from relay import errors
from relay.errors import RelayError, Reply
from relay.routing import Candidate


@dataclass(frozen=True, slots=True)
class HostResult:
    """What happened at one candidate host (one line of the attempt log)."""

    candidate: Candidate
    ip: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    verified: bool = False
    peer_subject: str | None = None
    #: None when the host took the transaction (some recipients may still be refused).
    failure: RelayError | None = None


@dataclass(frozen=True, slots=True)
class Attempt:
    """The result of one attempt for one route: what the scheduler consumes."""

    route: str
    hosts: tuple[HostResult, ...]
    #: Per recipient address: the result at each candidate tried, in order.
    results: Mapping[str, tuple[Reply | RelayError, ...]]
    #: Per recipient address: "host [ip]" of the host that gave the last result.
    remote: Mapping[str, str]

    def outcome(self, address: str) -> str:
        """errors.DELIVERED, errors.BOUNCED or errors.DEFERRED."""
        return errors.outcome(self.results.get(address, ()))

    def last(self, address: str) -> Reply:
        """The reply to record for this recipient (for logs, queue list, the DSN)."""
        items = self.results.get(address, ())
        if not items:
            return errors.HostUnreachable("no candidate host").reply
        item = items[-1]
        return item if isinstance(item, Reply) else item.reply
