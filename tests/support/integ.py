"""The whole delivery path in-process, wired as the daemon wires it.

``Relay`` builds ``Scheduler(lambda: cfg, Spool, Deliverer(lambda: cfg,
DnsResolver(cfg.dns), metrics, rng), metrics, clock, rng)`` from TOML text
loaded with :func:`relay.configload.load`, so the real SMTP client, the real
resolver (against dnsmasq, tests/support/dnsserver.py) and the real
scheduler all run::

    async with Sink() as sink:
        server = dnsmasq(hosts={"mx1.corp.test": ["127.0.0.1"]})
        route = single_route("Corp", "mx1.corp.test", sink.port)
        toml = config_text(tmp_path, server, route, rule("Corp", "@corp.test"))
        async with Relay(tmp_path, toml) as relay:
            relay.put("alice@sender.test", ["bob@corp.test"])
            await until(lambda: sink.messages)

Sinks on other loopback addresses (127.0.0.2 ...) let two MX hosts share
the route's one port, as they would on the internet.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import random
import socket
import time
from collections.abc import Callable, Sequence
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from relay import configload
from relay.config import Config
from relay.delivery import Deliverer
from relay.dns import DnsResolver
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.metrics import Metrics
from relay.queue import Scheduler
from relay.spool import Spool
from relay.spoolfiles import new_id
from tests.support.dnsserver import DnsServer
from tests.support.queue import busy
from tests.support.sink import Sink

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


def closed_port() -> int:
    """A port on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- config text ------------------------------------------------------------


def single_route(
    name: str,
    host: str,
    port: int,
    *,
    mx_lookup: bool = False,
    require_tls: bool = False,
    require_ca_signed: bool = False,
    validate_hostname: bool = False,
) -> str:
    return (
        f'[[routes]]\nname = "{name}"\nhost = "{host}"\nport = {port}\n'
        f"mx_lookup = {_b(mx_lookup)}\nrequire_tls = {_b(require_tls)}\n"
        f"require_ca_signed = {_b(require_ca_signed)}\n"
        f"validate_hostname = {_b(validate_hostname)}\n"
    )


def multi_route(
    name: str,
    primary: Sequence[tuple[str, int, int]],
    secondary: Sequence[tuple[str, int, int]] = (),
    *,
    mx_lookup: bool = False,
) -> str:
    """A route of (host, port, load) tables with opportunistic TLS."""
    text = (
        f'[[routes]]\nname = "{name}"\nmx_lookup = {_b(mx_lookup)}\n'
        "require_tls = false\nrequire_ca_signed = false\nvalidate_hostname = false\n"
    )
    for table, hosts in (("primary", primary), ("secondary", secondary)):
        for host, port, load in hosts:
            text += f'[[routes.{table}]]\nhost = "{host}"\nport = {port}\nload = {load}\n'
    return text


def rule(route: str, *patterns: str) -> str:
    quoted = ", ".join(f'"{p}"' for p in patterns)
    return f'[[rules]]\nrecipients = [{quoted}]\nroute = "{route}"\n'


def config_text(
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
    """A complete relay.toml for one test: spool in tmp_path, DNS at ``dns``."""
    tls = f'[tls]\nca_file = "{ca_file}"\n' if ca_file else ""
    bounces = f'[bounces]\nroute = "{bounce_route}"\n' if bounce_route else ""
    if notify:
        listed = ", ".join(f'"{address}"' for address in notify)
        bounces = (bounces or "[bounces]\n") + f"notify = [{listed}]\n"
    networks = ", ".join(f'"{n}"' for n in relay_networks)
    return (
        '[server]\nhostname = "relay.test"\ndomains = ["corp.test"]\n'
        f"relay_networks = [{networks}]\n"
        f'[queue]\npath = "{tmp_path / "spool"}"\nmax_lifetime = "{max_lifetime}"\n'
        f'min_backoff = "{min_backoff}"\nmax_backoff = "{max_backoff}"\n'
        f"[delivery]\nmax_concurrency = {max_concurrency}\nmax_per_host = {max_per_host}\n"
        'connect_timeout = "3s"\ncommand_timeout = "5s"\nidle_timeout = "5s"\n'
        # Hold-downs as short as the retries: a host that comes back is tried again.
        f'hold_down = "{min_backoff}"\nmax_hold_down = "{max_backoff}"\n'
        f'[dns]\nnameservers = ["{dns.ip}:{dns.port}"]\ntimeout = "2s"\n'
        f'[metrics]\nlisten = ""\n[audit]\npath = "{tmp_path / "audit.log"}"\n'
        f"{tls}{bounces}{routes}{rules}"
    )


def _b(value: bool) -> str:
    return "true" if value else "false"


# --- the relay ---------------------------------------------------------------


class Relay:
    """Spool + Scheduler + Deliverer + DnsResolver + Metrics, from a config file."""

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
        self.spool = Spool(self.config.queue.path, fsync=False)
        self.spool.open()
        self.metrics = Metrics()
        self.clock = clock
        self.rng = random.Random(seed) if seed is not None else random.Random()
        self.deliverer = Deliverer(
            lambda: self.config, DnsResolver(self.config.dns), self.metrics, self.rng
        )
        self.scheduler = Scheduler(
            lambda: self.config, self.spool, self.deliverer, self.metrics,
            clock=clock, rng=random.Random(seed),
        )  # fmt: skip
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

    async def __aenter__(self) -> Relay:
        self._task = asyncio.create_task(self.scheduler.run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.scheduler.stop(5)
        if self._task is not None:
            await asyncio.wait_for(self._task, 5)
        await self.deliverer.close()


async def until(condition: Callable[[], object], within: float = 10.0) -> None:
    """Poll ``condition`` until true; TimeoutError after ``within`` seconds."""
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 - a predicate on sink state, no event
            await asyncio.sleep(0.01)


async def idle(relay: Relay, within: float = 10.0) -> None:
    """Until nothing runs and nothing is due in the scheduler."""
    await until(lambda: not busy(relay.scheduler), within)


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
