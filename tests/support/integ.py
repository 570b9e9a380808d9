"""The whole delivery path in-process, wired by the daemon's own ``relay.app.build``.

``InProcessRelay`` loads TOML text with :func:`relay.configload.load` and builds
the daemon's parts from it, so the real SMTP client, the real resolver
(against dnsmasq, tests/support/dnsserver.py) and the real scheduler all
run (the SMTP listeners and the control folder are built but not started)::

    async with Sink() as sink:
        server = dnsmasq(hosts={"mx1.corp.test": ["127.0.0.1"]})
        routes = configs.route("Corp", "mx1.corp.test", sink.port)
        rules = configs.rule("Corp", "@corp.test")
        toml = integration_toml(tmp_path, server, routes, rules)
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: sink.messages)

Sinks on other loopback addresses (127.0.0.2 ...) let two MX hosts share
the route's one port, as they would on the internet.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import pytest

from relay import app, configload
from relay.config import Config
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.spoolfiles import new_id
from tests.support.configs import relay_toml
from tests.support.dnsserver import DnsmasqFactory, DnsServer, dnsmasq_servers
from tests.support.queue import busy
from tests.support.sink import Sink
from tests.support.wait import until

SENDER = "alice@sender.test"

#: A body that exercises dot-stuffing (RFC 5321 section 4.5.2) on the way.
BODY = (
    b"From: Alice <alice@sender.test>\r\n"
    b"To: bob@corp.test\r\n"
    b"Subject: integration\r\n"
    b"Message-ID: <integ-1@sender.test>\r\n"
    b"\r\n"
    b"Hello.\r\n.starts with a dot\r\n..two dots\r\n.\r\nlast line\r\n"
)


class LoopbackSink(Sink):
    """A :class:`Sink` on any 127.0.0.0/8 address, optionally on a given port."""

    def __init__(self, ip: str = "127.0.0.1", port: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ip = ip
        self.wanted_port = port

    async def start(self) -> LoopbackSink:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, self.ip, self.wanted_port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self


async def sinks_on_one_port(ips: Sequence[str], **kwargs: Any) -> list[LoopbackSink]:
    """Started sinks, one per loopback ``ip``, all on the same (free) port."""
    for _ in range(20):
        first = await LoopbackSink(ips[0], **kwargs).start()
        started = [first]
        try:
            for ip in ips[1:]:
                started.append(await LoopbackSink(ip, first.port, **kwargs).start())
        except OSError:
            for sink in started:
                await sink.stop()
            continue
        return started
    raise RuntimeError("no port free on every loopback address")


# --- config text ------------------------------------------------------------


def integration_toml(
    tmp_path: Path,
    dns: DnsServer,
    routes: str,
    rules: str = "",
    *,
    ca_file: Path | None = None,
    max_lifetime: str = "1h",
    min_backoff: str = "100ms",
    max_backoff: str = "1s",
    max_concurrency: int = 20,
    max_per_host: int = 5,
    bounce_route: str = "",
    relay_networks: Sequence[str] = (),
    notify: Sequence[str] = (),
) -> str:
    """A complete relay.toml for one test: spool in tmp_path, DNS at ``dns``;
    ``routes`` and ``rules`` from tests/support/configs.py."""
    sections: dict[str, dict[str, object]] = {
        "server": {
            "hostname": "relay.test",
            "domains": ["corp.test"],
            "relay_networks": list(relay_networks),
        },
        "queue": {
            "path": tmp_path / "spool",
            "max_lifetime": max_lifetime,
            "min_backoff": min_backoff,
            "max_backoff": max_backoff,
        },
        "delivery": {
            "max_concurrency": max_concurrency,
            "max_per_host": max_per_host,
            "connect_timeout": "3s",
            "command_timeout": "5s",
            "idle_timeout": "5s",
            # Hold-downs as short as the retries: a host that comes back is tried again.
            "hold_down": min_backoff,
            "max_hold_down": max_backoff,
        },
        "dns": {"nameservers": [f"{dns.ip}:{dns.port}"], "timeout": "2s"},
        "metrics": {"listen": ""},
        "audit": {"path": tmp_path / "audit.log"},
    }
    if ca_file:
        sections["tls"] = {"ca_file": ca_file}
    bounces: dict[str, object] = {"route": bounce_route} if bounce_route else {}
    if notify:
        bounces["notify"] = list(notify)
    if bounces:
        sections["bounces"] = bounces
    return relay_toml(sections, routes, rules)


# --- the relay ---------------------------------------------------------------


class InProcessRelay:
    """The daemon's parts (``relay.app.build``) from a config file, the scheduler running."""

    def __init__(
        self,
        tmp_path: Path,
        toml: str,
        *,
        clock: Callable[[], float] = time.time,
        seed: int | None = 1,
        name: str = "relay.toml",
    ) -> None:
        path = tmp_path / name
        path.write_text(toml)
        self.config: Config = configload.load(path)
        self.clock = clock
        parts = app.build(lambda: self.config, fsync=False, clock=clock, seed=seed)
        self._parts = parts
        self.metrics = parts.metrics
        self.spool = parts.spool
        self.deliverer = parts.deliverer
        self.scheduler = parts.scheduler
        self.spool.open()
        self._task: asyncio.Task[None] | None = None

    def put(
        self,
        sender: str,
        recipients: Sequence[str],
        body: bytes = BODY,
        *,
        received_at: float | None = None,
        smtputf8: bool = False,
    ) -> Envelope:
        """Spool a message as inbound does, then hand it to the scheduler."""
        now = self.clock() if received_at is None else received_at
        envelope = Envelope(
            id=new_id(),
            mail_from=sender,
            recipients=[Recipient(a) for a in recipients],
            client=ClientInfo(ip="192.0.2.10", helo="client.test"),
            received_at=now,
            next_attempt=now,
            smtputf8=smtputf8,
        )
        self.spool.put(envelope, body)
        self.scheduler.add(envelope)
        return envelope

    async def send_and_settle(
        self,
        sender: str,
        recipients: Sequence[str],
        body: bytes = BODY,
        *,
        when: Callable[[], object],
        smtputf8: bool = False,
    ) -> Envelope:
        """``put`` a message, wait until ``when`` holds (a sink has it, a DSN came
        back ...), then until nothing runs and nothing is due."""
        envelope = self.put(sender, recipients, body, smtputf8=smtputf8)
        await until(when, what="the message's outcome")
        await idle(self)
        return envelope

    def flush(self) -> None:
        """What ``relay queue flush`` and SIGUSR1 do to the daemon."""
        self._parts.flush()

    def requeue(self) -> int:
        """Schedule every spooled message (what the daemon does at start)."""
        envelopes = list(self.spool.load_all())
        for envelope in envelopes:
            self.scheduler.add(envelope)
        return len(envelopes)

    def spooled(self) -> list[Envelope]:
        return list(self.spool.load_all())

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics.registry.get_sample_value(name, labels) or 0.0

    async def __aenter__(self) -> InProcessRelay:
        self._task = asyncio.create_task(self.scheduler.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.scheduler.stop(5)
        if self._task is not None:
            await asyncio.wait_for(self._task, 5)
        await self.deliverer.close()


async def idle(relay: InProcessRelay, within: float = 10.0) -> None:
    """Until nothing runs and nothing is due in the scheduler."""
    await until(lambda: not busy(relay.scheduler), within, what="the relay idle")


# --- fixtures (tests/conftest.py loads this module as a plugin) ---------------


@pytest.fixture
def dnsmasq() -> Iterator[DnsmasqFactory]:
    """dnsmasq factory: ``dnsmasq(hosts=..., mx=...)`` (tests/support/dnsserver.py)."""
    with dnsmasq_servers() as start:
        yield start


@pytest.fixture
async def dsn_sink() -> AsyncIterator[Sink]:
    """The sender domain's MX: where DSNs to alice@sender.test arrive."""
    async with Sink() as sink:
        yield sink


# --- DSNs ---------------------------------------------------------------------


def parse_dsn(data: bytes) -> EmailMessage:
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert isinstance(message, EmailMessage)
    return message


def dsn_parts(data: bytes, utf8: bool = False) -> tuple[EmailMessage, str, list[dict[str, str]]]:
    """(the DSN, its human-readable text, the per-recipient fields of its report).

    ``utf8``: an RFC 6533 DSN (``message/global-delivery-status``).
    """
    message = parse_dsn(data)
    assert message.get_content_type() == "multipart/report"
    # RFC 6533 changes the report part's type, not the report-type.
    assert message.get_param("report-type") == "delivery-status"
    parts = list(message.iter_parts())
    human = parts[0].get_content()
    report = parts[1]
    kind = "global-delivery-status" if utf8 else "delivery-status"
    assert report.get_content_type() == f"message/{kind}"
    payload = report.get_payload()
    assert isinstance(payload, list)
    if not utf8:
        # The email package parses message/delivery-status into header blocks:
        # the first is per message, each next one per recipient (RFC 3464 2.1).
        blocks = [{k.lower(): str(v) for k, v in block.items()} for block in payload]
    else:
        # message/global-delivery-status is parsed like message/rfc822: one
        # "message" whose headers are the first block; read the text instead.
        blocks = _field_blocks(payload[0].as_string())
    return message, " ".join(human.split()), blocks[1:]


def _field_blocks(text: str) -> list[dict[str, str]]:
    """RFC 3464 field blocks separated by blank lines (continuations unfolded)."""
    blocks: list[dict[str, str]] = []
    for chunk in text.replace("\r\n", "\n").strip().split("\n\n"):
        fields: dict[str, str] = {}
        name = ""
        for line in chunk.split("\n"):
            if line[:1] in (" ", "\t") and name:
                fields[name] += " " + line.strip()
            elif ":" in line:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                fields[name] = value.strip()
        blocks.append(fields)
    return blocks
