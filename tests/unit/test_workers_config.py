"""``[server] workers``: the setting, a worker's share of the config, and spool shards
(no processes here; tests/e2e/test_workers.py runs a supervisor)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, generate_latest

from relay import configload, shards, workers
from relay.keeper import restart_problems
from relay.metrics import Metrics
from relay.metricsmerge import merge_expositions, merge_status
from relay.spool import Spool
from tests.support import configs
from tests.support.opsd import samples, value
from tests.support.procs import free_port
from tests.support.queue import legacy_message, spool_message


def config_text(tmp: Path, smtp: int, metrics: int, corp: int, later: int, count: object) -> str:
    routes = configs.route("Corp", port=corp) + configs.route("Later", port=later)
    rules = configs.rule("Later", "@later.test") + configs.rule("Corp", "*")
    return configs.daemon_toml(
        tmp, smtp, metrics, ["corp.test", "later.test"], routes, rules, server={"workers": count}
    )


def test_workers_auto_is_the_cores_this_process_may_use(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(config_text(tmp_path, free_port(), free_port(), 2526, 2527, "auto"))
    assert configload.load(path).server.workers == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("bad", [0, "many", 65])
def test_workers_out_of_range_is_refused(tmp_path: Path, bad: object) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(config_text(tmp_path, free_port(), free_port(), 2526, 2527, bad))
    with pytest.raises(configload.ConfigError, match="workers"):
        configload.load(path)


def test_changing_workers_needs_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(config_text(tmp_path, 2525, 9100, 2526, 2527, 2))
    old = configload.load(path)
    path.write_text(config_text(tmp_path, 2525, 9100, 2526, 2527, 3))
    problems = restart_problems(old, configload.load(path))
    assert [(p.where, p.field) for p in problems] == [("server", "workers")]


def test_a_worker_gets_its_shard_and_a_share_of_the_limits(tmp_path: Path) -> None:
    path = tmp_path / "relay.toml"
    path.write_text(config_text(tmp_path, 2525, 9100, 2526, 2527, 3))
    cfg = configload.load(path)
    first, last = workers.worker_config(cfg, 0, 3), workers.worker_config(cfg, 2, 3)
    assert first.queue.path == cfg.queue.path  # a one-process spool is shard 0 unchanged
    assert last.queue.path == cfg.queue.path / "shards" / "2"
    assert last.server.max_connections == 334  # 1000 / 3, rounded up
    assert last.delivery.max_concurrency == 7 and last.delivery.max_per_host == 2


def _opened(path: Path) -> Spool:
    spool = Spool(path, fsync=False)
    spool.open()
    return spool


def test_fewer_shards_move_the_orphans_messages_held_ones_too(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    zero, one, two = (_opened(shards.shard_path(root, i)) for i in range(3))
    kept = spool_message(zero, ["a@x.test"])
    moved = spool_message(two, ["b@x.test"])
    legacy = legacy_message(two, ["c@x.test"])
    held = spool_message(one, ["d@x.test"])
    one.hold.add([held.id])
    assert shards.shard_indexes(root) == [0, 1, 2]
    shards.adopt_orphans(root, 2)  # shard 2 -> shard 0, shard 1 stays
    assert shards.shard_indexes(root) == [0, 1]
    assert {e.id for e in _opened(root).load_all()} == {kept.id, moved.id, legacy.id}
    shards.adopt_orphans(root, 1)  # shard 1 -> shard 0: a held message stays held
    spool = _opened(root)
    assert shards.shard_indexes(root) == [0]
    assert spool.hold.ids() == [held.id]
    assert spool.load(moved.id).recipients[0].address == "b@x.test"


def test_more_shards_leave_the_spool_as_it_is(tmp_path: Path) -> None:
    root = tmp_path / "spool"
    message = spool_message(_opened(root), ["a@x.test"])
    assert shards.adopt_orphans(root, 4) == 0
    assert [e.id for e in _opened(root).load_all()] == [message.id]


def test_metrics_of_workers_are_summed_and_host_up_is_the_lowest() -> None:
    first, second = Metrics(), Metrics()
    first.messages_received.inc(3)
    second.messages_received.inc(4)
    first.delivery_seconds.labels("Corp").observe(0.02)
    second.delivery_seconds.labels("Corp").observe(7)
    first.host_up.labels("Corp", "mx").set(1)
    second.host_up.labels("Corp", "mx").set(0)
    first.config_reloads.labels("success").inc(5)  # each worker counts its own
    # The supervisor's own registry: reloads, counted once for all workers.
    registry = CollectorRegistry()
    reloads = Counter("relay_config_reloads_total", "Reloads.", ["result"], registry=registry)
    reloads.labels("success").inc()
    texts = [m.exposition().decode() for m in (first, second)]
    merged = samples(merge_expositions(texts, generate_latest(registry).decode()).decode())
    assert value(merged, "relay_messages_received_total") == 7
    assert value(merged, "relay_delivery_seconds_count", route="Corp") == 2
    assert value(merged, "relay_delivery_seconds_bucket", route="Corp", le="0.025") == 1
    assert value(merged, "relay_host_up", route="Corp", host="mx") == 0
    assert value(merged, "relay_config_reloads_total", result="success") == 1
    assert not [name for name, _ in merged if name.endswith("_created")]


def test_status_of_workers_sums_the_queue_and_shows_a_host_down_anywhere() -> None:
    def report(queue: int, state: str) -> dict[str, object]:
        host = {"host": "mx", "port": 25, "table": "primary", "state": state}
        return {"queue": queue, "routes": [{"route": "Corp", "hosts": [host]}]}

    merged = merge_status([report(2, "up"), None, report(3, "down")])
    assert merged["queue"] == 5
    (host,) = merged["routes"][0]["hosts"]
    assert host["state"] == "down" and host["down_in_workers"] == [2]
