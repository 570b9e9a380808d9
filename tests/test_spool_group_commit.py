"""Group commit in the spool: one directory fsync covers concurrent writers, never early."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest

from relay.envelope import ClientInfo, Envelope, RcptState, Recipient
from relay.spool import IN_MEMORY_MAX, GroupSync, Spool, new_id


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


def envelope() -> Envelope:
    return Envelope(
        id=new_id(),
        mail_from="alice@example.net",
        recipients=[Recipient("bob@example.org")],
        client=ClientInfo("127.0.0.1", "client.test"),
    )


async def test_concurrent_waiters_share_one_sync() -> None:
    sync = SlowSync()
    group = GroupSync(sync, None)
    await asyncio.wait_for(asyncio.gather(*(group.wait() for _ in range(20))), 10)
    assert sync.finished == 1
    assert group.served == 20


async def test_a_waiter_arriving_during_a_sync_waits_for_the_next_one() -> None:
    sync = SlowSync(seconds=0.1)
    group = GroupSync(sync, None)
    first = asyncio.create_task(group.wait())
    assert await asyncio.to_thread(sync.running.wait, 5)  # the first sync is now running
    await asyncio.wait_for(group.wait(), 10)
    # Its rename may have come after the first sync began: only a second
    # sync, started after it asked, covers it.
    assert sync.finished == 2
    await first


async def test_a_failed_sync_fails_every_waiter_it_served() -> None:
    group = GroupSync(SlowSync(fail=True), None)
    results = await asyncio.wait_for(
        asyncio.gather(*(group.wait() for _ in range(3)), return_exceptions=True), 10
    )
    assert all(isinstance(r, OSError) for r in results)


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
        group = spool.group_sync()
        assert group.served == 40
        assert group.syncs < 40
        names = {p.name for p in spool.msg_dir.iterdir()}
        assert names == {f"{e.id}.msg" for e in envelopes}  # one file each
        assert list(spool.tmp_dir.iterdir()) == []
    finally:
        spool.close()


async def test_a_sync_that_cannot_run_fails_its_waiters_instead_of_hanging() -> None:
    # E.g. the spool's thread pool already shut down at exit: the waiters
    # must get an error (451 to the client), never wait forever.
    def gone() -> None:
        raise RuntimeError("cannot schedule new futures after shutdown")

    group = GroupSync(gone, None)
    with pytest.raises(OSError):
        await asyncio.wait_for(group.wait(), 5)


async def test_a_delete_waits_for_a_directory_fsync(tmp_path: Path) -> None:
    # The delete of a delivered message is its only durable record (no
    # state write before it): it must not be undone by a power cut.
    spool = Spool(tmp_path / "spool")
    spool.open()
    try:
        env = envelope()
        await spool.put_async(env, b"x\r\n")
        served = spool.group_sync().served
        assert await asyncio.wait_for(spool.delete_async(env.id), 10)
        assert spool.group_sync().served == served + 1
        assert list(spool.msg_dir.iterdir()) == []
        assert not await spool.delete_async(env.id)
    finally:
        spool.close()
