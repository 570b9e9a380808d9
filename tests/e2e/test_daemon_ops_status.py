"""``relay status`` against a running daemon: a next hop held down, a reload, no daemon.

One ``relay run`` subprocess; its route "Sick" points at a closed port, so
the first message marks that host down. Nothing is mocked: the CLI reads
``GET /status`` on the daemon's metrics listener. Also /healthz, which
follows whether the spool is really writable.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import errors
from tests.support import configs
from tests.support.fs import tmpfs
from tests.support.hosts import closed_port
from tests.support.inbound import RawClient
from tests.support.opsd import cli, http_get, samples, send, value, wait_log
from tests.support.procs import RelayProcess, free_port
from tests.support.sink import Sink
from tests.support.wait import until

SENDER = "s@sender.test"


def write_config(path: Path, tmp: Path, smtp: int, metrics: int, routes: str, rules: str) -> None:
    text = configs.daemon_toml(
        tmp, smtp, metrics, ["example.com", "other.com"], routes, rules,
        queue={"min_backoff": "1h"}, delivery={"connect_timeout": "2s", "hold_down": "10m"},
    )  # fmt: skip
    path.write_text(text)


def host_entry(report: dict[str, object], route: str) -> list[dict[str, object]]:
    for entry in report["routes"]:  # type: ignore[attr-defined]
        if entry["route"] == route:
            return list(entry["hosts"])
    raise AssertionError(f"no route {route!r} in {report}")


async def test_status_shows_a_held_down_host_and_survives_a_reload(tmp_path: Path) -> None:
    smtp, metrics, sick, other = free_port(), free_port(), closed_port(), closed_port()
    path = tmp_path / "relay.toml"
    routes = configs.route("Sick", port=sick) + configs.route("Other", port=other)
    rules = configs.rule("Sick", "@example.com") + configs.rule("Other", "@other.com")
    write_config(path, tmp_path, smtp, metrics, routes, rules)
    proc = RelayProcess(path, cwd=tmp_path).start(wait_for="event=started")
    try:
        await send(smtp, SENDER, ["a@example.com"])
        await send(smtp, SENDER, ["b@other.com"])
        await wait_log(proc, "event=host_down", count=2)

        done = await cli(proc, path, "status", "--json")
        assert done.returncode == 0, done.stderr
        report = json.loads(done.stdout)
        assert report["version"] and report["config_sha256"] and report["queue"] == 2
        assert report["uptime"] >= 0
        (host,) = host_entry(report, "Sick")
        assert host["host"] == "127.0.0.1" and host["port"] == sick
        assert host["state"] == "down" and host["last_error"]
        assert host["next_probe"] > report["now"]

        text = await cli(proc, path, "status")
        assert text.returncode == 0, text.stderr
        assert f"DOWN 127.0.0.1:{sick} (primary)" in text.stdout
        assert "last error:" in text.stdout and "next probe: in " in text.stdout

        _, exposition = await http_get(metrics, "/metrics")
        parsed = samples(exposition)
        assert value(parsed, "relay_host_up", route="Sick", host="127.0.0.1") == 0
        changes = "relay_host_state_changes_total"
        assert value(parsed, changes, route="Sick", host="127.0.0.1", state="down") == 1

        # Reload: route Sick keeps its host (still down), route Other's host
        # is replaced (its hold-down is forgotten with it).
        replaced = closed_port()
        routes = configs.route("Sick", port=sick) + configs.route("Other", port=replaced)
        write_config(path, tmp_path, smtp, metrics, routes, rules)
        assert (await cli(proc, path, "reload")).returncode == 0
        await wait_log(proc, "event=config_applied", count=2)
        report = json.loads((await cli(proc, path, "status", "--json")).stdout)
        assert [h["state"] for h in host_entry(report, "Sick")] == ["down"]
        (fresh,) = host_entry(report, "Other")
        assert fresh["port"] == replaced and fresh["state"] == "up"
        assert not any(r["route"] == "(mx)" for r in report["routes"])

        # The host comes back; `relay queue flush` ends its 10-minute
        # hold-down (as Postfix's flush retries dead destinations).
        async with Sink(port=sick) as back:
            assert (await cli(proc, path, "queue", "flush")).returncode == 0
            await wait_log(proc, "event=host_up")
            await until(lambda: len(back.messages) == 1, what="the held mail delivered")
        report = json.loads((await cli(proc, path, "status", "--json")).stdout)
        assert [h["state"] for h in host_entry(report, "Sick")] == ["up"]
    finally:
        proc.stop()


async def test_status_exits_1_without_a_daemon(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    routes = configs.route("Sick", port=closed_port())
    write_config(path, tmp_path, free_port(), free_port(), routes, configs.rule("Sick", "*"))
    done = await cli(RelayProcess(path, cwd=tmp_path), path, "status")
    assert done.returncode == 1
    assert "no running relay answered" in done.stderr


# Operations at the daemon level: /healthz follows whether the spool is really writable.
#
# The spool lives on a small tmpfs the test mounts (tests run as root;
# skipped where mounting is not allowed) and remounts read-only while
# ``relay run`` keeps running, then read-write again.


@pytest.fixture
def spool_fs(tmp_path: Path) -> Iterator[Path]:
    with tmpfs(tmp_path / "fs", "1m") as mount:
        yield mount


async def remount(mount: Path, mode: str) -> None:
    proc = await asyncio.create_subprocess_exec(
        "mount", "-o", f"remount,{mode}", str(mount), stderr=asyncio.subprocess.PIPE
    )
    _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()


async def test_healthz_503_while_spool_is_read_only_then_200_again(
    tmp_path: Path, spool_fs: Path
) -> None:
    smtp, metrics = free_port(), free_port()
    path = tmp_path / "relay.toml"
    text = configs.daemon_toml(
        tmp_path, smtp, metrics, ["example.com"],
        configs.route("Sink", port=free_port()), configs.rule("Sink", "@example.com"),
        queue={"path": spool_fs / "spool", "min_backoff": "1h"},
    )  # fmt: skip
    path.write_text(text)
    proc = RelayProcess(path, cwd=tmp_path).start(wait_for="event=started")
    try:
        assert await http_get(metrics, "/healthz") == (200, "ok\n")
        await remount(spool_fs, "ro")
        try:
            assert await http_get(metrics, "/healthz") == (503, "spool not writable\n")
            # Not just a flag: the spool really cannot take mail now.
            async with await RawClient.connect(smtp) as client:
                await client.cmd("EHLO client.test")
                await client.cmd("MAIL FROM:<s@sender.test>")
                await client.cmd("RCPT TO:<a@example.com>")
                assert (await client.cmd("DATA"))[0] == 354
                await client.send(b"Subject: x\r\n\r\nbody\r\n.\r\n")
                assert await client.reply() == (451, str(errors.SPOOL_FAILED))
        finally:
            await remount(spool_fs, "rw")
        assert await http_get(metrics, "/healthz") == (200, "ok\n")
        await send(smtp, "s@sender.test", ["a@example.com"])
        _, text = await http_get(metrics, "/metrics")
        parsed = samples(text)
        assert value(parsed, "relay_messages_received_total") == 1
        assert value(parsed, "relay_messages_rejected_total", reason="spool_error") == 1
    finally:
        proc.stop()
