"""The metrics endpoint over a real socket: /metrics, /healthz, 404, slow clients.

And the guard test: every metric of the contract (README.md "Metrics and health") with its labels.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress

import pytest
from prometheus_client.parser import text_string_to_metric_families

from relay.metrics import Metrics, serve

#: README.md "Metrics and health": name (as exposed), type, label names.
CONTRACT = [
    ("relay_messages_received_total", "counter", ()),
    ("relay_messages_rejected_total", "counter", ("reason",)),
    ("relay_recipients_total", "counter", ("route", "outcome")),
    ("relay_delivery_attempts_total", "counter", ("route", "host", "result")),
    ("relay_tls_failures_total", "counter", ("route", "host", "reason")),
    ("relay_bounces_total", "counter", ("reason",)),
    ("relay_queue_messages", "gauge", ()),
    ("relay_delivery_seconds", "histogram", ("route",)),
    ("relay_config_reloads_total", "counter", ("result",)),
]


@asynccontextmanager
async def endpoint(
    metrics: Metrics, healthy: Callable[[], bool] = lambda: True, read_timeout: float = 5.0
) -> AsyncIterator[tuple[str, int]]:
    server = await serve(metrics, "127.0.0.1", 0, healthy, read_timeout=read_timeout)
    try:
        host, port = server.sockets[0].getsockname()[:2]
        yield host, port
    finally:
        server.close()
        await server.wait_closed()


async def http(address: tuple[str, int], request: bytes) -> tuple[int, bytes]:
    """Send a raw request, read until the server closes; (status, body)."""
    async with asyncio.timeout(5):
        reader, writer = await asyncio.open_connection(*address)
        try:
            writer.write(request)
            await writer.drain()
            data = await reader.read()
        finally:
            writer.close()
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


async def get(address: tuple[str, int], path: str) -> tuple[int, bytes]:
    return await http(address, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())


def touch(metrics: Metrics) -> None:
    """Use each contract metric once, by the label names the contract gives."""
    for name, kind, labels in CONTRACT:
        attr = {
            "relay_messages_received_total": "messages_received",
            "relay_messages_rejected_total": "messages_rejected",
            "relay_recipients_total": "recipients",
            "relay_delivery_attempts_total": "delivery_attempts",
            "relay_tls_failures_total": "tls_failures",
            "relay_bounces_total": "bounces",
            "relay_queue_messages": "queue_messages",
            "relay_delivery_seconds": "delivery_seconds",
            "relay_config_reloads_total": "config_reloads",
        }[name]
        metric = getattr(metrics, attr)
        # labels() raises ValueError if the metric's label names differ.
        child = metric.labels(**{label: "x" for label in labels}) if labels else metric
        if kind == "histogram":
            child.observe(0.5)
        elif kind == "gauge":
            child.set(3)
        else:
            child.inc()


async def test_every_contract_metric_is_exposed_with_its_labels() -> None:
    metrics = Metrics()
    touch(metrics)
    async with endpoint(metrics) as address:
        status, body = await get(address, "/metrics")
    assert status == 200
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for name, kind, labels in CONTRACT:
        family_name = name.removesuffix("_total") if kind == "counter" else name
        family = families.get(family_name)
        assert family is not None, f"{name} missing from /metrics"
        assert family.type == kind, name
        main = [s for s in family.samples if s.name in (name, f"{name}_count")]
        assert main, f"{name} has no samples"
        for sample in main:
            assert set(sample.labels) == set(labels), (name, sample.labels)


async def test_metrics_content_type_and_process_metrics() -> None:
    async with endpoint(Metrics()) as address:
        async with asyncio.timeout(5):
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"GET /metrics?x=1 HTTP/1.0\r\n\r\n")
            data = await reader.read()
            writer.close()
            await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200 OK")
    assert b"Content-Type: text/plain; version=" in head  # the Prometheus text format
    assert b"relay_queue_messages 0.0" in body
    assert b"process_resident_memory_bytes" in body


@pytest.mark.parametrize(("healthy", "status"), [(True, 200), (False, 503)])
async def test_healthz_follows_the_health_check(healthy: bool, status: int) -> None:
    async with endpoint(Metrics(), lambda: healthy) as address:
        assert (await get(address, "/healthz"))[0] == status


async def test_healthz_is_503_when_the_check_itself_fails() -> None:
    def broken() -> bool:
        raise OSError("spool gone")

    async with endpoint(Metrics(), broken) as address:
        assert (await get(address, "/healthz"))[0] == 503


@pytest.mark.parametrize("path", ["/", "/metrics/", "/health", "/favicon.ico"])
async def test_other_paths_are_404(path: str) -> None:
    async with endpoint(Metrics()) as address:
        assert await get(address, path) == (404, b"not found\n")


async def test_other_methods_are_405_and_garbage_is_not_a_crash() -> None:
    async with endpoint(Metrics()) as address:
        assert (await http(address, b"POST /metrics HTTP/1.0\r\n\r\n"))[0] == 405
        assert (await http(address, b"\r\n\r\n"))[0] == 405
        assert (await get(address, "/healthz"))[0] == 200


async def test_a_slowloris_client_is_dropped_after_the_read_timeout() -> None:
    async with endpoint(Metrics(), read_timeout=0.5) as address:
        reader, writer = await asyncio.open_connection(*address)
        loop = asyncio.get_running_loop()
        started = loop.time()
        closed = asyncio.ensure_future(reader.read())  # EOF when the server hangs up
        try:
            writer.write(b"GET /metrics HTTP/1.1\r\n")
            # One header line every 0.1 s: each line arrives well within any
            # per-line timeout, so only a total deadline stops it.
            for i in range(50):
                if closed.done():
                    break
                with suppress(ConnectionError):
                    writer.write(f"X-Slow-{i}: 1\r\n".encode())
                await asyncio.wait([closed], timeout=0.1)
            assert closed.done(), "server kept a trickling client for 5 s"
            # Dropped without an answer: EOF, or a reset if our last line was unread.
            error = closed.exception()
            assert isinstance(error, ConnectionError) if error else closed.result() == b""
            assert loop.time() - started < 2.0
        finally:
            closed.cancel()
            writer.close()
            with suppress(ConnectionError):
                await writer.wait_closed()
        # And the endpoint still serves others.
        assert (await get(address, "/healthz"))[0] == 200


async def test_an_idle_connection_does_not_block_other_clients() -> None:
    async with endpoint(Metrics(), read_timeout=1.0) as address:
        reader, writer = await asyncio.open_connection(*address)
        try:
            assert (await get(address, "/metrics"))[0] == 200
            async with asyncio.timeout(3):
                with suppress(ConnectionError):  # closed after read_timeout
                    assert await reader.read() == b""
        finally:
            writer.close()
            await writer.wait_closed()
