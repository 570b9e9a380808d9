"""MTA-STS (RFC 8461) end to end: dnsmasq serves MX, A and the ``_mta-sts`` TXT
record, an HTTPS policy server listens on a loopback address port 443 with a
certificate from the test CA (``[tls] ca_file``), and aiosmtpd sinks are the
MX hosts, each on its own loopback address (as two machines would be).
"""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from aiohttp import web

from relay import configdiff, configload, mtasts
from relay.config import Route
from tests.support import configs
from tests.support.integ import (
    SENDER,
    InProcessRelay,
    LoopbackSink,
    idle,
    integration_toml,
    sinks_on_one_port,
)
from tests.support.logs import captured, fields_of
from tests.support.pki import Pki
from tests.support.wait import until

CORP = configs.rule("Corp", "@corp.test")
#: The policy host's address: one no other test binds port 443 on.
POLICY_IP = "127.0.84.61"
MX_HOSTS = {"mx1.corp.test": ["127.0.0.2"], "mx2.corp.test": ["127.0.0.3"]}
MX = {"corp.test": [(10, "mx1.corp.test"), (20, "mx2.corp.test")]}


def policy_text(mode: str, *mx: str, max_age: int = 86400) -> str:
    lines = ["version: STSv1", f"mode: {mode}", *(f"mx: {m}" for m in mx), f"max_age: {max_age}"]
    return "\r\n".join(lines) + "\r\n"


class PolicyServer:
    """``https://mta-sts.corp.test/.well-known/mta-sts.txt`` on POLICY_IP:443."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.text = policy_text("enforce", "mx2.corp.test")
        self.fetches = 0
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.Response(text=self.text, content_type="text/plain")

    async def start(self) -> PolicyServer:
        app = web.Application()
        app.router.add_get("/.well-known/mta-sts.txt", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        await web.TCPSite(self._runner, POLICY_IP, 443, ssl_context=self.context).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


@pytest.fixture
async def policy_server(pki: Pki) -> AsyncIterator[PolicyServer]:
    server = PolicyServer(pki.server_context("mta-sts.corp.test"))
    try:
        await server.start()
    except PermissionError as exc:
        # RFC 8461 section 3.3 fetches the policy from port 443, which only
        # root may listen on (below net.ipv4.ip_unprivileged_port_start, 1024).
        await server.stop()
        pytest.skip(f"cannot listen on {POLICY_IP}:443 without root: {exc}")
    yield server
    await server.stop()


@pytest.fixture
async def two_mx(pki: Pki) -> AsyncIterator[list[LoopbackSink]]:
    """mx1 and mx2 of corp.test, each with a valid certificate for its name."""
    first = await sinks_on_one_port(["127.0.0.2"], tls_context=pki.server_context("mx1.corp.test"))
    sinks = first + [
        await LoopbackSink(
            "127.0.0.3", first[0].port, tls_context=pki.server_context("mx2.corp.test")
        ).start()
    ]
    yield sinks
    for sink in sinks:
        await sink.stop()


def dns_records(policy_id: str = "1") -> dict[str, object]:
    return {
        "hosts": {**MX_HOSTS, "mta-sts.corp.test": [POLICY_IP]},
        "mx": MX,
        "txt": {"_mta-sts.corp.test": [f"v=STSv1; id={policy_id};"]},
    }


def relay_toml(tmp_path: Path, dns: object, port: int, pki: Pki, **route_keys: object) -> str:
    # Opportunistic TLS: without MTA-STS any certificate would do.
    route = configs.route("Corp", "corp.test", port, mx_lookup=True, **route_keys)
    return integration_toml(tmp_path, dns, route, CORP, ca_file=pki.ca_file)  # type: ignore[arg-type]


def tls_failures(relay: InProcessRelay, reason: str, host: str = "corp.test") -> float:
    return relay.sample("relay_tls_failures_total", route="Corp", host=host, reason=reason)


# --- the policy grammar (RFC 8461 section 3) ----------------------------------


def test_policy_parse_and_mx_patterns() -> None:
    policy = mtasts.parse("corp.test", policy_text("enforce", "mx1.corp.test", "*.b.test"), "7", 0)
    assert (policy.mode, policy.max_age, policy.id) == ("enforce", 86400, "7")
    assert policy.allows("MX1.corp.test.")
    assert policy.allows("x.b.test")
    # The wildcard stands for one label only, never for the domain itself.
    assert not policy.allows("a.x.b.test")
    assert not policy.allows("b.test")
    assert not policy.allows("mx2.corp.test")
    assert policy.expired(86400) and not policy.expired(86399)


@pytest.mark.parametrize(
    "text",
    [
        "version: STSv2\nmode: enforce\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: strict\nmx: a.test\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.test\nmax_age: 31557601\n",
        "<html>not a policy</html>",
    ],
    ids=["version", "mode", "no-mx", "max-age", "html"],
)
def test_invalid_policies_are_refused(text: str) -> None:
    with pytest.raises(mtasts.PolicyInvalid):
        mtasts.parse("corp.test", text, "1", 0)


def test_txt_record_id() -> None:
    assert mtasts.txt_id(["v=spf1 -all", "v=STSv1; id=20260101T000000;"]) == "20260101T000000"
    assert mtasts.txt_id(["v=spf1 -all"]) is None
    with pytest.raises(mtasts.PolicyInvalid):
        mtasts.txt_id(["v=STSv1; id=1;", "v=STSv1; id=2;"])
    with pytest.raises(mtasts.PolicyInvalid):
        mtasts.txt_id(["v=STSv1; id=not-alnum!;"])


def test_config_option_shown_and_only_for_mx_routes(tmp_path: Path) -> None:
    text = configs.relay_toml(
        {"server": {"hostname": "relay.test", "domains": ["corp.test"]}},
        configs.route("Corp", "corp.test", 25, mx_lookup=True, mta_sts=False),
        CORP,
    )
    path = tmp_path / "relay.toml"
    path.write_text(text)
    config = configload.load(path)
    route = config.route("Corp")
    assert isinstance(route, Route) and route.mta_sts is False
    assert "mta_sts=off" in configdiff.describe(config)[0]
    assert configdiff.route_snapshot(route)["mta_sts"] is False
    path.write_text(text.replace("mx_lookup = true", "mx_lookup = false"))
    with pytest.raises(configload.ConfigError, match="mta_sts"):
        configload.load(path)


# --- end to end ---------------------------------------------------------------


async def test_enforce_never_uses_an_mx_the_policy_excludes(
    tmp_path, dnsmasq, pki, policy_server, two_mx
):
    mx1, mx2 = two_mx
    server = dnsmasq(**dns_records())
    async with InProcessRelay(tmp_path, relay_toml(tmp_path, server, mx1.port, pki)) as relay:
        for i in range(5):
            relay.put(SENDER, [f"user{i}@corp.test"])
        await until(lambda: len(mx2.messages) == 5)
        await idle(relay)
        assert relay.spooled() == []
    # mx1 is the preferred MX and up, but the policy lists only mx2.
    assert mx1.connections == 0
    assert all(version for version in mx2.sessions_tls)
    # One fetch for the burst; the policy is cached in the spool.
    assert policy_server.fetches == 1
    cached = json.loads((tmp_path / "spool" / "mta-sts" / "corp.test.json").read_text())
    assert (cached["id"], cached["mode"], cached["mx"]) == ("1", "enforce", ["mx2.corp.test"])


async def test_enforce_refuses_a_certificate_for_another_name(
    tmp_path, dnsmasq, pki, policy_server
):
    policy_server.text = policy_text("enforce", "mx1.corp.test")
    [sink] = await sinks_on_one_port(["127.0.0.2"], tls_context=pki.server_context("other.test"))
    server = dnsmasq(**dns_records())
    toml = relay_toml(tmp_path, server, sink.port, pki)
    with captured(fields_of("attempt")) as attempts:
        try:
            async with InProcessRelay(tmp_path, toml) as relay:
                relay.put(SENDER, ["bob@corp.test"])
                await until(lambda: tls_failures(relay, "certificate-host-mismatch") >= 1)
                await idle(relay, within=5)
                # Never delivered there, and never bounced: kept queued (RFC 8461 section 5).
                assert sink.messages == []
                assert [e.recipients[0].address for e in relay.spooled()] == ["bob@corp.test"]
                assert relay.sample("relay_bounces_total", reason="tls") == 0
        finally:
            await sink.stop()
    attempt = attempts[0]
    assert (attempt["result"], attempt["mta_sts"]) == ("tls_failed", "enforce")
    # Turning the route's validate_hostname off would not help: the advice says so.
    diagnosis = str(attempt["diagnosis"])
    assert "MTA-STS policy of corp.test" in diagnosis
    assert "validate_hostname = false" not in diagnosis


async def test_testing_mode_delivers_and_counts(tmp_path, dnsmasq, pki, policy_server):
    # No MX is in the policy, and mx1 offers no STARTTLS: enforce would refuse both.
    policy_server.text = policy_text("testing", "mx9.corp.test")
    [sink] = await sinks_on_one_port(["127.0.0.2"])
    try:
        server = dnsmasq(**dns_records())
        async with InProcessRelay(tmp_path, relay_toml(tmp_path, server, sink.port, pki)) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: sink.messages)
            assert relay.spooled() == []
            sample = "relay_mta_sts_testing_failures_total"
            # Counted per MX host the policy would drop: mx1 and mx2.
            assert relay.sample(sample, route="Corp", reason="mx-mismatch") == 2
            assert relay.sample(sample, route="Corp", reason="starttls-not-supported") == 1
    finally:
        await sink.stop()


async def test_cached_policy_survives_a_restart_and_a_fetch_failure(
    tmp_path, dnsmasq, pki, policy_server, two_mx
):
    mx1, mx2 = two_mx
    server = dnsmasq(**dns_records("1"))
    async with InProcessRelay(tmp_path, relay_toml(tmp_path, server, mx1.port, pki)) as relay:
        await relay.send_and_settle(SENDER, ["a@corp.test"], when=lambda: mx2.messages)
    # A new policy id is published, but its server is down: the new relay
    # (same spool) finds the cached enforce policy and keeps to it.
    await policy_server.stop()
    server = dnsmasq(**dns_records("2"))
    async with InProcessRelay(tmp_path, relay_toml(tmp_path, server, mx1.port, pki)) as relay:
        await relay.send_and_settle(SENDER, ["b@corp.test"], when=lambda: len(mx2.messages) == 2)
        assert tls_failures(relay, "sts-policy-fetch-error") == 1
    assert mx1.connections == 0


@pytest.fixture
def bad_policy(request, pki: Pki, policy_server: PolicyServer) -> Iterator[str]:
    """A policy fetch that fails one of three ways; yields the RFC 8460 result type."""
    if request.param == "sts-policy-invalid":
        policy_server.text = "version: STSv1\nmode: enforce\n"  # no mx, no max_age
    elif request.param == "sts-webpki-invalid":
        policy_server.context = pki.server_context("mta-sts.corp.test", untrusted=True)
    yield request.param


@pytest.mark.parametrize(
    "bad_policy",
    ["sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"],
    indirect=True,
)
async def test_policy_failure_without_cache_delivers_as_the_route_says(
    tmp_path, dnsmasq, pki, policy_server, two_mx, bad_policy
):
    mx1, mx2 = two_mx
    if bad_policy == "sts-policy-fetch-error":
        await policy_server.stop()
    elif bad_policy == "sts-webpki-invalid":
        await policy_server.stop()
        await policy_server.start()  # now with the untrusted certificate
    server = dnsmasq(**dns_records())
    async with InProcessRelay(tmp_path, relay_toml(tmp_path, server, mx1.port, pki)) as relay:
        await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: mx1.messages)
        assert tls_failures(relay, bad_policy) == 1
    assert not (tmp_path / "spool" / "mta-sts" / "corp.test.json").exists()


async def test_mta_sts_false_ignores_the_policy(tmp_path, dnsmasq, pki, policy_server, two_mx):
    mx1, _ = two_mx
    server = dnsmasq(**dns_records())
    toml = relay_toml(tmp_path, server, mx1.port, pki, mta_sts=False)
    async with InProcessRelay(tmp_path, toml) as relay:
        await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: mx1.messages)
    assert policy_server.fetches == 0


async def test_a_new_txt_id_fetches_the_new_policy(tmp_path, dnsmasq, pki, policy_server, two_mx):
    mx1, mx2 = two_mx
    server = dnsmasq(**dns_records("1"))
    async with InProcessRelay(tmp_path, relay_toml(tmp_path, server, mx1.port, pki)) as relay:
        await relay.send_and_settle(SENDER, ["a@corp.test"], when=lambda: mx2.messages)
    # Same id: the cached policy is used without a fetch, across a restart.
    async with InProcessRelay(tmp_path, relay_toml(tmp_path, server, mx1.port, pki)) as relay:
        await relay.send_and_settle(SENDER, ["b@corp.test"], when=lambda: len(mx2.messages) == 2)
    assert policy_server.fetches == 1
    # The domain publishes a new policy under a new id: fetched, and it applies.
    policy_server.text = policy_text("enforce", "mx1.corp.test")
    server = dnsmasq(**dns_records("2"))
    async with InProcessRelay(tmp_path, relay_toml(tmp_path, server, mx1.port, pki)) as relay:
        await relay.send_and_settle(SENDER, ["c@corp.test"], when=lambda: mx1.messages)
    assert policy_server.fetches == 2
    assert len(mx2.messages) == 2
