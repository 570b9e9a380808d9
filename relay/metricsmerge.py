"""One metrics view and one status report from several worker processes (relay.workers).

Each worker exposes its own registry (relay.metrics); the supervisor
combines their texts series by series (same name, same labels):

- counters and histograms (buckets, counts, sums) are summed: the relay's
  totals. A worker started again after a crash starts from zero, so the
  sum drops by what the dead worker had counted; Prometheus's ``rate()``
  and ``increase()`` take a drop as a counter reset;
- gauges are summed (messages queued, sessions open, memory held, the
  processes' CPU and resident memory), except those in :data:`LOWEST`,
  where the lowest value is the one to act on (a host is up only if every
  worker sees it up; the earliest certificate expiry; the oldest process
  start), and those in :data:`HIGHEST`;
- ``*_created`` series are left out (optional in the format, and they
  would name one worker's start);
- a family the supervisor exposes itself (``own``: config reloads, which
  it counts once for all workers) replaces the workers' copies.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

#: Gauges combined by their lowest value.
LOWEST = frozenset(
    {
        "relay_host_up",
        "relay_tls_certificate_expiry_timestamp_seconds",
        "process_start_time_seconds",
        "process_max_fds",
    }
)
#: Gauges combined by their highest value (an info metric's constant 1).
HIGHEST = frozenset({"python_info"})

_Key = tuple[str, tuple[tuple[str, str], ...]]


def _combiner(family: Metric) -> Callable[[float, float], float]:
    if family.name in LOWEST:
        return min
    if family.name in HIGHEST:
        return max
    return lambda a, b: a + b


class _Families:
    """Collector of the combined families, in the order first seen."""

    def __init__(self) -> None:
        self.families: dict[str, Metric] = {}
        self.values: dict[str, dict[_Key, float]] = {}

    def add(self, family: Metric) -> None:
        if family.name not in self.families:
            self.families[family.name] = family
            self.values[family.name] = {}
        combine = _combiner(family)
        values = self.values[family.name]
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            values[key] = combine(values[key], sample.value) if key in values else sample.value

    def collect(self) -> Iterable[Metric]:
        for name, seen in self.families.items():
            family = Metric(name, seen.documentation, seen.type)
            for (sample, labels), value in self.values[name].items():
                family.add_sample(sample, dict(labels), value)
            yield family


def merge_expositions(texts: Sequence[str], own: str = "") -> bytes:
    """The workers' exposition ``texts`` as one, with the supervisor's ``own`` families."""
    own_families = list(text_string_to_metric_families(own))
    owned = {family.name for family in own_families}
    parsed = [list(text_string_to_metric_families(text)) for text in texts]
    names = {family.name for families in parsed for family in families} | owned
    combined = _Families()

    def created(family: Metric) -> bool:
        return family.name.endswith("_created") and family.name[: -len("_created")] in names

    for family in own_families:
        if not created(family):
            combined.add(family)
    for families in parsed:
        for family in families:
            if family.name not in owned and not created(family):
                combined.add(family)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(combined)
    return generate_latest(registry)


def merge_status(reports: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """The workers' ``/status`` reports (None: no answer) as one: ``queue``
    summed; per route, each host as the worker that sees it worst does (a
    host held down by any worker shows ``down``, with ``down_in_workers``)."""
    answered = [(index, r) for index, r in enumerate(reports) if r is not None]
    merged: dict[str, Any] = {"queue": sum(int(r.get("queue", 0)) for _, r in answered)}
    routes: list[dict[str, Any]] = []
    by_host: dict[tuple[str, str, Any], dict[str, Any]] = {}
    for index, report in answered:
        for route in report.get("routes", []):
            target = next((r for r in routes if r["route"] == route["route"]), None)
            if target is None:
                target = {"route": route["route"], "hosts": []}
                routes.append(target)
            for host in route.get("hosts", []):
                key = (route["route"], str(host.get("host")), host.get("port"))
                seen = by_host.get(key)
                if seen is None:
                    seen = dict(host, down_in_workers=[])
                    by_host[key] = seen
                    target["hosts"].append(seen)
                if host.get("state") == "down":
                    if seen.get("state") != "down":
                        seen.update(host)
                    seen["down_in_workers"].append(index)
    merged["routes"] = routes
    return merged
