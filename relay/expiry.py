"""Next hops' certificate expiry: the gauge and the daily warning (RFC 5280 notAfter).

Every verified handshake (a route with ``require_ca_signed``) reports the
peer certificate's notAfter here. ``relay_tls_certificate_expiry_timestamp_seconds
{route, host}`` carries it, under the metric's host label (the configured
name: MX hosts under their route's domain, as every metric does), so an
alert is ``relay_tls_certificate_expiry_timestamp_seconds - time() < 14*86400``.
Behind one label the earliest certificate counts, so one MX host with an
old certificate is not hidden by its peers; a host not seen in a week is
forgotten (it left the MX set). A certificate within ``[tls] expiry_warning``
is logged (``event=tls_certificate_expiring``) once a day per host.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

from relay import events
from relay.advice import expiry_warning
from relay.config import DIRECT_ROUTE, Config
from relay.metrics import Metrics

#: How often one host's expiring certificate is logged.
WARN_EVERY = 86400.0
#: A host behind a label not handshaken with for this long stops counting.
FORGET_AFTER = 7 * 86400.0


def expires_soon(not_after: float, window: float, now: float | None = None) -> bool:
    """True when a certificate ending at ``not_after`` ends within ``window`` seconds (or has)."""
    return not_after - (time.time() if now is None else now) < window


class ExpiryWatch:
    """Records next hops' certificate expiry; one per Deliverer (per daemon)."""

    def __init__(
        self, metrics: Metrics, config: Callable[[], Config], clock: Callable[[], float] = time.time
    ) -> None:
        self._gauge = metrics.tls_certificate_expiry
        self._config = config
        self._clock = clock
        #: (route, host label) -> host name -> (not_after, last seen).
        self._seen: dict[tuple[str, str], dict[str, tuple[float, float]]] = {}
        #: (route, host name) -> when it was last warned about.
        self._warned: dict[tuple[str, str], float] = {}

    def record(self, route: str, label: str, host: str, not_after: float) -> None:
        """``host`` (behind metric label ``label``) presented a verified certificate."""
        now = self._clock()
        cfg = self._config()
        self._forget_routes({DIRECT_ROUTE, *(r.name for r in cfg.routes)})
        hosts = self._seen.setdefault((route, label), {})
        hosts[host] = (not_after, now)
        for name, (_, seen) in list(hosts.items()):
            if now - seen > FORGET_AFTER:
                del hosts[name]
        self._gauge.labels(route, label).set(min(end for end, _ in hosts.values()))
        window = cfg.tls.expiry_warning
        if not expires_soon(not_after, window, now):
            return
        if now - self._warned.get((route, host), -WARN_EVERY) < WARN_EVERY:
            return
        self._warned = {k: t for k, t in self._warned.items() if now - t < WARN_EVERY}
        self._warned[(route, host)] = now
        events.warning(
            "tls_certificate_expiring", route=route, host=host,
            not_after=datetime.fromtimestamp(not_after, UTC).isoformat(timespec="seconds"),
            days_left=int((not_after - now) // 86400),
            advice=expiry_warning(host, not_after, window, now),
        )  # fmt: skip

    def _forget_routes(self, names: set[str]) -> None:
        """Drop the series of routes a reload removed (their alerts would never clear)."""
        for key in [k for k in self._seen if k[0] not in names]:
            del self._seen[key]
            self._gauge.remove(*key)
