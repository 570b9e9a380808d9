"""Test helpers for the scheduler: a scripted Deliverer, a settable clock, configs, messages."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.attempt import Attempt, HostResult
from relay.config import (
    BouncesConfig,
    Config,
    DeliveryConfig,
    Host,
    QueueConfig,
    Route,
    Rule,
    ServerConfig,
)
from relay.cycle import Deliverer
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.errors import RelayError, Reply, TlsPolicyFailure
from relay.metrics import Metrics
from relay.queue import Scheduler
from relay.routing import Candidate
from relay.spool import Spool
from relay.spoolfiles import new_id
from tests.support.spool import body_path
from tests.support.wait import until

OK = Reply(250, (2, 0, 0), "Ok: queued")
TEMP = Reply(451, (4, 3, 0), "Try again later")
PERM = Reply(550, (5, 1, 1), "User unknown")

#: One scripted result: a Reply or failure, or a tuple of them (one per candidate).
Result = Reply | RelayError | tuple[Reply | RelayError, ...]

BODY = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@example.com\r\n"
    b"Subject: hello\r\n"
    b"Message-ID: <orig-1@sender.test>\r\n"
    b"\r\n"
    b"Hello.\r\n"
)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Call:
    route: str
    mail_from: str
    recipients: list[str]
    body: bytes


@dataclass
class FakeDeliverer:
    """Answers each recipient from a script: address -> results, one per call, then OK.

    ``delay`` holds every attempt that long (to observe concurrency);
    ``gate``, when set, holds attempts until it is set.
    """

    script: dict[str, list[Result]] = field(default_factory=dict)
    delay: float = 0.0
    gate: asyncio.Event | None = None
    host: str = "mx.example.com"
    raises: BaseException | None = None
    calls: list[Call] = field(default_factory=list)
    running: int = 0
    peak: int = 0

    async def deliver(
        self, route: Route, envelope: Envelope, recipients: Sequence[str], body: bytes
    ) -> Attempt:
        self.calls.append(Call(route.name, envelope.mail_from, list(recipients), body))
        self.running += 1
        self.peak = max(self.peak, self.running)
        try:
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.gate is not None:
                await self.gate.wait()
            if self.raises is not None:
                raise self.raises
        finally:
            self.running -= 1
        results: dict[str, tuple[Reply | RelayError, ...]] = {}
        for address in recipients:
            queue = self.script.get(address, [])
            item = queue.pop(0) if queue else OK
            results[address] = item if isinstance(item, tuple) else (item,)
        return _attempt(route.name, self.host, results)

    def calls_for(self, address: str) -> int:
        return sum(address in call.recipients for call in self.calls)


def _attempt(
    route: str, host: str, results: Mapping[str, tuple[Reply | RelayError, ...]]
) -> Attempt:
    hosts = []
    width = max((len(items) for items in results.values()), default=0)
    for i in range(width):
        failures = [items[i] for items in results.values() if len(items) > i]
        tls = next((f for f in failures if isinstance(f, TlsPolicyFailure)), None)
        name = host if i == 0 else f"mx{i + 1}.example.com"
        hosts.append(HostResult(Candidate(name, 25), ip="192.0.2.1", failure=tls))
    remote = {address: f"{host} [192.0.2.1]" for address in results}
    return Attempt(route, tuple(hosts), dict(results), remote)


def make_config(
    spool_path: Path,
    *,
    max_lifetime: float = 5 * 86400.0,
    min_backoff: float = 60.0,
    max_backoff: float = 3600.0,
    max_concurrency: int = 20,
    rules: Sequence[Rule] = (Rule(("@example.com",), "Corp"),),
    bounce_route: str = "",
    relay_networks: Sequence[str] = (),
    routes: Sequence[Route] = (
        Route("Corp", (Host("mx.corp.test", 25),)),
        Route("Bounces", (Host("smarthost.test", 587),)),
    ),
) -> Config:
    import ipaddress

    return Config(
        source=spool_path / "relay.toml",
        sha256="",
        server=ServerConfig(
            hostname="relay.example.com",
            domains=("example.com",),
            relay_networks=tuple(ipaddress.ip_network(n) for n in relay_networks),
        ),
        queue=QueueConfig(spool_path, max_lifetime, min_backoff, max_backoff),
        delivery=DeliveryConfig(max_concurrency=max_concurrency),
        bounces=BouncesConfig(bounce_route),
        routes=tuple(routes),
        rules=tuple(rules),
    )


def spool_message(
    spool: Spool,
    recipients: Sequence[str],
    *,
    sender: str = "alice@sender.test",
    received_at: float = 1_800_000_000.0,
    client_ip: str = "192.0.2.10",
    body: bytes = BODY,
    is_bounce: bool = False,
) -> Envelope:
    """Spool a message as inbound would (durably, before scheduling)."""
    envelope = Envelope(
        id=new_id(),
        mail_from=sender,
        recipients=[Recipient(a) for a in recipients],
        client=ClientInfo(ip=client_ip, helo="client.test"),
        received_at=received_at,
        is_bounce=is_bounce,
    )
    spool.put(envelope, body)
    return envelope


def legacy_message(
    spool: Spool,
    recipients: Sequence[str],
    *,
    body: bytes = BODY,
    sender: str = "alice@sender.test",
) -> Envelope:
    """A message as relay spooled it before one-file messages: the body
    file (no envelope line) and ``<id>.json``."""
    envelope = Envelope(
        id=new_id(),
        mail_from=sender,
        recipients=[Recipient(a) for a in recipients],
        client=ClientInfo(ip="192.0.2.10", helo="client.test"),
        received_at=1_800_000_000.0,
        size=len(body),
    )
    body_path(spool, envelope.id).write_bytes(body)
    (spool.msg_dir / f"{envelope.id}.json").write_bytes(envelope.dumps())
    return envelope


@dataclass
class Harness:
    spool: Spool
    #: A FakeDeliverer unless the test passed another Deliverer.
    deliverer: Any
    metrics: Metrics
    clock: Clock
    scheduler: Scheduler
    config: Config

    def sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return value or 0.0

    def spooled(self) -> list[Envelope]:
        return list(self.spool.load_all())


def open_spool(tmp_path: Path) -> Spool:
    """A fresh, opened spool in ``tmp_path/spool`` (no fsync: tests that measure nothing)."""
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.open()
    return spool


def harness(
    tmp_path: Path,
    deliverer: Deliverer | None = None,
    config: Config | None = None,
    clock: Clock | None = None,
    spool: Spool | None = None,
) -> Harness:
    """A scheduler on a fresh spool (or ``spool``, e.g. one whose disk fills up)."""
    spool = spool or Spool(tmp_path / "spool", fsync=False)
    spool.open()
    cfg = config or make_config(spool.path)
    metrics = Metrics()
    clk = clock or Clock()
    fake = deliverer or FakeDeliverer()
    scheduler = Scheduler(lambda: cfg, spool, fake, metrics, clock=clk, rng=random.Random(7))
    return Harness(spool, fake, metrics, clk, scheduler, cfg)


@contextlib.asynccontextmanager
async def running(scheduler: Scheduler, grace: float = 1.0) -> AsyncIterator[Scheduler]:
    """Run the scheduler for the duration of the block, then stop it."""
    task = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        await scheduler.stop(grace)
        await asyncio.wait_for(task, 5)


async def settle(scheduler: Scheduler, within: float = 5.0) -> None:
    """Wait until nothing runs and nothing is due (the clock does not move by itself)."""
    await until(lambda: not busy(scheduler), within, what="the scheduler idle")


def busy(scheduler: Scheduler) -> bool:
    """True while an attempt runs or a message is due now."""
    running = len(scheduler) - len(scheduler.due)  # len() counts queued and running
    return running > 0 or scheduler.due.due_now()
