"""MTA-STS (RFC 8461): a recipient domain's published TLS policy for its MX hosts.

For a route that looks up MX records (and the implicit route to a
domain's MX), :class:`MtaSts` answers "what policy does this domain
publish?": the ``_mta-sts.<domain>`` TXT record (through the one resolver,
relay/dns.py) names the policy's id; the policy itself comes from
``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (RFC 8461 section
3.3: certificate validated, no redirects, at most 64 KiB), its host also
resolved through the one resolver. Policies are cached in the spool
directory (``<spool>/mta-sts/<domain>.json``) for their ``max_age``, so a
restart keeps them; a policy is fetched again when the TXT id changes or
the cached copy expired.

What routing does with a policy (relay/routing.py ``plan``): ``enforce``
keeps only the MX hosts the policy's ``mx`` patterns match and gives them
relay.tls.STRICT_POLICY (TLS, a CA-signed certificate and a matching name);
``testing`` delivers as the route says and counts what would have failed;
``none`` (or no policy) changes nothing.

Failures never stop delivery by themselves (RFC 8461 section 5): a fetch
that fails with a cached unexpired policy uses the cache; with none, the
route's own TLS options apply. Each failure is counted in
``relay_tls_failures_total{reason}`` with the TLS-RPT result types of RFC
8460 section 4.3.2.1: ``sts-policy-fetch-error``, ``sts-policy-invalid``,
``sts-webpki-invalid``.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import aiohttp
import aiohttp.abc

from relay import events, tls
from relay.addresses import ip_literal
from relay.config import Config, Route
from relay.errors import NoSuchDomain, RelayError
from relay.metrics import Metrics

ENFORCE = "enforce"
TESTING = "testing"
NONE = "none"
MODES = (ENFORCE, TESTING, NONE)

#: RFC 8461 section 3.3: "senders SHOULD impose a limit on the maximum
#: size of the response body ... 64 kilobytes is suggested".
MAX_POLICY_BYTES = 64 * 1024
#: RFC 8461 section 3.2: max_age is at most 31557600 seconds (about a year).
MAX_AGE_LIMIT = 31_557_600
#: Seconds for the whole policy fetch (connect, TLS, body).
FETCH_TIMEOUT = 10.0
#: Policies kept in memory (the implicit route meets domains without bound).
MEMORY_POLICIES = 10_000


# RFC 8460 section 4.3.2.1 result types.
FETCH_ERROR = "sts-policy-fetch-error"
INVALID = "sts-policy-invalid"
WEBPKI_INVALID = "sts-webpki-invalid"


class PolicyInvalid(ValueError):
    """A TXT record or policy file that breaks RFC 8461 section 3."""


class _FetchFailed(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@runtime_checkable
class TxtResolver(Protocol):
    """The resolver MTA-STS needs: TXT and addresses (relay.dns.DnsResolver)."""

    async def txt(self, name: str) -> list[str]: ...

    async def addresses(self, name: str) -> list[str]: ...


@dataclass(frozen=True, slots=True)
class Policy:
    """One domain's MTA-STS policy as fetched (RFC 8461 section 3.2)."""

    domain: str
    #: The TXT record's id when this policy was fetched.
    id: str
    mode: str
    #: The ``mx`` patterns: host names, or "*." and a domain (one label).
    mx: tuple[str, ...]
    max_age: int
    #: Unix time of the fetch.
    fetched_at: float

    def expired(self, now: float) -> bool:
        return now >= self.fetched_at + self.max_age

    def allows(self, host: str) -> bool:
        """``host`` matches one of the ``mx`` patterns (RFC 8461 section 4.1)."""
        host = host.lower().rstrip(".")
        for pattern in self.mx:
            pattern = pattern.lower().rstrip(".")
            if pattern.startswith("*."):
                # The wildcard stands for exactly one left-most label.
                label, dot, rest = host.partition(".")
                if dot and label and rest == pattern[2:]:
                    return True
            elif host == pattern:
                return True
        return False


def txt_id(records: list[str]) -> str | None:
    """The policy id of a domain's ``_mta-sts`` TXT records; None when none is STS.

    RFC 8461 section 3.1: records not starting with ``v=STSv1`` are ignored;
    more than one STS record, or one without a valid id, is invalid.
    """
    sts = [r for r in records if r.startswith("v=STSv1")]
    if not sts:
        return None
    if len(sts) > 1:
        raise PolicyInvalid(f"{len(sts)} STSv1 TXT records; exactly one is allowed")
    fields = dict(
        (key.strip(), value.strip())
        for key, _, value in (part.partition("=") for part in sts[0].split(";"))
        if key.strip()
    )
    policy_id = fields.get("id", "")
    if not (1 <= len(policy_id) <= 32 and policy_id.isascii() and policy_id.isalnum()):
        raise PolicyInvalid(f"TXT record id {policy_id!r} is not 1-32 letters and digits")
    return policy_id


def parse(domain: str, text: str, policy_id: str, fetched_at: float) -> Policy:
    """The policy file ``text`` (RFC 8461 section 3.2); raises PolicyInvalid."""
    fields: dict[str, str] = {}
    mx: list[str] = []
    for line in text.replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        if not colon:
            raise PolicyInvalid(f"line {line!r} is not 'key: value'")
        key, value = key.strip(), value.strip()
        if key == "mx":
            mx.append(value)
        else:
            # Unknown keys are ignored (section 3.2); the first of a key counts.
            fields.setdefault(key, value)
    if fields.get("version") != "STSv1":
        raise PolicyInvalid(f"version {fields.get('version')!r} is not STSv1")
    mode = fields.get("mode", "")
    if mode not in MODES:
        raise PolicyInvalid(f"mode {mode!r} is not one of {', '.join(MODES)}")
    max_age_text = fields.get("max_age", "")
    if not max_age_text.isdigit() or int(max_age_text) > MAX_AGE_LIMIT:
        raise PolicyInvalid(f"max_age {max_age_text!r} is not 0-{MAX_AGE_LIMIT} seconds")
    if mode != NONE and not mx:
        raise PolicyInvalid(f"mode {mode} without any mx pattern")
    return Policy(domain, policy_id, mode, tuple(mx), int(max_age_text), fetched_at)


class PolicyCache:
    """Policies on disk, one JSON file per domain; written atomically."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def _file(self, domain: str) -> Path:
        # Domains are A-labels (letters, digits, '-', '.'): safe file names.
        return self.directory / f"{domain}.json"

    def load(self, domain: str) -> Policy | None:
        try:
            data: dict[str, Any] = json.loads(self._file(domain).read_text())
            data["mx"] = tuple(data["mx"])
            return Policy(**data)
        except (OSError, ValueError, TypeError, KeyError):
            return None

    def save(self, policy: Policy) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        final = self._file(policy.domain)
        temp = final.with_suffix(".tmp")
        with temp.open("w") as out:
            json.dump(asdict(policy), out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(temp, final)


class _Names(aiohttp.abc.AbstractResolver):
    """aiohttp's name lookups through relay's one resolver (never getaddrinfo)."""

    def __init__(self, resolver: TxtResolver) -> None:
        self._resolver = resolver

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        try:
            found = await self._resolver.addresses(host)
        except RelayError as exc:
            raise OSError(f"{host}: {exc.detail}") from None
        return [
            aiohttp.abc.ResolveResult(
                hostname=host,
                host=ip,
                port=port,
                family=socket.AF_INET6 if ":" in ip else socket.AF_INET,
                proto=0,
                flags=socket.AI_NUMERICHOST,
            )  # fmt: skip
            for ip in found
        ]

    async def close(self) -> None:
        return None


async def fetch_text(domain: str, resolver: TxtResolver, ca_file: Path | None) -> str:
    """The body of ``https://mta-sts.<domain>/.well-known/mta-sts.txt``.

    Raises _FetchFailed with the RFC 8460 result type as its reason.
    """
    url = f"https://mta-sts.{domain}/.well-known/mta-sts.txt"
    connector = aiohttp.TCPConnector(
        resolver=_Names(resolver), ssl=tls.web_context(ca_file), use_dns_cache=False
    )
    timeout = aiohttp.ClientTimeout(total=FETCH_TIMEOUT)
    try:
        async with (
            aiohttp.ClientSession(connector=connector, timeout=timeout) as session,
            # RFC 8461 section 3.3: redirects MUST NOT be followed.
            session.get(url, allow_redirects=False) as response,
        ):
            if response.status != 200:
                raise _FetchFailed(FETCH_ERROR, f"{url}: HTTP {response.status}")
            body = await response.content.read(MAX_POLICY_BYTES + 1)
    except aiohttp.ClientConnectorCertificateError as exc:
        raise _FetchFailed(WEBPKI_INVALID, f"{url}: {exc.certificate_error}") from None
    except aiohttp.ClientSSLError as exc:
        raise _FetchFailed(WEBPKI_INVALID, f"{url}: {exc}") from None
    except (aiohttp.ClientError, OSError, TimeoutError) as exc:
        raise _FetchFailed(FETCH_ERROR, f"{url}: {exc or type(exc).__name__}") from None
    if len(body) > MAX_POLICY_BYTES:
        raise _FetchFailed(INVALID, f"{url}: larger than {MAX_POLICY_BYTES} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise _FetchFailed(INVALID, f"{url}: not UTF-8 text") from None


class MtaSts:
    """The policies of recipient domains: looked up, fetched, cached, counted."""

    def __init__(
        self,
        config: Callable[[], Config],
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._memory: dict[str, Policy] = {}
        # One lookup per domain at a time: a burst to one domain fetches once.
        self._pending: dict[str, asyncio.Future[Policy | None]] = {}

    def _cache(self) -> PolicyCache:
        return PolicyCache(self._config().queue.path / "mta-sts")

    async def policy(self, route: Route, domain: str, resolver: object) -> Policy | None:
        """The policy to apply to mail for ``domain``; None: the route's own TLS options.

        Never raises: failures are counted, logged, and fall back to the
        cached policy while it is unexpired (RFC 8461 section 5).
        """
        if not isinstance(resolver, TxtResolver) or ip_literal(domain) is not None:
            return None
        pending = self._pending.get(domain)
        if pending is None:
            pending = asyncio.ensure_future(self._policy(route, domain, resolver))
            self._pending[domain] = pending
            pending.add_done_callback(lambda _: self._pending.pop(domain, None))
        # Shielded: one waiter cancelled (shutdown) does not cancel the others' lookup.
        return await asyncio.shield(pending)

    async def _policy(self, route: Route, domain: str, resolver: TxtResolver) -> Policy | None:
        now = self._clock()
        cached = self._memory.get(domain) or self._cache().load(domain)
        valid = cached if cached is not None and not cached.expired(now) else None
        try:
            policy_id = txt_id(await resolver.txt(f"_mta-sts.{domain}"))
        except NoSuchDomain:
            policy_id = None
        except PolicyInvalid as exc:
            self._failed(route, domain, INVALID, f"_mta-sts.{domain} TXT: {exc}", valid)
            return valid
        except RelayError as exc:
            # A DNS failure is no news about the policy: keep the cached one.
            events.log("mta_sts_dns_error", route=route.name, domain=domain, error=exc.detail)
            return valid
        if policy_id is None or (valid is not None and valid.id == policy_id):
            # No TXT record: a cached policy still applies until it expires
            # (section 5.1, so that an attacker removing the record gains nothing).
            return valid
        try:
            text = await fetch_text(domain, resolver, self._config().tls.ca_file)
            fetched = parse(domain, text, policy_id, self._clock())
        except _FetchFailed as exc:
            self._failed(route, domain, exc.reason, exc.detail, valid)
            return valid
        except PolicyInvalid as exc:
            self._failed(route, domain, INVALID, f"mta-sts.{domain} policy: {exc}", valid)
            return valid
        self._memory[domain] = fetched
        while len(self._memory) > MEMORY_POLICIES:
            # The oldest fetch goes first; the spool file still has it.
            del self._memory[next(iter(self._memory))]
        try:
            self._cache().save(fetched)
        except OSError as exc:
            events.warning("mta_sts_cache_error", domain=domain, error=str(exc))
        events.log(
            "mta_sts_policy", route=route.name, domain=domain, id=fetched.id,
            mode=fetched.mode, mx=",".join(fetched.mx), max_age=fetched.max_age,
        )  # fmt: skip
        return fetched

    def _failed(
        self, route: Route, domain: str, reason: str, detail: str, using: Policy | None
    ) -> None:
        # The host label is the policy's domain only for configured routes:
        # an implicit route's domains come from the internet (unbounded).
        label = "(mx)" if route.implicit else domain
        self._metrics.tls_failures.labels(route.name, label, reason).inc()
        events.warning(
            "mta_sts_policy_error", route=route.name, domain=domain, reason=reason,
            error=detail, using="cached policy" if using else "route TLS options",
        )  # fmt: skip

    @property
    def metrics(self) -> Metrics:
        return self._metrics


def would_fail(metrics: Metrics, route: Route, domain: str, host: str, reason: str) -> None:
    """A ``testing`` policy's host that ``enforce`` would refuse: count and log it."""
    metrics.mta_sts_testing.labels(route.name, reason).inc()
    events.warning("mta_sts_testing", route=route.name, domain=domain, host=host, would_fail=reason)
