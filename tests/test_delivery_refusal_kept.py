"""A recipient refused for good (550) keeps its 550 when the connection is lost
later in the same transaction: each RCPT reply is recorded as it arrives (in
lock-step and in a pipelined group), so it is bounced, not retried.
"""

from __future__ import annotations

import pytest

from relay import errors
from tests.support.delivery import deliverer, make_config
from tests.support.sink import Sink
from tests.test_delivery_pipelining import _send

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize(
    ("pipelining", "third"),
    [(False, "421 4.3.2 shutting down"), (True, "drop")],
)
async def test_a_550_before_a_lost_connection_still_bounces(pipelining, third):
    replies = {"RCPT bad@x.test": "550 5.1.1 no such user", "RCPT c@x.test": third}
    async with Sink(pipelining=pipelining, replies=replies) as sink:
        d = deliverer(make_config())
        try:
            (attempt,) = await _send(d, sink, 1, "bad@x.test", "b@x.test", "c@x.test", "e@x.test")
        finally:
            await d.close()
    assert attempt.outcome("bad@x.test") == errors.BOUNCED
