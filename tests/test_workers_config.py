"""``[server] workers``: the setting, a worker's share of the config, and spool shards
(no processes here; tests/test_workers.py runs a supervisor)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from relay import configload, shards, workers
from relay.keeper import restart_problems
from relay.spool import Spool
from tests.support.procs import free_port
from tests.support.queue import legacy_message, spool_message
from tests.test_workers import config_text


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
