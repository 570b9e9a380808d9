"""Every Prometheus metric of the contract, defined once, and the HTTP endpoint.

Label values come only from configuration (route names, configured host
names) and small closed sets (result, reason, outcome): never from
addresses or anything else a client sends, so cardinality stays bounded.

Each daemon (and each test) owns one :class:`Metrics` with its own
registry, so counters start from zero and can be checked exactly.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Closed label sets, for documentation and the guard test.
OUTCOMES = ("delivered", "deferred", "bounced")
REJECT_REASONS = (
    "relaying_denied", "no_route", "too_many_recipients", "too_big", "bad_address",
    "bad_syntax", "loop", "bare_line_ending", "bad_header", "spool_error", "disk_full",
    "bad_content",
)  # fmt: skip
ATTEMPT_RESULTS = ("delivered", "deferred", "bounced", "tls_failed", "unreachable", "dns_failed")
BOUNCE_REASONS = ("remote_permanent", "tls_policy", "expired", "double_bounce", "dns_permanent")
RELOAD_RESULTS = ("success", "error")


class Metrics:
    """The contract's metrics on one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.messages_received = Counter(
            "relay_messages_received_total", "Messages accepted and spooled.", registry=r
        )
        self.messages_rejected = Counter(
            "relay_messages_rejected_total",
            "Commands or messages refused at SMTP time.",
            ["reason"],
            registry=r,
        )
        self.recipients = Counter(
            "relay_recipients_total",
            "Recipient outcomes per route.",
            ["route", "outcome"],
            registry=r,
        )
        self.delivery_attempts = Counter(
            "relay_delivery_attempts_total",
            "Delivery attempts per route and next hop.",
            ["route", "host", "result"],
            registry=r,
        )
        self.tls_failures = Counter(
            "relay_tls_failures_total",
            "Hosts that failed a route's TLS policy.",
            ["route", "host", "reason"],
            registry=r,
        )
        self.bounces = Counter(
            "relay_bounces_total",
            "Delivery status notifications, by cause.",
            ["reason"],
            registry=r,
        )
        self.queue_messages = Gauge("relay_queue_messages", "Messages in the spool.", registry=r)
        self.delivery_seconds = Histogram(
            "relay_delivery_seconds",
            "Seconds from acceptance to delivery.",
            ["route"],
            buckets=(
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                300,
                900,
                3600,
                14400,
                86400,
            ),  # fmt: skip
            registry=r,
        )
        self.config_reloads = Counter(
            "relay_config_reloads_total", "Configuration reloads.", ["result"], registry=r
        )
        self.route_dns_errors = Counter(
            "relay_route_dns_errors_total",
            "Names from the configuration that do not resolve (a config problem, mail deferred).",
            ["route", "host"],
            registry=r,
        )

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve(
    metrics: Metrics, host: str, port: int, healthy: Callable[[], bool]
) -> asyncio.Server:
    """Serve ``/metrics`` and ``/healthz`` over a minimal HTTP/1.0 responder.

    asyncio streams rather than prometheus_client's threaded server, so the
    endpoint lives on the daemon's loop and stops with it.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 10)
            # Drain the headers; we answer without reading a body.
            while await asyncio.wait_for(reader.readline(), 10) not in (b"\r\n", b"\n", b""):
                pass
            parts = request.decode("latin-1").split()
            path = parts[1].split("?")[0] if len(parts) >= 2 else ""
            if path == "/metrics":
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, metrics.exposition()
            elif path == "/healthz":
                ok = healthy()
                status = "200 OK" if ok else "503 Service Unavailable"
                ctype, body = "text/plain", b"ok\n" if ok else b"spool not writable\n"
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"not found\n"
            head = (
                f"HTTP/1.0 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
