"""Latency from accept to delivery, as each MTA records it (tests/bench/compare.py)."""

from __future__ import annotations

import re
import statistics
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path


def quantiles_ms(values: Sequence[float]) -> tuple[float | None, float | None]:
    if len(values) < 2:
        return (values[0] * 1000, values[0] * 1000) if values else (None, None)
    q = statistics.quantiles(values, n=100, method="inclusive")
    return round(q[49] * 1000, 1), round(q[98] * 1000, 1)


# -- latency sources -----------------------------------------------------------

_RELAY_EVENT = re.compile(r"^ts=(\S+)Z level=\w+ event=(accepted|delivered) id=(\S+)")


def relay_latencies(log: Path, offset: int) -> list[float]:
    """Seconds from each message's ``event=accepted`` to its ``event=delivered`` line."""
    accepted: dict[str, float] = {}
    delays: list[float] = []
    with log.open("rb") as fh:
        fh.seek(offset)
        for raw in fh:
            match = _RELAY_EVENT.match(raw.decode(errors="replace"))
            if not match:
                continue
            stamp = datetime.fromisoformat(match.group(1) + "+00:00").timestamp()
            if match.group(2) == "accepted":
                accepted[match.group(3)] = stamp
            elif match.group(3) in accepted:
                delays.append(stamp - accepted.pop(match.group(3)))
    return delays


_POSTFIX_SENT = re.compile(r" delay=([\d.]+), .*status=sent ")


def postfix_latencies(log: Path, offset: int) -> list[float]:
    """The ``delay=`` of every ``status=sent`` line after ``offset``."""
    with log.open("rb") as fh:
        fh.seek(offset)
        text = fh.read().decode(errors="replace")
    return [float(m.group(1)) for m in _POSTFIX_SENT.finditer(text)]
