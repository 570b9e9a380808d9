"""The one resolver: every DNS lookup (MX, A, AAAA) goes through dnspython here.

STUB: interface only; implemented under issue #4.
"""

from __future__ import annotations

from typing import Protocol


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
