"""Every Prometheus metric (README.md "Metrics and health"), defined once, and the HTTP endpoint.

Label values come only from configuration (route names, configured host
names) and small closed sets (result, reason, outcome): never from
addresses or anything else a client sends, so cardinality stays bounded.

Each daemon (and each test) owns one :class:`Metrics` with its own
registry, so counters start from zero and can be checked exactly.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Protocol, TypeVar

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector

# Closed label sets, for documentation and the guard test.
OUTCOMES = ("delivered", "deferred", "bounced")
REJECT_REASONS = (
    "relaying_denied", "no_route", "too_many_recipients", "too_big", "bad_address",
    "bad_syntax", "loop", "bare_line_ending", "bad_header", "spool_error", "disk_full",
    "bad_content", "routing_characters", "too_many_errors", "data_timeout", "busy_timeout",
)  # fmt: skip
#: Why a connection was closed before its session started.
CONNECTION_REFUSALS = ("max_connections", "max_connections_per_ip")
ATTEMPT_RESULTS = ("delivered", "deferred", "bounced", "tls_failed", "unreachable", "dns_failed")
BOUNCE_REASONS = ("remote_permanent", "tls_policy", "expired", "double_bounce", "dns_permanent")
RELOAD_RESULTS = ("success", "error")
HOST_STATES = ("down", "up")


_Metric = TypeVar("_Metric", Counter, Histogram)


class SyncCounts(Protocol):
    """What the spool's group commit counts (relay.groupcommit.GroupSync)."""

    syncs: int
    served: int


class _SpoolSyncs:
    """The spool's directory fsyncs and the changes they covered, read at scrape
    time from the group commit's own counters (nothing to update per message)."""

    def __init__(self, counts: SyncCounts) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily(
            "relay_spool_dir_syncs",
            "Directory fsyncs of the spool (each covers every rename or unlink before it).",
            value=self._counts.syncs,
        )
        yield CounterMetricFamily(
            "relay_spool_dir_sync_changes",
            "Renames and unlinks made durable by the spool's directory fsyncs.",
            value=self._counts.served,
        )


class Metrics:
    """Every metric README.md documents, on one registry."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}
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
        self.connections_refused = Counter(
            "relay_connections_refused_total",
            "Inbound connections closed with 421 before a session, by limit.",
            ["reason"],
            registry=r,
        )
        self.inbound_connections = Gauge(
            "relay_inbound_connections", "Inbound SMTP sessions open now.", registry=r
        )
        self.inbound_memory = Gauge(
            "relay_inbound_memory_bytes",
            "Message bytes inbound sessions hold in memory now ([server] max_memory).",
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
        self.mta_sts_testing = Counter(
            "relay_mta_sts_testing_failures_total",
            "MX hosts an MTA-STS policy in testing mode would have refused "
            "(RFC 8461: the mail was delivered as the route says).",
            ["route", "reason"],
            registry=r,
        )
        self.tls_deferred = Counter(
            "relay_tls_deferred_total",
            "Recipients kept queued because every host failed the route's TLS policy "
            '(on_tls_failure = "defer").',
            ["route"],
            registry=r,
        )
        self.tls_certificate_expiry = Gauge(
            "relay_tls_certificate_expiry_timestamp_seconds",
            "notAfter of the certificate a route host presented at its last verified "
            "handshake (the earliest among the MX hosts behind one configured name).",
            ["route", "host"],
            registry=r,
        )
        self.bounces = Counter(
            "relay_bounces_total",
            "Delivery status notifications, by cause.",
            ["reason"],
            registry=r,
        )
        self.delay_warnings = Counter(
            "relay_delay_warnings_total",
            "Delay warnings (RFC 3464 Action: delayed) spooled to senders.",
            registry=r,
        )
        self.queue_messages = Gauge(
            "relay_queue_messages", "Messages in the spool, queued or being tried.", registry=r
        )
        self.queue_held = Gauge(
            "relay_queue_held_messages",
            "Messages on hold (relay queue hold): in the spool, never tried until released.",
            registry=r,
        )
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
        self.host_up = Gauge(
            "relay_host_up",
            "1 while a configured route host is up, 0 while every address of it is held down.",
            ["route", "host"],
            registry=r,
        )
        self.host_state_changes = Counter(
            "relay_host_state_changes_total",
            "Next hops going down or coming back up (MX hosts count under their route host).",
            ["route", "host", "state"],
            registry=r,
        )

        # Every value of a closed label set is exported from the start, at 0:
        # a series that first appears at 1 hides its first increase from
        # rate()/increase(), so an alert on the first failed reload or the
        # first bounce would never fire.
        for reason in REJECT_REASONS:
            self.messages_rejected.labels(reason)
        for reason in CONNECTION_REFUSALS:
            self.connections_refused.labels(reason)
        for reason in BOUNCE_REASONS:
            self.bounces.labels(reason)
        for result in RELOAD_RESULTS:
            self.config_reloads.labels(result)

    def child(self, metric: _Metric, *values: str) -> _Metric:
        """``metric.labels(*values)``, looked up once per label values.

        prometheus-client validates the values and takes a lock on every
        ``labels()`` call (about 2 us); a delivered message makes three. The
        children of counters and histograms are never removed, and their
        label values come from the configuration, so this dict stays small.
        (Gauges whose series are removed, such as relay_host_up, do not use it.)
        """
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found

    def watch_spool_syncs(self, counts: SyncCounts) -> None:
        """Export the spool's fsync counts; their ratio is the fsync batch size."""
        self.registry.register(_SpoolSyncs(counts))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


#: Header lines read before giving up on a request (we need none of them).
MAX_HEADER_LINES = 100


async def get(host: str, port: int, path: str) -> tuple[int, bytes]:
    """``GET path`` from an endpoint :func:`serve` runs: its status code and body.

    The client of ``relay status`` and of a supervisor gathering its
    workers (relay.workers); the caller bounds the time.
    """
    reader, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: relay\r\n\r\n".encode())
        await writer.drain()
        raw = await reader.read()
    finally:
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    parts = head.split(None, 2)
    return (int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 0), body


async def _read_request_path(reader: asyncio.StreamReader) -> tuple[str, str]:
    """The method and path of one HTTP request; its headers are read and dropped."""
    request = await reader.readline()
    for _ in range(MAX_HEADER_LINES):
        if await reader.readline() in (b"\r\n", b"\n", b""):
            break
    parts = request.decode("latin-1").split()
    if len(parts) < 2:
        return "", ""
    return parts[0], parts[1].split("?")[0]


#: What ``GET /status`` answers: the daemon's state as JSON-ready data
#: (a supervisor's is a coroutine: it asks its workers, relay.workers).
StatusReport = Callable[[], dict[str, Any] | Awaitable[dict[str, Any]]]

#: ``/healthz``'s check; a supervisor's is a coroutine too.
HealthCheck = Callable[[], bool | Awaitable[bool]]

#: ``/metrics``'s text when it is not one registry's (a supervisor's).
Exposition = Callable[[], Awaitable[bytes]]


async def _settled(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def _respond(
    metrics: Metrics | Exposition,
    healthy: HealthCheck,
    method: str,
    path: str,
    status: StatusReport | None = None,
) -> tuple[str, str, bytes]:
    if method not in ("GET", "HEAD"):
        return "405 Method Not Allowed", "text/plain", b"use GET\n"
    if path == "/metrics":
        text = metrics.exposition() if isinstance(metrics, Metrics) else await metrics()
        return "200 OK", CONTENT_TYPE_LATEST, text
    if path == "/healthz":
        try:
            ok = await _settled(healthy())
        except Exception:  # a broken check means unhealthy, not a dead endpoint
            ok = False
        if ok:
            return "200 OK", "text/plain", b"ok\n"
        return "503 Service Unavailable", "text/plain", b"spool not writable\n"
    if path == "/status" and status is not None:
        # `relay status` reads this (relay.status): version, queue, host health.
        report = await _settled(status())
        body = json.dumps(report, indent=2, sort_keys=True).encode() + b"\n"
        return "200 OK", "application/json", body
    return "404 Not Found", "text/plain", b"not found\n"


async def serve(
    metrics: Metrics | Exposition,
    host: str,
    port: int,
    healthy: HealthCheck,
    *,
    read_timeout: float = 10.0,
    status: StatusReport | None = None,
) -> asyncio.Server:
    """Serve ``/metrics``, ``/healthz`` and (given ``status``) ``/status``
    over a minimal HTTP/1.0 responder.

    asyncio streams rather than prometheus_client's threaded server, so the
    endpoint lives on the daemon's loop and stops with it. Returns the
    listening server: with ``port`` 0, ``server.sockets[0].getsockname()``
    tells the port chosen. ``/healthz`` answers 200 while ``healthy()`` is
    true, else 503. A client gets ``read_timeout`` seconds in total to send
    its request line and headers, and as long again to take the answer, so
    a slow (slowloris) client cannot hold a connection open for longer.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(read_timeout):
                method, path = await _read_request_path(reader)
            code, ctype, body = await _respond(metrics, healthy, method, path, status)
            head = (
                f"HTTP/1.0 {code}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            )
            writer.write(head.encode("latin-1") + (b"" if method == "HEAD" else body))
            # A client that never reads must not hold the connection either.
            async with asyncio.timeout(read_timeout):
                await writer.drain()
        except (TimeoutError, ConnectionError, ValueError):
            # ValueError: a line longer than the stream limit (64 KiB).
            # Abort rather than close: close() would wait to flush to a
            # client that is not reading.
            writer.transport.abort()
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port)
