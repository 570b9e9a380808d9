"""Helpers for the inbound and daemon tests: configs, an in-process server, raw clients.

Everything talks real SMTP over loopback; nothing in relay is patched.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import tomllib
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from relay import configload
from relay.config import Config, Listen, MetricsConfig
from relay.envelope import Envelope
from relay.inbound import Inbound
from relay.metrics import Metrics
from relay.spool import Spool
from tests.support import configs


def inbound_toml(
    spool: Path,
    *,
    max_message_size: int = 100_000,
    max_recipients: int = 5,
    timeout: str = "30s",
    extra_server: str = "",
    metrics: str = "",
    listen: Sequence[str] = ("127.0.0.1:2525",),
    domains: Sequence[str] = ("example.com", "example.net"),
    queue: Mapping[str, object] | None = None,
    extra: str = "",
) -> str:
    """The inbound tests' TOML: example.com and known@example.net go to route
    Corp (127.0.0.1:2526). ``extra_server`` is more ``[server]`` keys as TOML
    lines, ``queue`` more ``[queue]`` keys; ``extra`` is appended (more routes,
    rules or sections)."""
    server: dict[str, object] = {
        "hostname": "relay.test",
        "listen": list(listen),
        "domains": list(domains),
        "max_message_size": max_message_size,
        "max_recipients": max_recipients,
        "timeout": timeout,
        **tomllib.loads(extra_server),
    }
    sections = {
        "server": server,
        "queue": {"path": spool, **(queue or {})},
        "metrics": {"listen": metrics},
    }
    routes = configs.route("Corp", "127.0.0.1", 2526)
    rules = configs.rule("Corp", "@example.com", "known@example.net")
    return configs.relay_toml(sections, routes, rules) + extra


def make_config(tmp_path: Path, **kwargs: object) -> Config:
    """A valid Config listening on 127.0.0.1 port 0 (the OS picks), metrics off."""
    text = inbound_toml(tmp_path / "spool", **kwargs)  # type: ignore[arg-type]
    cfg = configload.parse(tomllib.loads(text), tmp_path / "relay.toml")
    server = dataclasses.replace(cfg.server, listen=(Listen("127.0.0.1", 0),))
    return dataclasses.replace(cfg, server=server, metrics=MetricsConfig(listen=None))


@dataclass
class Harness:
    inbound: Inbound
    spool: Spool
    metrics: Metrics
    accepted: list[Envelope] = field(default_factory=list)
    #: The body parts handed over with each accepted envelope, by queue id.
    handed: dict[str, bytes] = field(default_factory=dict)

    @property
    def port(self) -> int:
        return self.inbound.addresses[0][1]

    def spooled(self) -> list[Envelope]:
        return list(self.spool.load_all())

    def rejected(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "relay_messages_rejected_total", {"reason": reason}
        )
        return value or 0.0


@contextlib.asynccontextmanager
async def running_inbound(
    config: Config | Callable[[], Config],
    spool: Spool | None = None,
    tls_context: object = None,
    resolver: object = None,
) -> AsyncIterator[Harness]:
    """An Inbound on the test's loop, with a spool; stopped (and checked closed) after."""
    current = config if callable(config) else (lambda: config)
    spool = spool or Spool(current().queue.path, fsync=False)
    spool.open()
    metrics = Metrics()
    accepted: list[Envelope] = []
    handed: dict[str, bytes] = {}

    def on_accept(envelope: Envelope, body: Sequence[bytes]) -> None:
        accepted.append(envelope)
        handed[envelope.id] = b"".join(body)

    inbound = Inbound(
        current,
        spool,
        metrics,
        on_accept,
        tls_context=lambda: tls_context,  # type: ignore[arg-type,return-value]
        # A resolver given: name even the loopback clients (the test DNS serves 127.0.0.x).
        resolver=lambda: resolver,
        look_up_loopback=resolver is not None,
    )
    await inbound.start()
    try:
        yield Harness(inbound, spool, metrics, accepted, handed)
    finally:
        await inbound.stop(grace=2)


class RawClient:
    """A byte-exact SMTP client: what smtplib will not send, this does."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, port: int, host: str = "127.0.0.1") -> RawClient:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 5)
        client = cls(reader, writer)
        code, _ = await client.reply()
        assert code == 220
        return client

    async def reply(self, wait: float = 5) -> tuple[int, str]:
        """One (possibly multi-line) reply: code and the lines' text joined by newlines."""
        lines = []
        while True:
            raw = await asyncio.wait_for(self.reader.readline(), wait)
            if not raw:
                raise ConnectionError("connection closed")
            line = raw.decode("utf-8", "replace").rstrip("\r\n")
            lines.append(line)
            if line[3:4] != "-":
                return int(line[:3]), "\n".join(lines)

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def cmd(self, line: str | bytes) -> tuple[int, str]:
        data = line if isinstance(line, bytes) else line.encode("utf-8")
        await self.send(data + b"\r\n")
        return await self.reply()

    async def start_data(self) -> None:
        """EHLO, MAIL, RCPT (to example.com, served by make_config) and DATA, each accepted."""
        assert (await self.cmd("EHLO client.test"))[0] == 250
        assert (await self.cmd("MAIL FROM:<s@example.org>"))[0] == 250
        assert (await self.cmd("RCPT TO:<user@example.com>"))[0] == 250
        assert (await self.cmd("DATA"))[0] == 354

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()

    async def __aenter__(self) -> RawClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def raw_client(port: int) -> RawClient:
    return await RawClient.connect(port)
