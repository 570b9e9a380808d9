"""Which route a recipient takes, and the ordered candidate hosts of a route.

Rules: the first rule that matches a recipient (and, where the rule lists
senders, the envelope sender) names its route (:func:`route_for`);
bounces follow :func:`bounce_route`.

Candidate order (docs/routing.md), built by :func:`plan`:

- single host: that host;
- multiple hosts: the primaries in weighted random order
  (:func:`weighted_order`), then the secondaries the same way;
- ``mx_lookup``: each host of that order is a domain, replaced by its MX
  hosts in preference order with equal preferences shuffled (RFC 5321
  section 5.1), on the port of the route's host entry; a domain without
  MX records is its own candidate (implicit MX, RFC 5321 section 5.1).
  MX lookups of all the route's domains run concurrently. A host (and
  port) that appears twice is kept only where it appears first.

Planned for delivery (with a :class:`~relay.health.Health`), every
candidate's addresses are looked up here too, concurrently, and the hosts
held down are left out before the weighted pick (:func:`plan`), so delivery
walks one list of candidates with their addresses. Without health (``relay
test-tls``) only MX lookups happen; addresses come from :func:`addresses_for`.

DNS failures. A name from the configuration that does not resolve (NXDOMAIN,
null MX, no address record) is a configuration problem: it becomes
:class:`~relay.errors.RouteMisconfigured`, a temporary failure naming the
route and host, so a typo defers mail instead of bouncing it. Only for an
implicit route (``config.direct_route``: a bounce to a sender's domain, or a
trusted client's recipient that matched no rule) are NXDOMAIN
(NoSuchDomain), null MX (NullMx) and no address (NoRoute) permanent.
SERVFAIL and timeouts are always :class:`~relay.errors.DnsTemporary`.

MTA-STS (RFC 8461, relay/mtasts.py). Given an :class:`~relay.mtasts.MtaSts`,
:func:`plan` looks up each domain's policy alongside its MX records for a
route with ``mx_lookup`` and ``mta_sts`` (routes to fixed hosts have no MX
to check). ``enforce``: only the MX hosts the policy's ``mx`` patterns
match are candidates, each with the strict TlsPolicy (``Candidate.tls``:
TLS, CA-signed, name checked, whatever the route's options), and a domain
left without one is a temporary failure; ``testing``: every MX host stays,
the ones ``enforce`` would drop are counted and logged.

Partial failure. :func:`plan` never raises for DNS: it returns a
:class:`Plan` with the candidates of every domain that resolved and one
error per domain that did not (``dns_failures``, in route order), so the
caller can log and count a misconfigured route host even when another host
carries the mail (``relay_route_dns_errors_total{route, host}`` counts
RouteMisconfigured). When a plan has no candidates, ``Plan.failure`` is the
error to record for every recipient (temporary if any failure was).
:func:`candidates` is the short form: the candidate list, raising
``Plan.failure`` when there is none.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from relay import config as cfg
from relay import tls
from relay.addresses import domain_key, ip_literal
from relay.config import Config, Host, Route, TlsPolicy
from relay.dns import Resolver
from relay.errors import (
    HostUnreachable,
    NoRoute,
    NoSuchDomain,
    PermanentFailure,
    RelayError,
    Reply,
    RouteMisconfigured,
    TemporaryFailure,
)
from relay.health import Health, HostKey
from relay.mtasts import ENFORCE, TESTING, MtaSts, Policy, would_fail

#: The reply of mail deferred because every host of its route is held down.
HELD_DOWN = Reply(451, (4, 4, 1), "Next hop unreachable: every host held down after failing")

PRIMARY = "primary"
SECONDARY = "secondary"


@dataclass(frozen=True, slots=True)
class Candidate:
    """One next hop to try, in order."""

    #: The name to connect to and to verify the certificate against
    #: (the route's host, or the MX host's name), or an IP literal.
    host: str
    port: int
    #: The domain whose MX gave this host, when the route does MX lookup
    #: (also for an implicit MX, where it equals ``host``).
    via_mx: str | None = None
    #: "primary" or "secondary".
    table: str = "primary"
    #: The host as written in the route (metric label: config values only).
    configured: str = ""
    #: The route's name (for log lines and RouteMisconfigured details).
    route: str = ""
    #: From an implicit route (config.direct_route): permanent DNS answers
    #: (NXDOMAIN, no address) are final instead of a configuration problem.
    implicit: bool = False
    #: The addresses to try, in order, none of them held down (planned with
    #: health; empty otherwise, or when the lookup failed: see ``error``).
    addresses: tuple[str, ...] = ()
    #: Why the host's addresses could not be looked up (RouteMisconfigured,
    #: DnsTemporary, HostUnreachable for a dangling MX, or for an implicit
    #: route NoSuchDomain / NoRoute).
    error: RelayError | None = None
    #: The TLS policy for this host when not the route's: an MTA-STS
    #: ``enforce`` policy's (relay.tls.STRICT_POLICY). ``Hop.of`` applies it.
    tls: TlsPolicy | None = None
    #: The mode of the via_mx domain's MTA-STS policy ("enforce",
    #: "testing"), "" when none applies.
    sts: str = ""

    @property
    def sts_domain(self) -> str:
        """The domain whose MTA-STS ``enforce`` policy holds this host ("" if none)."""
        return (self.via_mx or self.host) if self.sts == ENFORCE else ""


@dataclass(frozen=True, slots=True)
class DnsFailure:
    """A route domain whose MX lookup failed: no candidates came from it."""

    #: The host (domain) as written in the route: the metric label
    #: (``relay_route_dns_errors_total{route, host}`` for RouteMisconfigured).
    configured: str
    #: "primary" or "secondary".
    table: str
    #: RouteMisconfigured / DnsTemporary (config routes), or NoSuchDomain /
    #: NullMx / DnsTemporary (implicit routes).
    error: RelayError


@dataclass(frozen=True, slots=True)
class Plan:
    """The candidates of one attempt, and the DNS failures met building them."""

    candidates: tuple[Candidate, ...]
    #: One entry per route domain whose MX lookup failed, in route order.
    dns_failures: tuple[DnsFailure, ...] = ()
    #: Route hosts skipped because every address of them is held down.
    held_down: tuple[str, ...] = ()
    #: The attempt's token for the probes it claimed (``Health.release``).
    token: object = field(default=None, compare=False)
    #: With no candidate: the held-down addresses another attempt is probing
    #: now (``Health.probe_ended``), whose outcome may bring a host back.
    probing: tuple[HostKey, ...] = ()

    @property
    def sts_enforced(self) -> bool:
        """Some candidate is held to an MTA-STS ``enforce`` policy."""
        return any(c.sts == ENFORCE for c in self.candidates)

    @property
    def failure(self) -> RelayError | None:
        """The error for every recipient when there is no candidate, else None.

        Temporary wins over permanent: if any domain might still answer
        later, or a host is only held down, the mail is deferred rather
        than bounced.
        """
        if self.candidates or not (self.dns_failures or self.held_down):
            return None
        for failure in self.dns_failures:
            if isinstance(failure.error, TemporaryFailure):
                return failure.error
        if self.held_down:
            hosts = ", ".join(self.held_down)
            # The reply is what `relay queue list` and a later DSN show.
            return HostUnreachable(f"every host is held down after failing: {hosts}", HELD_DOWN)
        return self.dns_failures[0].error


# --- rules ------------------------------------------------------------------


def _domain(address: str) -> str:
    # A-labels: what DNS is asked, and how [server] domains are kept.
    return domain_key(address.rpartition("@")[2])


def route_for(config: Config, address: str, client_trusted: bool, sender: str) -> Route | None:
    """The route of the first rule matching recipient ``address`` of mail from
    ``sender`` ("" for the null sender; first match wins).

    When no rule matches and the client is in relay_networks
    (``client_trusted``), the implicit route to the address's domain MX
    (``config.direct_route``); otherwise None (no route: reject at RCPT).
    Never the direct route for a domain in ``[server] domains``: its MX is
    usually this relay, and the mail would loop back to itself.
    """
    route = config.route_for(address, sender)
    if route is not None:
        return route
    domain = _domain(address) if "@" in address else ""
    if client_trusted and domain and domain not in config.server.domains:
        return cfg.direct_route(domain)
    return None


def bounce_route(config: Config, sender: str) -> Route:
    """The route of a bounce (DSN) to ``sender`` (README.md "Bounces").

    The ``[bounces] route`` when set, else the route of the first rule that
    matches the sender's address as a recipient of mail from ``<>``, else
    the sender domain's MX with opportunistic TLS (``config.direct_route``, an implicit route).
    Raises ValueError for a sender without a domain (``<>`` is never
    bounced; the caller checks that first).
    """
    if config.bounces.route:
        route = config.route(config.bounces.route)
        if route is not None:
            return route
    # A DSN's own envelope sender is <>: only rules whose senders allow
    # any sender ("*" or none given) route it.
    route = config.route_for(sender, "")
    if route is not None:
        return route
    domain = _domain(sender) if "@" in sender else ""
    if not domain:
        raise ValueError(f"cannot bounce to {sender!r}: no domain")
    return cfg.direct_route(domain)


# --- candidate order --------------------------------------------------------


def weighted_order(hosts: Sequence[Host], rng: random.Random) -> list[Host]:
    """``hosts`` in weighted random order, without replacement.

    The first pick follows the loads (a host with load 70 of 100 comes
    first 70% of the time); each next pick follows the loads of the hosts
    still left. Hosts with a non-positive load (never valid in a loaded
    config) go last, in their given order.
    """
    left = [host for host in hosts if host.load > 0]
    ordered: list[Host] = []
    while left:
        # Integer loads: randrange keeps the shares exact, no float drift.
        point = rng.randrange(sum(host.load for host in left))
        for i, host in enumerate(left):
            point -= host.load
            if point < 0:
                ordered.append(left.pop(i))
                break
    return ordered + [host for host in hosts if host.load <= 0]


def _config_error(route: Route, host: str, error: RelayError) -> RelayError:
    """Map a permanent DNS answer about a route's own host to the route's policy."""
    if route.implicit or not isinstance(error, PermanentFailure):
        return error
    return RouteMisconfigured(
        f"route {route.name!r}: host {host!r} is misconfigured in DNS: {error.detail}"
    )


def shuffle_mx(records: Sequence[tuple[int, str]], rng: random.Random) -> list[str]:
    """MX hosts in preference order, equal preferences shuffled (RFC 5321 section 5.1)."""
    by_preference: dict[int, list[str]] = {}
    for preference, host in records:
        by_preference.setdefault(preference, []).append(host)
    hosts: list[str] = []
    for preference in sorted(by_preference):
        # Sorted first, so a seeded rng gives the same order whatever the
        # order of the DNS answer.
        group = sorted(by_preference[preference])
        rng.shuffle(group)
        hosts.extend(group)
    return hosts


async def plan(
    route: Route,
    resolver: Resolver,
    rng: random.Random,
    health: Health | None = None,
    sts: MtaSts | None = None,
) -> Plan:
    """The candidates of one attempt over ``route`` and any DNS failures met.

    Never raises for DNS (see the module docstring). Draws from ``rng``
    in a fixed order (weighted orders first, then MX shuffles in route
    order) so a seeded rng gives a reproducible plan.

    With ``health`` (delivery's call), every candidate also carries its
    addresses, looked up concurrently here, less those held down
    (:mod:`relay.health`); a candidate left without one is skipped, and so
    is a route host left without a candidate, so the weighted pick is made
    over the live hosts only (their loads renormalised). An address whose
    hold-down is over is claimed for this attempt as the host's one probe
    (``Plan.token``; release it with ``health.release(plan.token)``).

    With ``sts``, MTA-STS policies apply (see the module docstring).
    """
    entries = [(PRIMARY, host) for host in route.primary]
    entries += [(SECONDARY, host) for host in route.secondary]
    policies: dict[int, Policy] = {}
    if route.mx_lookup:
        # Resolve concurrently, but draw the MX shuffles in route order afterwards.
        mx_lookups = [_mx_records(h, resolver) for _, h in entries]
        use_sts = sts is not None and route.mta_sts
        answers, found_policies = await asyncio.gather(
            asyncio.gather(*mx_lookups),
            _policies(route, [h for _, h in entries], resolver, sts if use_sts else None),
        )
        policies = found_policies
        names = [
            _sts_names(route, host, _mx_names(route, host, answer), policies.get(id(host)), sts)
            for (_, host), answer in zip(entries, answers, strict=True)
        ]
    else:
        names = [[(0, host.name)] for _, host in entries]
    failures = [
        DnsFailure(host.name, table, found)
        for (table, host), found in zip(entries, names, strict=True)
        if isinstance(found, RelayError)
    ]
    resolved: dict[tuple[str, str], tuple[str, ...] | RelayError] = {}
    if health is not None:
        lookups = {
            (host.name, name): _candidate(route, table, host, name, policies.get(id(host)))
            for (table, host), found in zip(entries, names, strict=True)
            if not isinstance(found, RelayError)
            for _, name in found
        }
        for name_key, cand in lookups.items():
            # IP literals need no lookup (and no task): the common case.
            literal = ip_literal(cand.host)
            if literal is not None:
                resolved[name_key] = (literal,)
        pending = {k: c for k, c in lookups.items() if k not in resolved}
        if pending:
            looked_up = await asyncio.gather(*(_lookup(c, resolver) for c in pending.values()))
            resolved.update(zip(pending, looked_up, strict=True))
    # From here on nothing awaits: health is read and claimed in one step.
    token = object() if health is not None else None
    live: dict[str, list[Host]] = {PRIMARY: [], SECONDARY: []}
    for (table, host), found in zip(entries, names, strict=True):
        if isinstance(found, RelayError):
            continue
        if health is None or _alive(host, found, resolved, health):
            live[table].append(host)
    found_by_host = {id(host): found for (_, host), found in zip(entries, names, strict=True)}
    out: list[Candidate] = []
    held: list[str] = []
    for table in (PRIMARY, SECONDARY):
        for host in weighted_order(live[table], rng):
            records = found_by_host[id(host)]
            assert not isinstance(records, RelayError)
            ordered = shuffle_mx(records, rng) if route.mx_lookup else [host.name]
            for name in ordered:
                candidate: Candidate | None = _candidate(
                    route, table, host, name, policies.get(id(host))
                )
                if health is not None and candidate is not None:
                    answer = resolved[(host.name, name)]
                    candidate = _with_addresses(candidate, answer, health, token)
                if candidate is not None:
                    out.append(candidate)
    if health is not None:
        held = [
            host.name
            for (table, host), found in zip(entries, names, strict=True)
            if not isinstance(found, RelayError) and host not in live[table]
        ]
        for (_, host), found in zip(entries, names, strict=True):
            if not route.implicit and not isinstance(found, RelayError):
                health.seen(route.name, host.name, host.port, _host_keys(host, found, resolved))
    probing: tuple[HostKey, ...] = ()
    if health is not None and not out:
        probing = tuple(
            key
            for (_, host), found in zip(entries, names, strict=True)
            if not isinstance(found, RelayError)
            for key in _host_keys(host, found, resolved)
            if health.probing(key)
        )
    return Plan(_unique(out), tuple(failures), tuple(held), token, probing)


def _candidate(
    route: Route, table: str, host: Host, name: str, policy: Policy | None = None
) -> Candidate:
    via = host.name if route.mx_lookup else None
    if policy is None or policy.mode not in (ENFORCE, TESTING):
        return Candidate(name, host.port, via, table, host.name, route.name, route.implicit)
    strict = tls.STRICT_POLICY if policy.mode == ENFORCE else None
    return Candidate(
        name, host.port, via, table, host.name, route.name, route.implicit,
        tls=strict, sts=policy.mode,
    )  # fmt: skip


async def _policies(
    route: Route, hosts: Sequence[Host], resolver: Resolver, sts: MtaSts | None
) -> dict[int, Policy]:
    """The MTA-STS policy of each route domain that has one, by ``id(host)``."""
    if sts is None:
        return {}
    found = await asyncio.gather(*(sts.policy(route, host.name, resolver) for host in hosts))
    return {id(h): p for h, p in zip(hosts, found, strict=True) if p is not None}


def _sts_names(
    route: Route,
    host: Host,
    names: list[tuple[int, str]] | RelayError,
    policy: Policy | None,
    sts: MtaSts | None,
) -> list[tuple[int, str]] | RelayError:
    """The MX hosts a domain's MTA-STS policy lets through (RFC 8461 section 4.1)."""
    if policy is None or isinstance(names, RelayError):
        return names
    if policy.mode == TESTING and sts is not None:
        for _, name in names:
            if not policy.allows(name):
                would_fail(sts.metrics, route, host.name, name, "mx-mismatch")
        return names
    if policy.mode != ENFORCE:
        return names
    kept = [(pref, name) for pref, name in names if policy.allows(name)]
    if kept:
        return kept
    listed = ", ".join(name for _, name in names)
    # RFC 8461 section 5: never a permanent failure for a policy mismatch;
    # the next attempt looks for an updated policy.
    return TemporaryFailure(
        f"MTA-STS policy of {host.name} (id {policy.id}, enforce) matches none of "
        f"its MX hosts ({listed}); mx patterns: {', '.join(policy.mx)}",
        Reply(451, (4, 7, 5), "No MX host matches the domain's MTA-STS policy"),
    )


async def _lookup(candidate: Candidate, resolver: Resolver) -> tuple[str, ...] | RelayError:
    try:
        return tuple(await addresses_for(candidate, resolver))
    except RelayError as exc:
        return exc


def _host_keys(
    host: Host,
    found: list[tuple[int, str]],
    resolved: dict[tuple[str, str], tuple[str, ...] | RelayError],
) -> list[HostKey]:
    """The (address, port) health keys of a route host's names that resolved."""
    return [
        (address, host.port)
        for _, name in found
        if not isinstance(answer := resolved[(host.name, name)], RelayError)
        for address in answer
    ]


def _alive(
    host: Host,
    found: list[tuple[int, str]],
    resolved: dict[tuple[str, str], tuple[str, ...] | RelayError],
    health: Health,
) -> bool:
    """A route host is live when one of its names failed to resolve (tried,
    to report it) or has an address that is up or due a probe."""
    for _, name in found:
        answer = resolved[(host.name, name)]
        if isinstance(answer, RelayError):
            return True
        if any(health.available((address, host.port)) for address in answer):
            return True
    return False


def _with_addresses(
    candidate: Candidate,
    answer: tuple[str, ...] | RelayError,
    health: Health,
    token: object,
) -> Candidate | None:
    """``candidate`` with the addresses this attempt may use; None when it has none."""
    if isinstance(answer, RelayError):
        return replace(candidate, error=answer)
    usable = tuple(a for a in answer if health.claim((a, candidate.port), token))
    if not usable:
        return None
    c = candidate  # dataclasses.replace() costs several times this, per message
    return Candidate(
        c.host, c.port, c.via_mx, c.table, c.configured, c.route, c.implicit, usable,
        None, c.tls, c.sts,
    )  # fmt: skip


async def _mx_records(host: Host, resolver: Resolver) -> list[tuple[int, str]] | RelayError:
    if ip_literal(host.name) is not None:
        return []
    try:
        return await resolver.mx(host.name)
    except RelayError as exc:
        return exc


def _mx_names(
    route: Route, host: Host, answer: list[tuple[int, str]] | RelayError
) -> list[tuple[int, str]] | RelayError:
    if isinstance(answer, RelayError):
        return _config_error(route, host.name, answer)
    if not answer:
        # No MX: the domain itself is the mail host (implicit MX, RFC 5321 5.1).
        return [(0, ip_literal(host.name) or host.name)]
    return answer


def _unique(candidates: Sequence[Candidate]) -> tuple[Candidate, ...]:
    """Each (host, port) once, where it first appears."""
    seen: set[tuple[str, int]] = set()
    out: list[Candidate] = []
    for candidate in candidates:
        key = (candidate.host, candidate.port)
        if key not in seen:
            seen.add(key)
            out.append(candidate)
    return tuple(out)


async def candidates(route: Route, resolver: Resolver, rng: random.Random) -> list[Candidate]:
    """The candidate hosts of ``route`` in the order to try them.

    The short form of :func:`plan`: partial DNS failures are dropped;
    when there is no candidate at all, raises ``Plan.failure``
    (RouteMisconfigured, DnsTemporary, or for an implicit route
    NoSuchDomain / NullMx).
    """
    result = await plan(route, resolver, rng)
    if result.failure is not None:
        raise result.failure
    return list(result.candidates)


async def addresses_for(candidate: Candidate, resolver: Resolver) -> list[str]:
    """The IP addresses to try for ``candidate``: IPv6 and IPv4 interleaved.

    Use this rather than ``resolver.addresses`` in delivery: it applies
    the route's DNS policy. For a configured route, NXDOMAIN or no
    address record for the host becomes RouteMisconfigured (temporary,
    naming route and host); for an implicit route they stay NoSuchDomain
    / NoRoute (permanent). Timeouts and SERVFAIL raise DnsTemporary.
    """
    literal = ip_literal(candidate.host)
    if literal is not None:
        return [literal]
    try:
        return await resolver.addresses(candidate.host)
    except (NoSuchDomain, NoRoute) as exc:
        if candidate.implicit:
            if candidate.via_mx in (None, candidate.host):
                # The recipient's (or a bounce sender's) own domain: permanent.
                raise
            # Someone else's MX target that does not resolve: the other MX
            # hosts may still work, so this host is merely unreachable.
            raise HostUnreachable(
                f"MX host {candidate.host!r} of {candidate.via_mx}: {exc.detail}"
            ) from None
        via = f" (MX of {candidate.via_mx})" if candidate.via_mx else ""
        raise RouteMisconfigured(
            f"route {candidate.route!r}: host {candidate.host!r}{via} "
            f"does not resolve: {exc.detail}"
        ) from None
