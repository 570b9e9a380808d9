"""A pooled session whose RSET is answered 421 (the server's idle timeout fired
as the group went out) is replaced like a closed one, as the lock-step
liveness check does: not a host failure.
"""

from __future__ import annotations

import pytest

from relay import errors
from tests.support.delivery import deliverer, make_config
from tests.support.sink import Sink
from tests.test_delivery_pipelining import _send

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("pipelining", [False, True])
async def test_a_pooled_session_answering_rset_with_421_is_replaced(pipelining):
    async with Sink(pipelining=pipelining, replies={"RSET": ["421 4.4.2 idle timeout"]}) as sink:
        d = deliverer(make_config())
        try:
            await _send(d, sink, 1)
            (attempt,) = await _send(d, sink, 1)
        finally:
            await d.close()
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert all(h.failure is None for h in attempt.hosts)
