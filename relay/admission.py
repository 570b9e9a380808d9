"""Who gets an inbound session: the connection limits, and their log.

``[server] max_connections`` bounds the open sessions over all listeners;
``max_connections_per_ip`` bounds them per client, an IPv4 address or an
IPv6 /64 (one customer's LAN, as ISPs hand them out: counting single IPv6
addresses would let one host take the whole limit with addresses of its
own prefix). Clients in ``relay_networks`` are exempt from the per-client
limit only. The decision is made before any session exists (no greeting,
no parser, no timers), so a flood costs a 421 line and a close.
"""

from __future__ import annotations

import ipaddress
import resource
from collections.abc import Callable
from dataclasses import dataclass

from relay import events
from relay.addresses import client_address
from relay.config import ServerConfig

#: Seconds between two log lines about the same refused client.
LOG_INTERVAL = 60.0
#: Clients remembered for that; beyond it the oldest go (the log stays bounded).
LOG_MEMORY = 4096


def client_key(ip: str) -> str:
    """What the per-client limit counts: the IPv4 address, or the IPv6 /64."""
    addr = client_address(ip)
    if addr is None:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class Connections:
    """Open inbound sessions, in total and per client key."""

    def __init__(self) -> None:
        self.total = 0
        self._per_key: dict[str, int] = {}

    def refusal(self, server: ServerConfig, key: str, trusted: bool) -> str | None:
        """Why a new connection from client ``key`` must be refused (a metric
        reason), or None; ``trusted``: the client is in relay_networks."""
        # Per client first: a client over its own limit may not take an
        # idle session's place either.
        if not trusted and self._per_key.get(key, 0) >= server.max_connections_per_ip:
            return "max_connections_per_ip"
        if self.total >= server.max_connections:
            return "max_connections"
        return None

    def add(self, key: str) -> None:
        self.total += 1
        self._per_key[key] = self._per_key.get(key, 0) + 1

    def remove(self, key: str) -> None:
        self.total -= 1
        left = self._per_key[key] - 1
        if left:
            self._per_key[key] = left
        else:
            del self._per_key[key]

    def of(self, key: str) -> int:
        return self._per_key.get(key, 0)


class MemoryBudget:
    """Message bytes held in memory by all sessions together (``[server]
    max_memory``). Each session adds what it holds while it reads DATA;
    once the total is over the limit every session sends its message to
    the spool's temp file as it comes instead of keeping up to 256 KiB."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    @property
    def exhausted(self) -> bool:
        return self.held > self.limit


@dataclass(slots=True)
class _Logged:
    at: float
    suppressed: int = 0


class RefusalLog:
    """Logs a refused client once per :data:`LOG_INTERVAL`, not once per connection:
    a flood of refused connections must not become a flood of log lines."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._seen: dict[str, _Logged] = {}

    def refused(self, key: str, ip: str, reason: str, open_now: int) -> None:
        now = self._clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen.at < LOG_INTERVAL:
            seen.suppressed += 1
            return
        # Logged now: the count says how many went unlogged since the last line.
        events.warning(
            "connection_refused",
            client=ip,
            reason=reason,
            open=open_now,
            refused_since_last=seen.suppressed if seen is not None else 0,
        )
        self._seen.pop(key, None)
        self._seen[key] = _Logged(now)
        if len(self._seen) > LOG_MEMORY:
            # Dicts keep insertion order: the first entries are the oldest logged.
            for old in list(self._seen)[: len(self._seen) - LOG_MEMORY]:
                del self._seen[old]


#: File descriptors kept for the spool, deliveries and metrics beyond
#: ``max_connections`` when raising the open-files limit.
FD_RESERVE = 1024


def reserve_descriptors(max_connections: int) -> None:
    """Raise the open-files limit for ``max_connections`` (one descriptor
    each) plus the spool's and the deliveries' own; log what was done."""
    wanted = max_connections + FD_RESERVE
    before, now = raise_fd_limit(wanted)
    if now != before:
        events.log("fd_limit_raised", soft_before=before, soft=now)
    if now != resource.RLIM_INFINITY and now < wanted:
        # Past it accept() fails (EMFILE) before any 421 can be sent.
        events.warning("fd_limit_low", soft=now, wanted=wanted)


def raise_fd_limit(wanted: int) -> tuple[int, int]:
    """Raise the soft open-files limit to the hard limit when it is below
    ``wanted``: each connection is a file descriptor, and the usual soft
    limit of 1024 is below ``max_connections`` plus the spool's and the
    deliveries' own. Returns (soft before, soft now)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= wanted:
        return soft, soft
    target = wanted if hard == resource.RLIM_INFINITY else hard
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, target
