"""`relay queue delete` of a just-accepted message before its first attempt.

The first attempt of a message handed over in memory (Scheduler.add with
its body) checks that the message is still in the spool: a message the
operator deleted while it waited for a delivery slot is dropped, not sent.
"""

from __future__ import annotations

from tests.support.queue import BODY, harness, running, settle, spool_message


async def test_a_message_deleted_before_its_first_attempt_is_not_delivered(tmp_path) -> None:
    h = harness(tmp_path)
    env = spool_message(h.spool, ["bob@example.com"])
    # As inbound hands it over after the 250 (envelope and body in memory).
    h.scheduler.add(env, (BODY,))
    # The scheduler is busy (max_concurrency); meanwhile the operator runs
    # `relay queue delete ID` (another process: Spool.delete).
    assert h.spool.delete(env.id)
    async with running(h.scheduler):
        await settle(h.scheduler)
    assert h.deliverer.calls == []
