"""The one resolver: every DNS lookup (MX, A, AAAA, TXT) goes through dnspython here.

relay never calls getaddrinfo: names resolve through the ``[dns]``
nameservers (or the system resolver's nameservers from /etc/resolv.conf
when none are given), so /etc/hosts is not consulted. This is the only
module that imports dnspython.

Answers map to relay's failure classes (relay/errors.py):

- NXDOMAIN → :class:`~relay.errors.NoSuchDomain`;
- RFC 7505 null MX (the only MX record has the exchange ``.``) →
  :class:`~relay.errors.NullMx`;
- no A and no AAAA record → :class:`~relay.errors.NoRoute`;
- SERVFAIL, REFUSED, a timeout, no reachable nameserver, or any other
  resolver error → :class:`~relay.errors.DnsTemporary`.

Names are always looked up as absolute names (no search domains).
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import dns.asyncresolver
import dns.exception
import dns.name
import dns.nameserver
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.TXT
import dns.resolver
import dns.reversename

from relay.addresses import ip_literal
from relay.config import DnsConfig
from relay.configvalues import is_hostname
from relay.errors import DnsTemporary, NoRoute, NoSuchDomain, NullMx, RelayError

#: Seconds for one try at one nameserver; the whole lookup is bounded by
#: DnsConfig.timeout (dnspython retries within that lifetime).
_TRY_TIMEOUT = 2.0


class Resolver(Protocol):
    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """MX records as (preference, host); [] when the domain has no MX.

        Raises NoSuchDomain (NXDOMAIN), NullMx (RFC 7505), DnsTemporary.
        """
        ...

    async def addresses(self, name: str) -> list[str]:
        """IPv6 and IPv4 addresses of ``name``.

        Raises NoSuchDomain (NXDOMAIN), NoRoute (no A/AAAA), DnsTemporary.
        """
        ...


#: Answers kept at most (the least recently used go first).
CACHE_SIZE = 10_000


class DnsResolver:
    """The :class:`Resolver` relay uses: dnspython's async stub resolver.

    Built from ``[dns]``: the given (ip, port) nameservers, else the
    system resolver's (/etc/resolv.conf). If the system configuration
    cannot be read, every lookup raises DnsTemporary ("no nameservers")
    rather than the daemon failing to start.
    """

    def __init__(self, config: DnsConfig | None = None) -> None:
        config = config or DnsConfig()
        self.config = config
        if config.nameservers:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [
                dns.nameserver.Do53Nameserver(ip, port) for ip, port in config.nameservers
            ]
        else:
            try:
                resolver = dns.asyncresolver.Resolver(configure=True)
            except dns.exception.DNSException:
                resolver = dns.asyncresolver.Resolver(configure=False)
        resolver.lifetime = config.timeout
        resolver.timeout = min(_TRY_TIMEOUT, config.timeout)
        # Answers are kept for their TTL, as a caching resolver would: mail
        # to one domain looks up the same MX, addresses and MTA-STS TXT for
        # every message. Bounded; a reload builds a new resolver, and with it
        # an empty cache.
        resolver.cache = dns.resolver.LRUCache(CACHE_SIZE)
        self._resolver = resolver

    async def mx(self, domain: str) -> list[tuple[int, str]]:
        """MX records of ``domain`` as (preference, host), lowest preference first.

        Host names are lower case without the trailing dot; equal
        preferences are sorted by name (shuffling them is routing's job).
        [] when the domain exists without MX, and for an address literal
        (RFC 5321 section 5.1: deliver to the address itself).
        Raises NoSuchDomain, NullMx, DnsTemporary.
        """
        if ip_literal(domain) is not None:
            return []
        answer = await self._query(domain, "MX")
        if answer is None:
            return []
        records = sorted(
            (rdata.preference, _host(rdata.exchange))
            for rdata in answer
            if isinstance(rdata, dns.rdtypes.ANY.MX.MX)
        )
        # RFC 7505 section 3: "MX 0 ." says the domain accepts no mail. We
        # treat a lone "." at any preference so: no host could be tried anyway.
        if records and all(host == "" for _, host in records):
            raise NullMx(f"{domain}: null MX (RFC 7505), the domain accepts no mail")
        # A "." next to real MX records breaks RFC 7505; skip it, use the rest.
        return [(preference, host) for preference, host in records if host]

    async def addresses(self, name: str) -> list[str]:
        """IPv6 and IPv4 addresses of ``name``, AAAA and A queried concurrently.

        Order: interleaved, IPv6 first (RFC 8305 section 4), so a host
        with many addresses on a machine without working IPv6 still gets
        its IPv4 addresses tried within the per-attempt address cap. Each
        family keeps the order the DNS gave. An IP literal is returned
        as itself without a query. When one family fails temporarily and
        the other has addresses, those addresses are returned.
        Raises NoSuchDomain, NoRoute (neither record exists), DnsTemporary.
        """
        literal = ip_literal(name)
        if literal is not None:
            return [literal]
        results = await asyncio.gather(
            self._query(name, "AAAA"), self._query(name, "A"), return_exceptions=True
        )
        families: list[list[str]] = []
        failures: list[BaseException] = []
        for result in results:
            if isinstance(result, BaseException):
                failures.append(result)
            else:
                families.append([] if result is None else [rdata.to_text() for rdata in result])
        for failure in failures:
            if isinstance(failure, NoSuchDomain) or not isinstance(failure, DnsTemporary):
                raise failure
        found = _interleave(families)
        if found:
            return found
        if failures:
            raise failures[0]
        raise NoRoute(f"{name}: no AAAA and no A record")

    async def txt(self, name: str) -> list[str]:
        """The TXT records of ``name``, each one string (its character-strings
        joined, RFC 7208 section 3.3 style); [] when the name has none.

        Raises NoSuchDomain (NXDOMAIN), DnsTemporary.
        """
        answer = await self._query(name, "TXT")
        if answer is None:
            return []
        return [
            b"".join(rdata.strings).decode("utf-8", "replace")
            for rdata in answer
            if isinstance(rdata, dns.rdtypes.ANY.TXT.TXT)
        ]

    async def names(self, ip: str) -> list[str]:
        """The PTR names of an IP address (lower case, no trailing dot); [] when none.

        Raises NoSuchDomain (no reverse entry), DnsTemporary.
        """
        try:
            qname = dns.reversename.from_address(ip)
        except (dns.exception.DNSException, ValueError):
            return []
        try:
            answer = await self._resolver.resolve(qname, "PTR", search=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(f"{ip}: no reverse DNS entry") from None
        except dns.resolver.NoAnswer:
            return []
        except dns.exception.DNSException as exc:
            raise DnsTemporary(f"{ip} PTR: {exc}") from None
        return [_host(r.target) for r in answer if isinstance(r, dns.rdtypes.ANY.PTR.PTR)]

    async def _query(self, name: str, rdtype: str) -> dns.resolver.Answer | None:
        """One lookup; None when the name exists without records of the type."""
        try:
            qname = dns.name.from_text(name.strip().rstrip(".") + ".")
        except dns.exception.DNSException as exc:
            # A name that cannot be written in the DNS cannot exist.
            raise NoSuchDomain(f"{name!r} is not a valid domain name: {exc}") from None
        try:
            return await self._resolver.resolve(qname, rdtype, search=False)
        except dns.resolver.NXDOMAIN:
            raise NoSuchDomain(f"{name}: no such domain (NXDOMAIN)") from None
        except dns.resolver.NoAnswer:
            return None
        except dns.resolver.NoNameservers as exc:
            # Every nameserver answered SERVFAIL/REFUSED or could not be reached.
            raise DnsTemporary(f"{name} {rdtype}: no nameserver answered: {exc}") from None
        except dns.exception.Timeout:
            raise DnsTemporary(f"{name} {rdtype}: DNS timeout") from None
        except dns.exception.DNSException as exc:
            raise DnsTemporary(f"{name} {rdtype}: DNS error: {exc}") from None


def _host(name: dns.name.Name) -> str:
    """``mx1.example.com`` from ``mx1.example.com.``; ``""`` for the root."""
    return name.to_text(omit_final_dot=True).lower() if name != dns.name.root else ""


def _interleave(families: Iterable[list[str]]) -> list[str]:
    """[v6a, v4a, v6b, v4b, ...] without duplicates."""
    lists = list(families)
    out: list[str] = []
    for i in range(max((len(f) for f in lists), default=0)):
        for family in lists:
            if i < len(family) and family[i] not in out:
                out.append(family[i])
    return out


@runtime_checkable
class ReverseResolver(Protocol):
    """A :class:`Resolver` that also reads PTR records (:class:`DnsResolver`)."""

    async def names(self, ip: str) -> list[str]: ...

    async def addresses(self, name: str) -> list[str]: ...


#: PTR names tried per client (Postfix tries them all; a handful is plenty).
MAX_PTR_NAMES = 5


async def confirmed_name(resolver: ReverseResolver, ip: str, within: float) -> str | None:
    """The client's forward-confirmed reverse DNS name, or None.

    A PTR name of ``ip`` counts only when that name's A/AAAA records lead
    back to ``ip`` (anyone can publish any PTR for their own addresses),
    and only when it is a plain host name, since it is written into the
    Received header. Every failure -- no PTR, a lie, a DNS error, or
    ``within`` seconds passing -- is None, never an exception.
    """
    try:
        want = ipaddress.ip_address(ip)
    except ValueError:
        return None
    try:
        async with asyncio.timeout(within):
            for name in (await resolver.names(ip))[:MAX_PTR_NAMES]:
                # A PTR "name" like 192.0.2.1 would confirm itself (and
                # pretend to be an address): Postfix also calls it unknown.
                if not is_hostname(name) or ip_literal(name) is not None:
                    continue
                try:
                    found = await resolver.addresses(name)
                except RelayError:
                    continue
                if any(_same_address(want, text) for text in found):
                    return name
    except (TimeoutError, RelayError):
        return None
    return None


def _same_address(want: ipaddress.IPv4Address | ipaddress.IPv6Address, text: str) -> bool:
    try:
        return ipaddress.ip_address(text) == want
    except ValueError:
        return False
