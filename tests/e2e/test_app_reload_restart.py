"""A reload cannot move the spool or the metrics listener: refused, never half-applied.

``queue.path`` (and the pid file in it) and ``metrics.listen`` are bound at
start. A reload changing either is refused like an invalid one -- counted
as an error, audited as reload_refused -- and the old config runs on, so
``relay reload`` / ``relay queue`` keep finding the daemon and its spool.
Overlapping reloads (two SIGHUPs close together) run one after the other.
"""

from __future__ import annotations

import asyncio
import json
import signal
import smtplib
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import configload, keeper
from relay.app import Daemon
from relay.config import Config
from tests.support.inbound import inbound_toml
from tests.support.procs import DaemonUnderTest, free_port

MSG = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[DaemonUnderTest]:
    with DaemonUnderTest(tmp_path) as daemon:
        yield daemon


def test_reload_moving_spool_and_metrics_is_refused_and_old_config_runs_on(
    relay: DaemonUnderTest,
) -> None:
    relay.process.start(wait_for="event=started")
    with smtplib.SMTP("127.0.0.1", relay.port, timeout=10) as client:
        client.ehlo("client.test")
        assert client.sendmail("s@example.org", ["user@example.com"], MSG) == {}
    new_metrics = free_port()
    relay.write(spool=relay.tmp_path / "elsewhere", metrics=new_metrics)
    relay.process.signal(signal.SIGHUP)
    relay.process.wait_log("event=reload_failed")
    log = relay.process.log
    old_spool = relay.tmp_path / "spool"
    assert f"queue: path: changing it needs a restart; the running relay keeps {old_spool}" in log
    assert (
        "metrics: listen: changing it needs a restart; "
        f"the running relay keeps 127.0.0.1:{relay.metrics_port}" in log
    )
    assert "reason=reload" not in log and "reload_needs_restart" not in log
    # Counted as an error on the listener that still runs; audited as refused.
    assert relay.reloads("error") == "1.0" and relay.reloads("success") == "0.0"
    refused = relay.audit_entries()[-1]
    assert refused["event"] == "reload_refused"
    assert len(refused["problems"]) == 2  # type: ignore[arg-type]

    # The old config runs on: back to it, the CLI finds the daemon and its spool.
    relay.write()
    listed = relay.cli("queue", "list")
    assert listed.returncode == 0 and "1 message(s)" in listed.stdout, listed
    done = relay.cli("reload")
    assert done.returncode == 0, done.stderr
    relay.process.wait_log("reason=reload")


def test_queue_durations_apply_on_reload(relay: DaemonUnderTest) -> None:
    relay.process.start(wait_for="event=started")
    relay.write(lifetime="2d")
    relay.process.signal(signal.SIGHUP)
    relay.process.wait_log("reason=reload")
    assert relay.reloads("success") == "1.0" and relay.reloads("error") == "0.0"
    reload = relay.audit_entries()[-1]
    assert reload["event"] == "reload"
    assert reload["changes"]["queue"]["max_lifetime"] == [432000.0, 172800.0]  # type: ignore[index]


def _config(tmp_path: Path, **kwargs: object) -> Config:
    text = inbound_toml(tmp_path / "spool", **kwargs)  # type: ignore[arg-type]
    return configload.parse(tomllib.loads(text), tmp_path / "relay.toml")


def test_restart_problems_names_only_path_and_metrics_listen(tmp_path: Path) -> None:
    old = _config(tmp_path, metrics="127.0.0.1:9325")
    same = _config(tmp_path, metrics="127.0.0.1:9325", timeout="1m")
    assert keeper.restart_problems(old, same) == []
    moved = configload.parse(
        tomllib.loads(inbound_toml(tmp_path / "other", metrics="")), tmp_path / "relay.toml"
    )
    problems = keeper.restart_problems(old, moved)
    assert [(p.where, p.field) for p in problems] == [("queue", "path"), ("metrics", "listen")]
    assert str(tmp_path / "spool") in problems[0].message


# Daemon.reload in-process: reloads that overlap run one after the other.
#
# Two SIGHUPs close together (a config-management run, then the sidecar)
# must not both compare with the same old config: each reload diffs, audits
# and swaps against the config the previous one left.


async def test_overlapping_reloads_apply_one_change_once(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    text = inbound_toml(tmp_path / "spool", listen=[f"127.0.0.1:{free_port()}"])
    text += f'\n[audit]\npath = "{tmp_path / "audit.log"}"\n'
    path.write_text(text)
    daemon = Daemon(lambda: configload.load(path))
    path.write_text(text.replace('hostname = "relay.test"', 'hostname = "relay2.test"'))
    try:
        assert await asyncio.gather(daemon.reload(), daemon.reload()) == [True, True]
    finally:
        await daemon.parts.deliverer.close()
    first, second = (json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines())
    assert first["changes"]["server"] == {"hostname": ["relay.test", "relay2.test"]}
    assert second["unchanged"] is True and second["changes"]["server"] == {}
    assert daemon.config().server.hostname == "relay2.test"
