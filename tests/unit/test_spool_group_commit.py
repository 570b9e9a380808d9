"""Group commit in the spool: one directory fsync covers concurrent writers, never early."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

from relay.envelope import ClientInfo, Envelope, RcptState, Recipient
from relay.errors import SpoolError
from relay.groupcommit import GroupSync
from relay.spool import Spool
from relay.spoolbody import IN_MEMORY_MAX
from relay.spoolfiles import new_id
from tests.support.queue import open_spool


class SlowSync:
    """A blocking sync that takes ``seconds`` and counts its calls (starts and ends)."""

    def __init__(self, seconds: float = 0.05, fail: bool = False) -> None:
        self.seconds = seconds
        self.fail = fail
        self.started = 0
        self.finished = 0
        self.lock = threading.Lock()
        self.running = threading.Event()

    def __call__(self) -> None:
        with self.lock:
            self.started += 1
        self.running.set()
        time.sleep(self.seconds)
        with self.lock:
            self.finished += 1
        if self.fail:
            raise OSError(5, "Input/output error")


def wait(group: GroupSync) -> None:
    """Block until a sync that started after this call has completed, as a
    spool thread's caller does; raise its OSError if it failed."""
    finished = threading.Event()
    outcome: list[OSError | None] = []

    def done(error: OSError | None) -> None:
        outcome.append(error)
        finished.set()

    group.submit(done)
    assert finished.wait(10), "no sync served the caller"
    if outcome[0] is not None:
        raise outcome[0]


def envelope() -> Envelope:
    return Envelope(
        id=new_id(),
        mail_from="alice@example.net",
        recipients=[Recipient("bob@example.org")],
        client=ClientInfo("127.0.0.1", "client.test"),
    )


def waiters(group: GroupSync, count: int) -> list[BaseException | None]:
    """``count`` threads call ``wait(group)`` at once; what each one got."""
    results: list[BaseException | None] = [None] * count
    start = threading.Barrier(count)

    def one(index: int) -> None:
        start.wait()
        try:
            wait(group)
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive(), "a waiter hung"
    return results


def test_concurrent_waiters_share_few_syncs() -> None:
    sync = SlowSync()
    group = GroupSync(sync)
    assert waiters(group, 20) == [None] * 20
    # The first arrival runs one; everyone who came while it ran shares the next.
    assert sync.finished <= 2
    assert group.served == 20


def test_a_waiter_arriving_during_a_sync_waits_for_the_next_one() -> None:
    sync = SlowSync(seconds=0.1)
    group = GroupSync(sync)
    first = threading.Thread(target=wait, args=(group,))
    first.start()
    assert sync.running.wait(5)  # the first sync is now running
    wait(group)
    # Its rename may have come after the first sync began: only a second
    # sync, started after it asked, covers it.
    assert sync.finished == 2
    first.join(5)


def test_a_failed_sync_fails_every_waiter_it_served() -> None:
    group = GroupSync(SlowSync(fail=True))
    results = waiters(group, 3)
    assert all(isinstance(r, OSError) for r in results)


def test_a_later_successful_sync_serves_after_a_failed_one() -> None:
    sync = SlowSync(fail=True)
    group = GroupSync(sync)
    with pytest.raises(OSError):
        wait(group)
    sync.fail = False
    wait(group)  # the failure is not sticky: the next sync is what counts
    assert group.syncs == 2


async def test_async_api_round_trip_with_fsync(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")  # fsync on, as in production
    spool.open()
    try:
        env = envelope()
        await spool.put_async(env, b"Subject: hi\r\n\r\nbody\r\n")
        stored, body = await spool.open_async(env.id, IN_MEMORY_MAX)
        assert (stored.id, body) == (env.id, b"Subject: hi\r\n\r\nbody\r\n")
        assert stored.size == len(body)
        env.recipients[0].state = RcptState.DELIVERED
        await spool.update_async(env)
        assert spool.load(env.id).recipients[0].state is RcptState.DELIVERED
        assert await spool.delete_async(env.id)
        assert not await spool.delete_async(env.id)
        assert list(spool.msg_dir.iterdir()) == []
        with pytest.raises(KeyError):
            await spool.open_async(env.id, IN_MEMORY_MAX)
    finally:
        spool.close()


async def test_concurrent_puts_are_all_durable_with_fewer_directory_fsyncs(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        envelopes = [envelope() for _ in range(40)]
        await asyncio.wait_for(
            asyncio.gather(*(spool.put_async(e, b"x\r\n" * 100) for e in envelopes)), 30
        )
        assert spool.group.served == 40
        assert spool.group.syncs < 40
        names = {p.name for p in spool.msg_dir.iterdir()}
        assert names == {f"{e.id}.msg" for e in envelopes}  # one file each
        assert list(spool.tmp_dir.iterdir()) == []
    finally:
        spool.close()


def test_a_sync_that_cannot_run_fails_its_waiters_instead_of_hanging() -> None:
    # Any exception from the sync must reach the waiters as an OSError
    # (451 to the client), and leave the group usable: never a hang.
    def broken() -> None:
        raise RuntimeError("cannot sync")

    group = GroupSync(broken)
    assert all(isinstance(r, OSError) for r in waiters(group, 3))
    with pytest.raises(OSError):
        wait(group)


async def test_a_failed_directory_fsync_undoes_the_put(tmp_path: Path) -> None:
    # No 250 without a durable message, and no message left that nobody was
    # promised: the renamed file is removed again and the client gets 451.
    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        spool.group = GroupSync(SlowSync(seconds=0, fail=True))
        with pytest.raises(SpoolError):
            await spool.put_async(envelope(), b"x\r\n")
        assert list(spool.msg_dir.iterdir()) == []
    finally:
        spool.close()


async def test_a_delete_waits_for_a_directory_fsync(tmp_path: Path) -> None:
    # The delete of a delivered message is its only durable record (no
    # state write before it): it must not be undone by a power cut.
    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        env = envelope()
        await spool.put_async(env, b"x\r\n")
        served = spool.group.served
        assert await asyncio.wait_for(spool.delete_async(env.id), 10)
        assert spool.group.served == served + 1
        assert list(spool.msg_dir.iterdir()) == []
        assert not await spool.delete_async(env.id)
    finally:
        spool.close()


def test_a_sync_interrupted_by_any_exception_serves_nobody_as_durable() -> None:
    # Not only Exception: whatever stops the fsync, no caller it was meant
    # to cover may be told its write is durable.
    def interrupted() -> None:
        raise SystemExit(1)

    results = waiters(GroupSync(interrupted), 3)
    assert all(isinstance(r, OSError) for r in results)


def test_each_caller_gets_its_own_error() -> None:
    # One exception raised in many threads would collect every thread's
    # traceback and keep their frames (and message bytes) alive.
    results = waiters(GroupSync(SlowSync(fail=True)), 4)
    assert all(isinstance(r, OSError) for r in results)
    assert len({id(r) for r in results}) == 4
    assert {r.errno for r in results if isinstance(r, OSError)} == {5}


async def test_one_sync_covers_a_burst_larger_than_the_thread_pool(tmp_path: Path) -> None:
    # Writers wait for the directory fsync without holding a spool thread,
    # so a burst of 200 shares a few fsyncs even when each takes 10 ms
    # (waiting in the pool's 8 threads, it took 50).
    spool = open_spool(tmp_path)
    try:
        spool.group = GroupSync(SlowSync(seconds=0.01))
        envelopes = [envelope() for _ in range(200)]
        await asyncio.wait_for(
            asyncio.gather(*(spool.put_async(e, b"x\r\n" * 10) for e in envelopes)), 30
        )
        assert spool.group.served == 200
        # Waiting in the 8 threads, one fsync covered at most 8 writers: 25
        # at the very least. (Not a tighter bound: on a loaded machine the
        # writes trickle in and more, smaller batches are fine.)
        assert spool.group.syncs < 200 // 8
    finally:
        spool.close()


class ListingSync:
    """A directory fsync that first records which names ``msg/`` holds as it starts."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.seen: list[set[str]] = []

    def __call__(self) -> None:
        self.seen.append({p.name for p in self.directory.iterdir()})


async def test_the_covering_sync_starts_after_the_rename_and_the_unlink(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    try:
        listing = ListingSync(spool.msg_dir)
        spool.group = GroupSync(listing)
        env = envelope()
        await spool.put_async(env, b"x\r\n")
        assert f"{env.id}.msg" in listing.seen[-1]
        env.recipients[0].state = RcptState.DELIVERED
        assert await spool.update_async(env)
        assert f"{env.id}.state" in listing.seen[-1]
        assert await spool.delete_async(env.id)
        assert not {f"{env.id}.msg", f"{env.id}.state"} & listing.seen[-1]
        syncs = spool.group.syncs
        assert not await spool.delete_async(env.id)  # nothing there: no fsync needed
        assert spool.group.syncs == syncs
    finally:
        spool.close()


async def test_the_undo_of_a_failed_put_is_itself_fsynced(tmp_path: Path) -> None:
    spool = open_spool(tmp_path)
    synced: list[set[str]] = []
    try:
        spool.group = GroupSync(SlowSync(seconds=0, fail=True))
        spool._sync_msg_dir = lambda: synced.append(  # type: ignore[method-assign]
            {p.name for p in spool.msg_dir.iterdir()}
        )
        with pytest.raises(SpoolError):
            await spool.put_async(envelope(), b"x\r\n")
        assert synced == [set()]  # fsynced once the file was gone again
    finally:
        spool.close()


def test_only_a_missing_file_means_no_body(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The scheduler takes "no body" for `relay queue delete` and removes the
    # envelope: a disk error must not look like that.
    spool = open_spool(tmp_path)
    env = envelope()
    spool.put(env, b"x\r\n")
    assert spool.has_body(env.id)
    assert not spool.has_body(new_id())
    real_stat = os.stat

    def failing_stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
        if str(path).endswith(".msg"):
            raise OSError(5, "Input/output error")
        return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", failing_stat)
    with pytest.raises(OSError):
        spool.has_body(env.id)
