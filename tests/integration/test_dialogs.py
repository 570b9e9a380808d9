"""SMTP dialogs as data: each tests/data/dialogs/*.txt is one session with a real inbound server.

The file format is in tests/data/dialogs/README.md: ``C:`` lines the client
sends, ``S:`` the reply expected next, and a few checks at the end. The
server is relay's own Inbound on 127.0.0.1 with the inbound tests' config
(tests/support/inbound.py), one per dialog.
"""

from __future__ import annotations

import asyncio
import codecs
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.support.inbound import RawClient, make_config, running_inbound
from tests.support.paths import DATA

DIALOGS = DATA / "dialogs"


@dataclass
class Step:
    where: str  # file:line, for the failure message
    kind: str  # "C", "S" or "closed"
    data: bytes = b""
    expected: str = ""


@dataclass
class Dialog:
    server: list[str] = field(default_factory=list)
    steps: list[Step] = field(default_factory=list)
    rejected: dict[str, int] = field(default_factory=dict)
    spooled: int | None = None


def unescape(text: str) -> bytes:
    """The client line's bytes: UTF-8, with backslash escapes (``\\r``, ``\\x00``...)."""
    data: bytes = codecs.escape_decode(text.encode("utf-8"))[0]  # type: ignore[attr-defined]
    return data


def parse(path: Path) -> Dialog:
    dialog = Dialog()
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        where = f"{path.name}:{number}"
        line = raw.rstrip()
        if not line or line.startswith("#"):
            continue
        key, colon, value = line.partition(":")
        value = value.removeprefix(" ")
        if line == "closed":
            dialog.steps.append(Step(where, "closed"))
        elif colon and key == "C":
            dialog.steps.append(Step(where, "C", data=unescape(value)))
        elif colon and key == "S":
            dialog.steps.append(Step(where, "S", expected=value))
        elif colon and key == "config":
            dialog.server.append(value)
        elif colon and key == "rejected":
            reason, count = value.split()
            dialog.rejected[reason] = int(count)
        elif colon and key == "spooled":
            dialog.spooled = int(value)
        else:
            raise ValueError(f"{where}: not a dialog line: {raw!r}")
    return dialog


async def run(client: RawClient, steps: list[Step]) -> None:
    for step in steps:
        if step.kind == "C":
            await client.send(step.data + b"\r\n")
        elif step.kind == "S":
            _, text = await client.reply()
            assert text.startswith(step.expected), (
                f"{step.where}: expected {step.expected!r}, got {text!r}"
            )
        else:
            rest = await client.reader.read()
            assert rest == b"", f"{step.where}: expected the connection closed, got {rest!r}"


@pytest.mark.parametrize("path", sorted(DIALOGS.glob("*.txt")), ids=lambda path: path.stem)
async def test_dialog(tmp_path: Path, path: Path) -> None:
    dialog = parse(path)
    config = make_config(tmp_path, extra_server="\n".join(dialog.server))
    async with running_inbound(config) as h:
        reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", h.port), 5)
        async with RawClient(reader, writer) as client:
            await run(client, dialog.steps)
        for reason, count in dialog.rejected.items():
            assert h.rejected(reason) == count, f"{path.name}: rejected {reason}"
        if dialog.spooled is not None:
            assert len(h.spooled()) == dialog.spooled, f"{path.name}: spooled"
