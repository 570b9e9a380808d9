"""Operations at the daemon level: /metrics after known traffic, and the JSON log story.

One ``relay run`` subprocess for the module (JSON logs); the sinks run
in-process on the module's event loop. Known traffic: 3 messages
delivered to a sink, 1 RCPT refused (relaying denied), 1 message to a
host that refuses connections (deferred), 1 message to a route that
requires TLS from a host without STARTTLS (bounced at once; its DSN goes
to a sink through ``[bounces] route``).
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from relay import metrics
from tests.support import configs
from tests.support.dnsserver import DnsServer, dnsmasq_servers
from tests.support.inbound import RawClient
from tests.support.opsd import (
    Samples,
    http_get,
    json_lines,
    matching,
    nonzero,
    samples,
    send,
    value,
    wait_log,
)
from tests.support.pki import Pki
from tests.support.procs import RelayProcess, free_port
from tests.support.sink import Sink

pytestmark = pytest.mark.asyncio(loop_scope="module")

SENDER = "zqsender@sender.test"
EHLO = "zqclient-helo.test"
LOCAL = "zqlocalpart"  # the sink recipients' local part
DEFERRED_RCPT = "zqdeferred@refused.test"
STRICT_RCPT = "zqstrict@strict.test"
DENIED_RCPT = "zqdenied@elsewhere.test"
TYPO_RCPT = "zqtypo@typo.test"
FALLBACK_RCPT = "zqfallback@fallback.test"
#: The sink route's host name, resolved by dnsmasq: host and IP differ in the logs.
SINK_HOST = "mx-sink.test"


@dataclass
class Traffic:
    proc: RelayProcess
    metrics_port: int
    sink: Sink
    bounce_sink: Sink
    delivered_ids: list[str] = field(default_factory=list)
    deferred_id: str = ""
    strict_id: str = ""
    typo_id: str = ""
    fallback_id: str = ""
    exposition: str = ""

    @property
    def parsed(self) -> Samples:
        return samples(self.exposition)


def config(
    tmp: Path,
    smtp: int,
    metrics: int,
    dns: DnsServer,
    sink: int,
    strict: int,
    bounce: int,
    fallback: int,
) -> str:
    refused = free_port()  # nothing listens there: connection refused
    domains = ["example.com", "refused.test", "strict.test", "typo.test", "fallback.test"]
    routes = (
        configs.route("Sink", port=sink, host=SINK_HOST)
        + configs.route("Refused", port=refused)
        + configs.route("Strict", port=strict, require_tls=True)
        + configs.route("Bounces", port=bounce)
        + configs.route("Typo", port=free_port(), host="nxhost.test")
        + configs.route("Fallback", port=fallback)
        + configs.rule("Sink", "@example.com")
        + configs.rule("Refused", "@refused.test")
        + configs.rule("Strict", "@strict.test")
        + configs.rule("Typo", "@typo.test")
        + configs.rule("Fallback", "@fallback.test")
    )
    return configs.daemon_toml(
        tmp, smtp, metrics, domains, routes, "",
        dns={"nameservers": [f"{dns.ip}:{dns.port}"], "timeout": "2s"},
        queue={"min_backoff": "1h", "max_backoff": "2h"},
        log={"format": "json"}, bounces={"route": "Bounces"},
    )  # fmt: skip


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def traffic(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Traffic]:
    tmp = tmp_path_factory.mktemp("opsd-metrics")
    with dnsmasq_servers() as dns_servers:
        dns = dns_servers(hosts={SINK_HOST: ["127.0.0.1"]})
        # Offers STARTTLS, then answers the handshake with garbage.
        broken_tls = Pki(tmp / "pki").server_context("127.0.0.1")
        async with (
            Sink() as sink,
            Sink() as strict,
            Sink() as bounce_sink,
            Sink(tls_context=broken_tls, replies={"STARTTLS": "220 go ahead"}) as fallback,
        ):
            smtp, metrics = free_port(), free_port()
            path = tmp / "relay.toml"
            ports = (sink.port, strict.port, bounce_sink.port, fallback.port)
            path.write_text(config(tmp, smtp, metrics, dns, *ports))
            async for traffic in run_traffic(tmp, path, smtp, metrics, sink, bounce_sink):
                yield traffic


async def run_traffic(
    tmp: Path, path: Path, smtp: int, metrics: int, sink: Sink, bounce_sink: Sink
) -> AsyncIterator[Traffic]:
    proc = RelayProcess(path, cwd=tmp)
    proc.start(wait_for='"event": "started"')
    t = Traffic(proc, metrics, sink, bounce_sink)
    try:
        for n in range(3):
            t.delivered_ids.append(await send(smtp, SENDER, [f"{LOCAL}{n}@example.com"], EHLO))
        async with await RawClient.connect(smtp) as client:
            await client.cmd(f"EHLO {EHLO}")
            await client.cmd(f"MAIL FROM:<{SENDER}>")
            code, text = await client.cmd(f"RCPT TO:<{DENIED_RCPT}>")
            assert code == 550 and "5.7.1" in text, text
            await client.cmd("QUIT")
        t.deferred_id = await send(smtp, SENDER, [DEFERRED_RCPT], EHLO)
        t.strict_id = await send(smtp, SENDER, [STRICT_RCPT], EHLO)
        t.typo_id = await send(smtp, SENDER, [TYPO_RCPT], EHLO)
        t.fallback_id = await send(smtp, SENDER, [FALLBACK_RCPT], EHLO)
        # 3 delivered + the bounced original + its DSN leave the spool.
        await wait_log(proc, '"event": "removed"', count=6, within=20)
        await wait_log(proc, '"event": "deferred"', count=2)
        # The queue gauge is set as each attempt's task finishes, just after
        # its last log line: scrape until it has settled.
        for _ in range(50):
            _, t.exposition = await http_get(metrics, "/metrics")
            if value(samples(t.exposition), "relay_queue_messages") == 2:
                break
            await asyncio.sleep(0.1)
        yield t
    finally:
        proc.stop()


async def test_counters_are_exact_after_known_traffic(traffic: Traffic) -> None:
    m = traffic.parsed
    assert value(m, "relay_messages_received_total") == 7
    # Closed label sets are exported from the start, at 0 (see relay.metrics).
    assert nonzero(m, "relay_messages_rejected_total") == {(("reason", "relaying_denied"),): 1}
    assert set(matching(m, "relay_messages_rejected_total")) == {
        (("reason", reason),) for reason in metrics.REJECT_REASONS
    }
    assert matching(m, "relay_recipients_total") == {
        (("outcome", "delivered"), ("route", "Sink")): 3,
        (("outcome", "delivered"), ("route", "Fallback")): 1,
        (("outcome", "deferred"), ("route", "Refused")): 1,
        (("outcome", "bounced"), ("route", "Strict")): 1,
        (("outcome", "delivered"), ("route", "Bounces")): 1,
        (("outcome", "deferred"), ("route", "Typo")): 1,
    }
    assert matching(m, "relay_delivery_attempts_total") == {
        (("host", SINK_HOST), ("result", "delivered"), ("route", "Sink")): 3,
        # Opportunistic TLS whose handshake failed: plaintext, no TLS failure.
        (("host", "127.0.0.1"), ("result", "delivered"), ("route", "Fallback")): 1,
        (("host", "127.0.0.1"), ("result", "unreachable"), ("route", "Refused")): 1,
        (("host", "127.0.0.1"), ("result", "tls_failed"), ("route", "Strict")): 1,
        (("host", "127.0.0.1"), ("result", "delivered"), ("route", "Bounces")): 1,
        (("host", "nxhost.test"), ("result", "dns_failed"), ("route", "Typo")): 1,
    }
    assert matching(m, "relay_tls_failures_total") == {
        (("host", "127.0.0.1"), ("reason", "starttls-not-supported"), ("route", "Strict")): 1
    }
    assert nonzero(m, "relay_bounces_total") == {(("reason", "tls_policy"),): 1}
    assert len(matching(m, "relay_bounces_total")) == len(metrics.BOUNCE_REASONS)
    assert matching(m, "relay_route_dns_errors_total") == {
        (("host", "nxhost.test"), ("route", "Typo")): 1
    }
    assert value(m, "relay_queue_messages") == 2
    assert value(m, "relay_delivery_seconds_count", route="Sink") == 3
    assert value(m, "relay_delivery_seconds_count", route="Bounces") == 1
    assert value(m, "relay_delivery_seconds_count", route="Refused") is None
    assert matching(m, "relay_config_reloads_total") == {
        (("result", "success"),): 0,
        (("result", "error"),): 0,
    }
    # The sinks agree with the counters.
    assert len(traffic.sink.messages) == 3
    [dsn] = traffic.bounce_sink.messages
    assert dsn.mail_from in ("", "<>") and dsn.rcpt_tos == [SENDER]


async def test_exposition_has_every_contract_metric_and_process_metrics(traffic: Traffic) -> None:
    text = traffic.exposition
    for name, kind in (
        ("relay_messages_received_total", "counter"),
        ("relay_messages_rejected_total", "counter"),
        ("relay_recipients_total", "counter"),
        ("relay_delivery_attempts_total", "counter"),
        ("relay_tls_failures_total", "counter"),
        ("relay_bounces_total", "counter"),
        ("relay_queue_messages", "gauge"),
        ("relay_delivery_seconds", "histogram"),
        ("relay_config_reloads_total", "counter"),
    ):
        assert f"# TYPE {name} {kind}" in text, name
    m = traffic.parsed
    assert (value(m, "process_resident_memory_bytes") or 0) > 0
    assert (value(m, "process_open_fds") or 0) > 0
    assert any(name == "python_info" for name, _ in m)


async def test_no_label_value_carries_an_address_or_client_string(traffic: Traffic) -> None:
    client_strings = (
        "zq",
        "@",
        "sender.test",
        "refused.test",
        "strict.test",
        "elsewhere.test",
        "typo.test",
        "fallback.test",
    )
    for (name, labels), _ in traffic.parsed.items():
        for key, label_value in labels:
            for needle in client_strings:
                assert needle not in label_value, (name, key, label_value)
    # Nor anywhere else in the exposition (HELP texts included).
    for needle in (
        SENDER,
        EHLO,
        LOCAL,
        "zqdenied",
        "zqdeferred",
        "zqstrict",
        "zqtypo",
        "zqfallback",
    ):
        assert needle not in traffic.exposition


async def test_healthz_answers_200_while_serving(traffic: Traffic) -> None:
    assert await http_get(traffic.metrics_port, "/healthz") == (200, "ok\n")


async def test_every_log_line_is_json_with_ts_level_event(traffic: Traffic) -> None:
    lines = json_lines(traffic.proc.log)
    assert lines
    for line in lines:
        assert {"ts", "level", "event"} <= line.keys(), line
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", str(line["ts"]))


def story(traffic: Traffic, qid: str) -> list[dict[str, object]]:
    """``grep ID``: every log line that mentions the queue id."""
    grepped = [line for line in traffic.proc.log.splitlines() if qid in line]
    return json_lines("\n".join(grepped))


async def test_grep_queue_id_tells_a_delivered_message_story(traffic: Traffic) -> None:
    qid = traffic.delivered_ids[0]
    lines = story(traffic, qid)
    assert [line["event"] for line in lines] == ["accepted", "attempt", "delivered", "removed"]
    accepted, attempt, delivered, _ = lines
    assert accepted["id"] == qid and accepted["from"] == f"<{SENDER}>"
    assert accepted["client"] == "127.0.0.1"
    assert attempt["route"] == "Sink" and attempt["host"] == SINK_HOST
    assert attempt["ip"] == "127.0.0.1"
    assert attempt["tls"] == "none" and attempt["verified"] is False
    assert str(attempt["reply"]).startswith("250")
    assert delivered["to"] == f"<{LOCAL}0@example.com>" and delivered["route"] == "Sink"


async def test_grep_queue_id_shows_next_attempt_of_a_deferred_message(traffic: Traffic) -> None:
    lines = story(traffic, traffic.deferred_id)
    events = [line["event"] for line in lines]
    assert events == ["accepted", "attempt", "deferred"]
    attempt, deferred = lines[1], lines[2]
    assert attempt["route"] == "Refused" and attempt["result"] == "unreachable"
    assert deferred["to"] == f"<{DEFERRED_RCPT}>"
    # min_backoff 1h with jitter: the next attempt is an ISO time, later than now.
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", str(deferred["next_attempt"]))
    assert str(deferred["next_attempt"]) > str(deferred["ts"])[:19]


async def test_grep_queue_id_shows_a_tls_bounce_and_its_dsn(traffic: Traffic) -> None:
    lines = story(traffic, traffic.strict_id)
    events = [line["event"] for line in lines]
    assert events == ["accepted", "attempt", "bounced", "removed"]
    attempt, bounced = lines[1], lines[2]
    # The strict sink offers no STARTTLS: the attempt line names the failed
    # check and what to do about it.
    assert attempt["result"] == "tls_failed" and attempt["tls"] == "failed"
    assert attempt["tls_check"] == "starttls-not-supported"
    assert "fix: enable STARTTLS on 127.0.0.1" in str(attempt["diagnosis"])
    assert bounced["reason"] == "tls_policy" and str(bounced["reply"]).startswith("5")
    # The DSN's own story starts at the bounce line that names it.
    dsn_story = story(traffic, str(bounced["dsn"]))
    assert [line["event"] for line in dsn_story] == ["bounced", "attempt", "delivered", "removed"]
    assert dsn_story[1]["route"] == "Bounces"


async def test_grep_queue_id_shows_a_route_name_that_does_not_resolve(traffic: Traffic) -> None:
    lines = story(traffic, traffic.typo_id)
    events = [line["event"] for line in lines]
    assert events == ["accepted", "route_dns_error", "attempt", "deferred"]
    dns_error, attempt, deferred = lines[1:]
    assert dns_error["level"] == "warning"
    assert dns_error["route"] == "Typo" and dns_error["host"] == "nxhost.test"
    assert attempt["result"] == "dns_failed" and attempt["ip"] == "-"
    assert deferred["route"] == "Typo" and "next_attempt" in deferred


async def test_grep_queue_id_shows_an_opportunistic_tls_fallback(traffic: Traffic) -> None:
    lines = story(traffic, traffic.fallback_id)
    events = [line["event"] for line in lines]
    assert events == ["accepted", "tls_fallback", "attempt", "delivered", "removed"]
    fallback, attempt = lines[1], lines[2]
    assert fallback["level"] == "warning" and fallback["ip"] == "127.0.0.1"
    # STARTTLS was offered but the handshake failed: plaintext, and said so.
    assert attempt["route"] == "Fallback" and attempt["tls"] == "not_used"
    assert attempt["verified"] is False and attempt["result"] == "delivered"
