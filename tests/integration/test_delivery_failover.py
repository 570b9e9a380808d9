"""When a host fails, what happens next: temporary STARTTLS trouble, the address
budget, a lost reply after the final dot, and the per-hop connection limit."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from relay import configload, errors
from relay.config import Config, DeliveryConfig
from relay.delivery import Deliverer
from relay.errors import TlsFailure, TlsPolicyFailure
from relay.metrics import Metrics
from tests.support.delivery import (
    BODY,
    ENCRYPT_ONLY,
    OPPORTUNISTIC,
    addresses,
    candidate,
    deliverer,
    envelope,
    make_config,
    route,
)
from tests.support.sink import STARTTLS_THEN_DROP, STARTTLS_THEN_STALL, Sink, StaticResolver

pytestmark = pytest.mark.timeout(60)


def _tls_failures(metrics: Metrics) -> float:
    return sum(
        sample.value
        for family in metrics.registry.collect()
        if family.name == "relay_tls_failures"
        for sample in family.samples
        if sample.name == "relay_tls_failures_total"
    )


# --- 1. temporary STARTTLS trouble is not a TLS-policy verdict ---------------

TEMPORARY_STARTTLS = {
    "454": ("454 4.7.0 TLS not available", errors.RemoteTemporary),
    "dropped_mid_handshake": (STARTTLS_THEN_DROP, errors.ConnectionLost),
    "handshake_timeout": (STARTTLS_THEN_STALL, errors.ConnectionLost),
}


@pytest.mark.parametrize("case", sorted(TEMPORARY_STARTTLS))
async def test_temporary_starttls_failure_defers_not_bounces(pki, closing, case):
    script, expected = TEMPORARY_STARTTLS[case]
    metrics = Metrics()
    async with Sink(tls_context=pki.server_context("mx1.test"), replies={"STARTTLS": script}) as s:
        d = deliverer(make_config(pki.ca_file, command_timeout=0.5), metrics=metrics)
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(ENCRYPT_ONLY), env, addresses(env), BODY, [candidate("mx1.test", s.port)]
        )
    (result,) = attempt.results["b@x.test"]
    assert isinstance(result, expected) and not isinstance(result, TlsPolicyFailure)
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    assert _tls_failures(metrics) == 0 and not s.messages


@pytest.mark.parametrize("case", sorted(TEMPORARY_STARTTLS))
async def test_temporary_starttls_failure_moves_on_to_the_next_host(pki, closing, case):
    script, _ = TEMPORARY_STARTTLS[case]
    context = pki.server_context("mx1.test")
    async with (
        Sink(tls_context=context, replies={"STARTTLS": script}) as one,
        Sink(tls_context=context) as two,
    ):
        d = deliverer(make_config(pki.ca_file, command_timeout=0.5))
        closing(d)
        env = envelope()
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(ENCRYPT_ONLY), env, addresses(env), BODY, cands)
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert not one.messages and two.messages[0].tls is not None


async def test_5xx_to_starttls_is_a_policy_failure(pki, closing):
    replies = {"STARTTLS": "554 5.7.0 no TLS for you"}
    async with Sink(tls_context=pki.server_context("mx1.test"), replies=replies) as sink:
        d = deliverer(make_config(pki.ca_file))
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(ENCRYPT_ONLY), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    (result,) = attempt.results["b@x.test"]
    assert isinstance(result, TlsPolicyFailure) and result.reason is TlsFailure.HANDSHAKE
    assert "554" in result.detail
    assert attempt.outcome("b@x.test") == errors.BOUNCED


async def test_opportunistic_still_falls_back_after_a_dropped_handshake(pki, closing):
    replies = {"STARTTLS": [STARTTLS_THEN_DROP]}
    async with Sink(tls_context=pki.server_context("mx1.test"), replies=replies) as sink:
        d = deliverer(make_config(pki.ca_file))
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert sink.connections == 2 and sink.messages[0].tls is None


# --- 2. the address budget and failover to secondaries -----------------------


async def test_primary_with_many_addresses_leaves_room_for_the_next_host(pki, closing):
    # mx1 has 5 addresses, all failing the TLS policy (no STARTTLS); the
    # budget of 5 must still reach mx2.
    async with Sink() as plain, Sink(tls_context=pki.server_context("mx2.test")) as good:
        d = deliverer(make_config(pki.ca_file), {"mx1.test": ["127.0.0.1"] * 5})
        closing(d)
        env = envelope()
        cands = [candidate("mx1.test", plain.port), candidate("127.0.0.1", good.port)]
        attempt = await d.deliver(route(ENCRYPT_ONLY), env, addresses(env), BODY, cands)
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert [h.candidate.host for h in attempt.hosts] == ["mx1.test"] * 4 + ["127.0.0.1"]
    assert len(good.messages) == 1


async def test_tls_failures_at_some_hosts_defer_when_others_were_not_tried(pki, closing):
    async with Sink() as one, Sink() as two:
        d = deliverer(make_config(pki.ca_file, max_addresses=1))
        closing(d)
        env = envelope()
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(ENCRYPT_ONLY), env, addresses(env), BODY, cands)
    first, marker = attempt.results["b@x.test"]
    assert isinstance(first, TlsPolicyFailure) and isinstance(marker, errors.NotTried)
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    # The recorded reply is still the tried host's own.
    assert attempt.last("b@x.test") == first.reply
    assert attempt.remote["b@x.test"].startswith("mx1.test")
    assert one.connections == 1 and two.connections == 0


async def test_tls_failures_at_every_host_still_bounce(pki, closing):
    names = {"mx1.test": ["127.0.0.1"] * 5, "mx2.test": ["127.0.0.1"]}
    async with Sink() as one, Sink() as two:
        d = deliverer(make_config(pki.ca_file), names)
        closing(d)
        env = envelope()
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(ENCRYPT_ONLY), env, addresses(env), BODY, cands)
    assert attempt.outcome("b@x.test") == errors.BOUNCED
    assert one.connections == 4 and two.connections == 1


# --- 3. the reply to the final dot -------------------------------------------


def test_data_timeout_defaults_to_ten_minutes(tmp_path):
    assert DeliveryConfig().data_timeout == 600.0
    path = tmp_path / "relay.toml"
    path.write_text(
        '[server]\nhostname = "relay.test"\ndomains = ["x.test"]\n'
        '[delivery]\ndata_timeout = "15m"\n'
    )
    assert configload.load(path).delivery.data_timeout == 900.0


async def test_reply_to_the_dot_waits_data_timeout_not_command_timeout(closing):
    async with Sink(replies={"DATA": "sleep 0.6"}) as sink:
        d = deliverer(make_config(command_timeout=0.3, data_timeout=5.0))
        closing(d)
        env = envelope()
        attempt = await d.deliver(
            route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("mx1.test", sink.port)]
        )
    assert attempt.outcome("b@x.test") == errors.DELIVERED
    assert sink.messages[0].data == BODY


@pytest.mark.parametrize("script", ["drop", "stall"])
async def test_lost_reply_after_the_dot_defers_without_failover(closing, script):
    async with Sink(replies={"DATA": script}) as one, Sink() as two:
        d = deliverer(make_config(data_timeout=0.5))
        closing(d)
        env = envelope()
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
    (result,) = attempt.results["b@x.test"]
    assert isinstance(result, errors.ReplyLost)
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    # RFC 5321 section 6.1: mx1 may have the message; mx2 must not get a copy.
    assert two.connections == 0 and not two.messages


async def test_lost_reply_holds_only_the_recipients_in_that_data(closing):
    replies = {"DATA": "drop", "RCPT c@x.test": "450 4.2.1 busy"}
    async with Sink(replies=replies) as one, Sink() as two:
        d = deliverer(make_config())
        closing(d)
        env = envelope("a@src.test", "b@x.test", "c@x.test")
        cands = [candidate("mx1.test", one.port), candidate("mx2.test", two.port)]
        attempt = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
    assert attempt.outcome("b@x.test") == errors.DEFERRED
    assert attempt.outcome("c@x.test") == errors.DELIVERED
    assert two.messages[0].rcpt_tos == ["c@x.test"]


# --- 4. the per-hop connection limit follows reloads and is dropped ----------


class _Live:
    """A config that a test can replace, as a reload does."""

    def __init__(self, config: Config) -> None:
        self.config = config

    def __call__(self) -> Config:
        return self.config


async def test_max_per_host_follows_a_reload(closing):
    live = _Live(make_config(max_per_host=1))
    d = Deliverer(live, StaticResolver({"mx1.test": ["127.0.0.1"]}), Metrics())
    closing(d)
    async with Sink(replies={"DATA": ["sleep 0.2"] * 4}) as sink:
        cands = [candidate("mx1.test", sink.port)]
        env = envelope(qid="Q0")
        first = await d.deliver(route(OPPORTUNISTIC), env, addresses(env), BODY, cands)
        assert first.outcome("b@x.test") == errors.DELIVERED
        await d.close()  # no idle session to reuse: each attempt must connect
        live.config = dataclasses.replace(
            live.config, delivery=dataclasses.replace(live.config.delivery, max_per_host=3)
        )
        envs = [envelope(qid=f"Q{i}") for i in range(1, 4)]
        attempts = await asyncio.gather(
            *(d.deliver(route(OPPORTUNISTIC), e, addresses(e), BODY, cands) for e in envs)
        )
    assert all(a.outcome("b@x.test") == errors.DELIVERED for a in attempts)
    # Three at once after the reload (one fresh connection each), not one.
    assert sink.connections == 1 + 3


async def test_hop_state_is_dropped_when_unused(closing):
    async with Sink() as a, Sink() as b:
        d = deliverer(make_config(idle_timeout=0.2))
        closing(d)
        for port in (a.port, b.port):
            env = envelope()
            attempt = await d.deliver(
                route(OPPORTUNISTIC), env, addresses(env), BODY, [candidate("mx1.test", port)]
            )
            assert attempt.outcome("b@x.test") == errors.DELIVERED
        assert d.pooled_hops == 2  # idle sessions kept for reuse
        await asyncio.sleep(0.5)
        assert d.pooled_hops == 0
