"""The comparison's rows and how they are printed (tests/bench/compare.py)."""

from __future__ import annotations

import os
import platform
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.bench.postfix_baseline import BenchResult

FIGURES = (
    "end_to_end_rate",
    "accept_rate",
    "latency_p50_ms",
    "latency_p99_ms",
    "peak_rss_mib",
    "peak_pss_mib",
    "cpu_seconds",
    "cpu_ms_per_message",
    "mta_core_pct",
    "machine_busy_pct",
    "machine_iowait_pct",
    "loadavg_1m",
)
#: The variant column's width ("plain 100k 1/conn").
_V = 18


@dataclass
class Row:
    """One workload's figures for one MTA (BenchResult plus latency)."""

    variant: str
    mta: str
    result: BenchResult
    latency_p50_ms: float | None = None
    latency_p99_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def figure(self, name: str) -> float | None:
        if name.startswith("latency"):
            return getattr(self, name)  # type: ignore[no-any-return]
        return getattr(self.result, name)  # type: ignore[no-any-return]


def _fmt(value: float | str | list[int] | None) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, list):  # a spread over workers, e.g. 1043:957
        return ":".join(str(v) for v in value)
    return "-" if value is None else f"{value:g}"


def format_table(rows: Sequence[Row]) -> str:
    """One line per variant and figure: each MTA, then each relay's ratio to each Postfix.

    Every MTA whose name starts with "postfix" is a reference (``postfix``,
    and ``postfix-reuse`` in the TLS variant); ``relay/pf`` is the ratio to
    ``postfix``, ``relay/pf-reuse`` to ``postfix-reuse``.
    """
    mtas = list(dict.fromkeys(["postfix", *(r.mta for r in rows)]))
    references = [m for m in mtas if m.startswith("postfix")]
    relays = [m for m in mtas if m not in references]
    pairs = [(m, ref) for m in relays for ref in references]
    head = f"{'variant':<{_V}}{'figure':<22}" + "".join(f"{m:>14}" for m in mtas)
    head += "".join(f"{m + '/pf' + ref[len('postfix') :]:>17}" for m, ref in pairs)
    lines = [head]
    for variant in dict.fromkeys(r.variant for r in rows):
        by_mta = {r.mta: r for r in rows if r.variant == variant}
        queue = variant.startswith("queue")
        names = (*FIGURES[:2], *FIGURES[4:]) if queue else FIGURES
        for name in names:
            values = {m: by_mta[m].figure(name) if m in by_mta else None for m in mtas}
            label = "drain_rate" if queue and name == "end_to_end_rate" else name
            cells = "".join(f"{_fmt(v):>14}" for v in values.values())
            line = f"{variant:<{_V}}{label:<22}{cells}"
            for m, ref in pairs:
                value, base = values[m], values[ref]
                line += f"{value / base:>17.2f}" if base and value is not None else f"{'-':>17}"
            lines.append(line)
        for key in sorted({k for r in by_mta.values() for k in r.extra}):
            for mta in mtas:
                value = by_mta[mta].extra.get(key) if mta in by_mta else None
                if isinstance(value, dict):
                    text = " ".join(f"{k}={_fmt(v)}" for k, v in value.items())
                    lines.append(f"{variant:<{_V}}{key:<22}{mta}: {text}")
            cells_of = [by_mta[m].extra.get(key) if m in by_mta else None for m in mtas]
            if not any(isinstance(v, dict) for v in cells_of):
                cells = "".join(f"{_fmt(v):>14}" for v in cells_of)
                lines.append(f"{variant:<{_V}}{key:<22}{cells}")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    load = os.getloadavg()
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    postfix = subprocess.run(
        ["postconf", "-d", "-h", "mail_version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "postfix": postfix,
        "loadavg_at_start": [round(x, 2) for x in load],
    }
