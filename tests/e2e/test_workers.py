"""``[server] workers = 2``: a supervisor, two worker processes, one relay to the outside.

One ``relay run`` subprocess for the module (text logs), sinks in-process;
the tests run in file order on that daemon. Route Corp delivers to a sink;
route Later points at a port where nothing listens until the kill -9 test
starts a sink there. The last tests restart the spool with other worker
counts (orphan shards adopted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from relay import shards
from relay.spool import Spool
from tests.support import configs
from tests.support.console import console_config, login
from tests.support.opsd import cli, http_get, samples, send, value, wait_log
from tests.support.procs import RelayProcess, free_port, pid_alive
from tests.support.sink import Sink
from tests.support.wait import until

pytestmark = pytest.mark.asyncio(loop_scope="module")

SENDER = "s@sender.test"


def config_text(
    tmp: Path, smtp: int | list[int], metrics: int, corp: int, later: int, count: object
) -> str:
    routes = configs.route("Corp", port=corp) + configs.route("Later", port=later)
    rules = configs.rule("Later", "@later.test") + configs.rule("Corp", "*")
    return configs.daemon_toml(
        tmp, smtp, metrics, ["corp.test", "later.test"], routes, rules,
        server={"workers": count},
        queue={"min_backoff": "1h", "max_backoff": "10h"},
        delivery={"hold_down": "1s", "max_hold_down": "1s"},
    )  # fmt: skip


@dataclass
class Relay:
    proc: RelayProcess
    path: Path
    tmp: Path
    smtp: int
    metrics: int
    corp: Sink
    later: int

    @property
    def spool(self) -> Path:
        return self.tmp / "spool"

    async def status(self) -> dict[str, object]:
        code, body = await http_get(self.metrics, "/status")
        assert code == 200, body
        report: dict[str, object] = json.loads(body)
        return report

    async def worker_pids(self) -> list[int | None]:
        """Each worker's pid; None while one is being started again."""
        report = await self.status()
        return [w["pid"] for w in report["workers"]]  # type: ignore[attr-defined]

    def shard_ids(self) -> list[set[str]]:
        """The queue ids waiting in each shard's msg/ and hold/."""
        out = []
        for path in shards.shard_paths(self.spool):
            spool = Spool(path)
            ids = {e.id for e in spool.load_all(quarantine=False)} | set(spool.hold.ids())
            out.append(ids)
        return out


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def relay(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Relay]:
    tmp = tmp_path_factory.mktemp("workers")
    async with Sink() as corp:
        smtp, metrics, later = free_port(), free_port(), free_port()
        path = tmp / "relay.toml"
        path.write_text(config_text(tmp, smtp, metrics, corp.port, later, 2))
        proc = RelayProcess(path, cwd=tmp)
        proc.start(wait_for="event=started")
        try:
            yield Relay(proc, path, tmp, smtp, metrics, corp, later)
        finally:
            proc.stop()


# --- the running supervisor ---------------------------------------------------


async def test_one_pid_file_and_two_workers_sharing_the_port(relay: Relay) -> None:
    pids = await relay.worker_pids()
    assert len(set(pids)) == 2
    pid_file = (relay.spool / "relay.pid").read_text().strip()
    assert pid_file == str(relay.proc.pid)
    for pid in pids:
        assert pid is not None and pid_alive(pid) and pid != relay.proc.pid
    # A worker's log line may follow its supervisor's by a loop turn (relay.events).
    await wait_log(relay.proc, "event=worker_started", count=2)
    assert relay.proc.log.count("event=started") == 1


async def test_mail_is_delivered_and_counted_once_over_the_workers(relay: Relay) -> None:
    sent = [await send(relay.smtp, SENDER, ["a@corp.test"]) for _ in range(10)]
    await until(lambda: len(relay.corp.messages) >= len(sent), 20, what="every message delivered")
    code, text = await http_get(relay.metrics, "/metrics")
    assert code == 200
    parsed = samples(text)
    assert value(parsed, "relay_messages_received_total") == len(sent)
    assert value(parsed, "relay_recipients_total", route="Corp", outcome="delivered") == len(sent)
    assert value(parsed, "relay_workers_up") == 2
    assert value(parsed, "relay_config_reloads_total", result="success") == 0
    assert value(parsed, "relay_host_up", route="Corp", host="127.0.0.1") == 1
    assert value(parsed, "relay_queue_messages") == 0


async def test_relay_status_is_one_report_with_a_line_per_worker(relay: Relay) -> None:
    result = await cli(relay.proc, relay.path, "status")
    assert result.returncode == 0, result.stderr
    assert f"pid {relay.proc.pid}" in result.stdout
    assert "worker 0: pid" in result.stdout and "worker 1: pid" in result.stdout
    report = await relay.status()
    assert sum(w["accepted"] for w in report["workers"]) == 10  # type: ignore[attr-defined]
    code, body = await http_get(relay.metrics, "/healthz")
    assert code == 200, body


async def test_queue_commands_see_every_shard(relay: Relay) -> None:
    ids: list[str] = []
    for _ in range(60):
        ids.append(await send(relay.smtp, SENDER, ["x@later.test"]))
        if min(map(len, relay.shard_ids())) >= 2:
            break
    assert min(map(len, relay.shard_ids())) >= 2, "both shards hold waiting messages"
    listed = await cli(relay.proc, relay.path, "queue", "list", "--json")
    assert {m["id"] for m in json.loads(listed.stdout)["messages"]} == set(ids)
    one_in_shard_1 = sorted(relay.shard_ids()[1])[0]
    shown = await cli(relay.proc, relay.path, "queue", "show", one_in_shard_1)
    assert shown.returncode == 0 and "x@later.test" in shown.stdout
    held = await cli(relay.proc, relay.path, "queue", "hold", "--all")
    assert held.returncode == 0, held.stderr
    assert f"hold: {len(ids)} message(s)" in held.stdout
    released = await cli(relay.proc, relay.path, "queue", "release", "--all")
    assert f"release: {len(ids)} message(s)" in released.stdout, released.stderr
    doomed = [sorted(shard)[0] for shard in relay.shard_ids()]  # one of each
    gone = await cli(relay.proc, relay.path, "queue", "delete", "--yes", *doomed)
    assert "deleted 2 message(s)" in gone.stdout
    assert sum(map(len, relay.shard_ids())) == len(ids) - 2


async def test_reload_is_checked_and_audited_once_and_reaches_every_worker(relay: Relay) -> None:
    result = await cli(relay.proc, relay.path, "reload")
    assert result.returncode == 0, result.stderr
    await wait_log(relay.proc, "event=config_applied reason=reload", count=3)  # supervisor + 2
    audit = [json.loads(line) for line in (relay.tmp / "audit.log").read_text().splitlines()]
    assert [e["event"] for e in audit if "queue" not in e["event"]] == ["start", "reload"]
    code, text = await http_get(relay.metrics, "/metrics")
    assert value(samples(text), "relay_config_reloads_total", result="success") == 1


async def test_a_reload_that_adds_a_listener_binds_it_in_every_worker(relay: Relay) -> None:
    extra = free_port()
    relay.path.write_text(
        config_text(relay.tmp, [relay.smtp, extra], relay.metrics, relay.corp.port, relay.later, 2)
    )
    relay.proc.reload()
    await wait_log(relay.proc, "event=listen_changed", count=2)  # each worker binds it
    before = len(relay.corp.messages)
    for _ in range(6):  # over several connections: the kernel picks a worker for each
        await send(extra, SENDER, ["b@corp.test"])
    await until(lambda: len(relay.corp.messages) >= before + 6, 20, what="mail via the new port")


async def test_flush_signal_reaches_every_worker(relay: Relay) -> None:
    # One waiting message of each shard: each worker tries its own at once.
    chosen = [sorted(ids)[0] for ids in relay.shard_ids()]
    tried = {qid: relay.proc.log.count(f"event=deferred id={qid}") for qid in chosen}
    relay.proc.signal(signal.SIGUSR1)
    for qid in chosen:
        await wait_log(relay.proc, f"event=deferred id={qid}", count=tried[qid] + 1)


async def test_kill_9_of_a_worker_loses_nothing_and_it_is_started_again(relay: Relay) -> None:
    waiting = relay.shard_ids()
    assert waiting[1], "worker 1's shard holds mail"
    victim = (await relay.worker_pids())[1]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    await wait_log(relay.proc, "event=worker_died worker=1")
    await _started_again(relay, victim)
    assert relay.shard_ids() == waiting
    # The Later hop comes up: a flush delivers every message, from both shards.
    async with Sink(port=relay.later) as later:
        total = sum(map(len, waiting))
        # A flush at the moment a hold-down ends defers all but the probe
        # (relay.health): flush again until the probe said the host is up.
        for _ in range(20):
            result = await cli(relay.proc, relay.path, "queue", "flush")
            assert result.returncode == 0, result.stderr
            with contextlib.suppress(TimeoutError):
                await until(lambda: len(later.messages) >= total, 1, what="the mail delivered")
                break
        assert len(later.messages) == total
    assert not any(relay.shard_ids())
    code, text = await http_get(relay.metrics, "/metrics")
    assert value(samples(text), "relay_worker_restarts_total") == 1


async def _started_again(relay: Relay, victim: int) -> None:
    """Wait (bounded) until worker 1 runs again, under a new pid, and answers."""
    for _ in range(150):
        report = await relay.status()
        worker = report["workers"][1]  # type: ignore[index]
        if worker["pid"] not in (None, victim) and worker["up"]:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"worker 1 not started again: {report}")


async def test_a_worker_that_dies_again_soon_waits_longer(relay: Relay) -> None:
    """A crash loop backs off (1 s, 2 s, ... 30 s), rather than spinning."""
    victim = (await relay.worker_pids())[1]
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    await wait_log(relay.proc, f"event=worker_died worker=1 pid={victim} code=-9 restart_in=2.0")
    await _started_again(relay, victim)
    code, text = await http_get(relay.metrics, "/metrics")
    assert value(samples(text), "relay_worker_restarts_total") == 2


async def test_sigterm_stops_every_worker(relay: Relay) -> None:
    pids = await relay.worker_pids()
    assert relay.proc.stop() == 0
    for pid in pids:
        assert pid is not None and not pid_alive(pid)
    assert relay.proc.log.count("event=worker_stopped") == 2
    assert not (relay.spool / "relay.pid").exists()


async def test_fewer_workers_adopt_the_orphan_shards(relay: Relay) -> None:
    """2 workers -> 1: shard 1's mail moves into the spool itself and is delivered."""
    relay.path.write_text(
        config_text(relay.tmp, relay.smtp, relay.metrics, relay.corp.port, relay.later, 2)
    )
    relay.proc.start(wait_for="event=started")
    ids = []
    for _ in range(60):
        ids.append(await send(relay.smtp, SENDER, ["y@later.test"]))
        if all(relay.shard_ids()):
            break
    assert relay.proc.stop() == 0
    relay.path.write_text(
        config_text(relay.tmp, relay.smtp, relay.metrics, relay.corp.port, relay.later, 1)
    )
    relay.proc.start(wait_for="event=started")
    assert "event=shard_adopted shard=1 into=0" in relay.proc.log
    assert shards.shard_indexes(relay.spool) == [0]
    assert relay.shard_ids() == [set(ids)]
    async with Sink(port=relay.later) as later:
        for _ in range(20):
            relay.proc.signal(signal.SIGUSR1)
            with contextlib.suppress(TimeoutError):
                await until(lambda: len(later.messages) >= len(ids), 1, what="the mail delivered")
                break
        assert len(later.messages) == len(ids)
    assert relay.proc.stop() == 0


async def test_workers_stop_when_the_supervisor_is_killed(relay: Relay) -> None:
    """kill -9 of the supervisor: its workers notice and stop (no orphan keeps
    the port or a shard), and the relay starts again on the same spool."""
    relay.path.write_text(
        config_text(relay.tmp, relay.smtp, relay.metrics, relay.corp.port, relay.later, 2)
    )
    relay.proc.start(wait_for="event=started")
    pids = await relay.worker_pids()
    os.kill(relay.proc.pid, signal.SIGKILL)
    relay.proc.wait(10)
    await until(
        lambda: not any(pid_alive(p) for p in pids if p is not None), 15, what="workers gone"
    )
    relay.proc.start(wait_for="event=started")
    assert relay.proc.stop() == 0


async def test_the_console_runs_in_worker_0_and_acts_on_every_shard(tmp_path: Path) -> None:
    smtp, metrics, admin, down = free_port(), free_port(), free_port(), free_port()
    path = tmp_path / "relay.toml"
    text = console_config(tmp_path, smtp, metrics, admin, down)  # nothing listens on `down`
    path.write_text(text.replace("[server]\n", "[server]\nworkers = 2\n", 1))
    with RelayProcess(path, cwd=tmp_path) as proc:
        proc.wait_log("event=started", 15)
        spool = tmp_path / "spool"
        for _ in range(60):
            await send(smtp, SENDER, ["a@example.com"])
            ids = [
                {e.id for e in Spool(p).load_all(quarantine=False)}
                for p in shards.shard_paths(spool)
            ]
            if len(ids) == 2 and all(ids):
                break
        assert len(ids) == 2 and all(ids), "both shards hold a waiting message"
        other = sorted(ids[1])[0]  # in worker 1's shard
        base = f"http://127.0.0.1:{admin}"
        client, csrf = await login(base)
        try:
            async with client.get(f"{base}/api/queue") as response:
                listed = {m["id"] for m in (await response.json())["messages"]}
            assert listed == ids[0] | ids[1]
            async with client.get(f"{base}/api/queue/{other}") as response:
                assert response.status == 200
            headers = {"X-CSRF-Token": csrf}
            async with client.post(
                f"{base}/api/queue/hold", json={"ids": [other]}, headers=headers
            ) as response:
                assert (await response.json())["done"] == [other], await response.text()
            assert Spool(shards.shard_path(spool, 1)).hold.ids() == [other]
        finally:
            await client.close()
