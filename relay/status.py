"""``relay status``: ask the running daemon for its state and print it.

The daemon answers ``GET /status`` on its metrics listener (``[metrics]
listen``, relay.metrics) with JSON: version, uptime, config hash, queue
size, and per route each host's health (relay.health). This module is the
client side: fetch it, and turn it into lines for a human.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from relay import metrics
from relay.config import Listen

#: Seconds to wait for the daemon's answer.
TIMEOUT = 5.0


class NoDaemon(Exception):
    """No relay answered at the metrics listener."""


def _client_host(listen: Listen) -> str:
    """Where to connect for ``listen``: a wildcard bind is reached on loopback."""
    if listen.host in ("", "0.0.0.0"):  # noqa: S104 - a bind address, not a bind
        return "127.0.0.1"
    if listen.host == "::":
        return "::1"
    return listen.host


async def _get(host: str, port: int, limit: float) -> tuple[int, bytes]:
    async with asyncio.timeout(limit):
        return await metrics.get(host, port, "/status")


def fetch(listen: Listen, timeout: float = TIMEOUT) -> dict[str, Any]:
    """The running daemon's ``/status`` report; raises :class:`NoDaemon`."""
    where = f"http://{listen}/status"
    try:
        code, body = asyncio.run(_get(_client_host(listen), listen.port, timeout))
    except (OSError, TimeoutError) as exc:
        raise NoDaemon(f"no running relay answered at {where}: {exc}") from None
    if code != 200:
        raise NoDaemon(f"{where} answered {code or 'garbage'}: not a relay daemon (or too old)")
    try:
        report: dict[str, Any] = json.loads(body)
    except ValueError:
        raise NoDaemon(f"{where} answered something that is not JSON") from None
    return report


def _stamp(epoch: float | None) -> str:
    if epoch is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(epoch))


def _span(seconds: float) -> str:
    """``95`` -> ``1m35s``: the two largest units."""
    seconds = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        if seconds >= size or (unit == "s" and not parts):
            parts.append(f"{seconds // size}{unit}")
            seconds %= size
    return "".join(parts[:2])


def lines(report: dict[str, Any]) -> list[str]:
    """The report as text: a header, then one block per route."""
    now = float(report.get("now", time.time()))
    out = [
        f"relay {report.get('version', '?')} pid {report.get('pid', '?')}, "
        f"up {_span(float(report.get('uptime', 0)))} (since {_stamp(report.get('started'))})",
        f"config: {report.get('config', '?')} sha256 {report.get('config_sha256', '?')}",
        f"queue:  {report.get('queue', 0)} message(s)",
    ]
    for worker in report.get("workers", []):
        state = f"pid {worker['pid']}" if worker.get("up") else "DOWN (restarting)"
        out.append(
            f"worker {worker['worker']}: {state}, queue {worker.get('queue', 0)}, "
            f"accepted {worker.get('accepted', 0)}, restarts {worker.get('restarts', 0)}"
        )
    for route in report.get("routes", []):
        out.append(f"route {route['route']!r}:")
        for host in route.get("hosts", []):
            state = str(host.get("state", "up")).upper()
            where = f"{host['host']}:{host['port']}" if "port" in host else host["host"]
            since = host.get("since")
            ago = f" for {_span(now - since)}" if since else ""
            out.append(f"  {state:<4} {where} ({host.get('table', '-')}){ago}")
            if host.get("down_in_workers"):
                whom = ", ".join(map(str, host["down_in_workers"]))
                out.append(f"       held down by worker(s) {whom} (host health is per worker)")
            if host.get("last_error"):
                out.append(f"       last error: {host['last_error']}")
            if host.get("state") == "down" and host.get("next_probe") is not None:
                wait = float(host["next_probe"]) - now
                when = f"in {_span(wait)}" if wait > 0 else "due (next attempt probes it)"
                out.append(f"       next probe: {when}")
            for address in host.get("addresses", []):
                if address.get("state") == "down" and len(host.get("addresses", [])) > 1:
                    out.append(
                        f"       down: {address['address']}:{address['port']} "
                        f"hold-down {_span(address.get('hold_down', 0))}"
                    )
    return out
