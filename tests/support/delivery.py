"""Helpers for delivery tests: a Config, routes, envelopes and a Deliverer for sinks.

The fixtures ``pki`` and ``closing`` reach every test through ``pytest_plugins`` in
tests/conftest.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import pytest

from relay.config import (
    Config,
    DeliveryConfig,
    Host,
    Route,
    ServerConfig,
    TlsConfig,
    TlsPolicy,
)
from relay.delivery import Deliverer
from relay.envelope import Envelope, Recipient
from relay.metrics import Metrics
from relay.routing import Candidate
from tests.support.pki import Pki
from tests.support.sink import StaticResolver

OPPORTUNISTIC = TlsPolicy(require_tls=False, require_ca_signed=False, validate_hostname=False)
ENCRYPT_ONLY = TlsPolicy(require_tls=True, require_ca_signed=False, validate_hostname=False)
CA_SIGNED = TlsPolicy(require_tls=True, require_ca_signed=True, validate_hostname=False)
STRICT = TlsPolicy()

BODY = (
    b"Received: from client.test by relay.test; Sat, 28 Nov 2026 12:00:00 +0000\r\n"
    b"From: a@src.test\r\nTo: b@x.test\r\nSubject: test\r\n\r\n"
    b"hello\r\n.starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n"
)


def make_config(ca_file: Path | None = None, **delivery: float) -> Config:
    timeouts = {"connect_timeout": 5.0, "command_timeout": 5.0, "idle_timeout": 5.0}
    timeouts.update(delivery)
    return Config(
        source=Path("test.toml"),
        sha256="",
        server=ServerConfig(hostname="relay.test", domains=("x.test",)),
        delivery=DeliveryConfig(**timeouts),  # type: ignore[arg-type]
        tls=TlsConfig(ca_file=ca_file),
    )


def route(policy: TlsPolicy = STRICT, *hosts: tuple[str, int], name: str = "r1") -> Route:
    return Route(name=name, primary=tuple(Host(h, p) for h, p in hosts), tls=policy)


def candidate(host: str, port: int) -> Candidate:
    return Candidate(host=host, port=port, configured=host)


def envelope(sender: str = "a@src.test", *rcpts: str, qid: str = "Q1") -> Envelope:
    rcpts = rcpts or ("b@x.test",)
    return Envelope(id=qid, mail_from=sender, recipients=[Recipient(r) for r in rcpts])


def deliverer(
    config: Config, names: dict[str, list[str]] | None = None, metrics: Metrics | None = None
) -> Deliverer:
    resolver = StaticResolver(names or {"mx1.test": ["127.0.0.1"], "mx2.test": ["127.0.0.1"]})
    return Deliverer(lambda: config, resolver, metrics or Metrics())


def addresses(env: Envelope) -> Sequence[str]:
    return [r.address for r in env.recipients]


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


@pytest.fixture
async def closing() -> AsyncIterator[Callable[[Deliverer], None]]:
    """Register Deliverers to close at the end of the test."""
    opened: list[Deliverer] = []
    yield opened.append
    for d in opened:
        await d.close()
