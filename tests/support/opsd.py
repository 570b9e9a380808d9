"""Helpers for the daemon-level ops tests: ``relay run`` as a subprocess, sinks in-process.

The sinks run on the test module's event loop while the relay delivers to
them from its own process, so nothing here may block that loop: log
waits, HTTP scrapes and CLI runs are all awaited.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.support.inbound import RawClient
from tests.support.procs import RelayProcess
from tests.support.wait import until

MSG = b"From: a@sender.test\r\nSubject: ops\r\n\r\nHello.\r\n"

#: (metric sample name, sorted label pairs) -> value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def wait_log(proc: RelayProcess, text: str, count: int = 1, within: float = 10) -> None:
    """Wait until ``text`` appears ``count`` times in the relay's stderr."""

    def seen() -> bool:
        assert proc.proc is not None
        if proc.proc.poll() is not None:
            raise AssertionError(f"relay exited {proc.proc.returncode}:\n{proc.log}")
        return proc.log.count(text) >= count

    try:
        await until(seen, within, what=f"{text!r} x{count}", interval=0.05)
    except TimeoutError as exc:
        raise AssertionError(f"{exc}\n{proc.log}") from None


async def http_get(port: int, path: str) -> tuple[int, str]:
    """One HTTP/1.0 GET on 127.0.0.1: (status code, body)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    try:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def samples(exposition: str) -> Samples:
    """Every sample of a Prometheus text exposition, parsed by prometheus_client."""
    out: Samples = {}
    for family in text_string_to_metric_families(exposition):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(parsed: Samples, name: str, **labels: str) -> float | None:
    return parsed.get((name, tuple(sorted(labels.items()))))


def matching(parsed: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """Every sample of ``name``, keyed by its labels."""
    return {labels: v for (n, labels), v in parsed.items() if n == name}


def nonzero(parsed: Samples, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of ``name`` that are not 0 (closed label sets start at 0)."""
    return {labels: v for labels, v in matching(parsed, name).items() if v}


async def send(
    port: int, sender: str, rcpts: list[str], ehlo: str = "client.test", body: bytes = MSG
) -> str:
    """One message over a fresh connection; the queue id from the 250."""
    async with await RawClient.connect(port) as client:
        assert (await client.cmd(f"EHLO {ehlo}"))[0] == 250
        return await send_on(client, sender, rcpts, body)


async def send_on(client: RawClient, sender: str, rcpts: list[str], body: bytes = MSG) -> str:
    """One transaction on an open session; the queue id from the 250."""
    code, text = await client.cmd(f"MAIL FROM:<{sender}>")
    assert code == 250, text
    for rcpt in rcpts:
        code, text = await client.cmd(f"RCPT TO:<{rcpt}>")
        assert code == 250, text
    code, text = await client.cmd("DATA")
    assert code == 354, text
    await client.send(body + b".\r\n")
    code, text = await client.reply()
    assert code == 250, text
    return text.split()[-1]


async def cli(proc: RelayProcess, config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m relay ARGS --config F``, off the loop."""
    return await asyncio.to_thread(proc.cli, *args, config=config)


def json_lines(log: str) -> list[dict[str, object]]:
    """Every stderr line as JSON (raises if one is not)."""
    return [json.loads(line) for line in log.splitlines() if line.strip()]
