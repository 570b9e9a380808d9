"""TLS beyond the policy checks: on_tls_failure, certificate expiry warnings,
TLS-RPT result types (docs/tls.md).

Real peers throughout: aiosmtpd sinks presenting trustme certificates,
names through dnsmasq, the whole scheduler and deliverer (tests/support/integ.py),
``relay test-tls`` as a subprocess.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import ssl
import sys
from pathlib import Path

import pytest

from relay import configdiff, configload, tls
from relay.audit import AuditLog
from relay.errors import TlsFailure
from relay.expiry import ExpiryWatch
from relay.lint import warnings
from relay.metrics import Metrics
from tests.support import configs, logs
from tests.support.integ import (
    SENDER,
    InProcessRelay,
    LoopbackSink,
    dsn_parts,
    idle,
    integration_toml,
)
from tests.support.ops import BASE, load_text
from tests.support.paths import ROOT
from tests.support.pki import Pki
from tests.support.queue import Clock
from tests.support.sink import Sink
from tests.support.wait import until

pytestmark = pytest.mark.timeout(60)

RULES = configs.rule("Corp", "@corp.test") + configs.rule("Senders", "@sender.test")
HOSTS = {"mx1.corp.test": ["127.0.0.1"], "mx.sender.test": ["127.0.0.1"]}
MX = {"sender.test": [(10, "mx.sender.test")], "corp.test": [(10, "mx1.corp.test")]}
CHECKED = {"require_tls": True, "require_ca_signed": True, "validate_hostname": True}
DEFER = 'on_tls_failure = "defer"\n'
TEN_DAYS = datetime.timedelta(days=10)


def _routes(port: int, dsn_sink: Sink, extra: str = "", mx_lookup: bool = False) -> str:
    host = "corp.test" if mx_lookup else "mx1.corp.test"
    corp = configs.route("Corp", host, port, mx_lookup=mx_lookup, **CHECKED) + extra
    return corp + configs.route("Senders", "sender.test", dsn_sink.port, mx_lookup=True)


def _not_after(chain: Path) -> float:
    """The leaf's notAfter as Unix seconds, read from the file the sink presents."""
    decoded = ssl._ssl._test_decode_cert(str(chain))  # type: ignore[attr-defined]
    return ssl.cert_time_to_seconds(decoded["notAfter"])


# --- on_tls_failure = "defer" ---------------------------------------------------------


async def test_defer_keeps_the_message_until_a_fixed_certificate_delivers_it(
    tmp_path, dnsmasq, dsn_sink
):
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    expired = LoopbackSink(tls_context=pki.server_context("mx1.corp.test", expired=True))
    await expired.start()
    port = expired.port
    toml = integration_toml(tmp_path, server, _routes(port, dsn_sink, DEFER), RULES,
                       ca_file=pki.ca_file)  # fmt: skip
    with logs.captured(logs.fields_of("tls_deferred")) as held:
        async with InProcessRelay(tmp_path, toml) as relay:
            relay.put(SENDER, ["bob@corp.test"])
            # Several attempts, each deferred (min_backoff 100ms): not bounced.
            await until(lambda: relay.sample("relay_tls_deferred_total", route="Corp") >= 2)
            await expired.stop()
            assert expired.messages == []
            [waiting] = relay.spooled()
            [rcpt] = waiting.pending
            # A waiting recipient records a 4xx, never the 5xx of a bounce.
            assert rcpt.last_reply is not None and str(rcpt.last_reply).startswith("450 4.7.5 ")
            assert relay.sample("relay_bounces_total", reason="tls_policy") == 0
            # The failure is counted under its TLS-RPT result type (RFC 8460).
            assert relay.sample("relay_tls_failures_total", route="Corp", host="mx1.corp.test",
                                reason="certificate-expired") >= 2  # fmt: skip
            # The certificate is renewed: the same host, a good certificate.
            fixed = LoopbackSink(port=port, tls_context=pki.server_context("mx1.corp.test"))
            async with fixed:
                await until(lambda: fixed.messages)
                await idle(relay)
            assert relay.spooled() == []
            assert relay.sample("relay_recipients_total", route="Corp", outcome="delivered") == 1
            assert relay.sample("relay_recipients_total", route="Corp", outcome="bounced") == 0
    assert dsn_sink.messages == [] and dsn_sink.connections == 0
    [message] = fixed.messages
    assert message.rcpt_tos == ["bob@corp.test"]
    assert held and held[0]["level"] == "WARNING"
    assert held[0]["route"] == "Corp" and held[0]["tls_checks"] == "certificate-expired"
    assert held[0]["recipients"] == 1 and held[0]["bounce_at"]


async def test_defer_bounces_at_max_lifetime_with_the_tls_failure(tmp_path, dnsmasq, dsn_sink):
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    clock = Clock(datetime.datetime.now(datetime.UTC).timestamp())
    async with Sink(tls_context=pki.server_context("mx1.corp.test", expired=True)) as failing:
        toml = integration_toml(
            tmp_path, server, _routes(failing.port, dsn_sink, DEFER), RULES,
            ca_file=pki.ca_file, max_lifetime="1h", min_backoff="10m", max_backoff="1h",
        )  # fmt: skip
        async with InProcessRelay(tmp_path, toml, clock=clock) as relay:
            await relay.send_and_settle(
                SENDER,
                ["bob@corp.test"],
                when=lambda: relay.sample("relay_tls_deferred_total", route="Corp"),
            )
            assert dsn_sink.connections == 0
            clock.advance(3600)
            relay.scheduler.flush()
            await until(lambda: dsn_sink.messages)
            await idle(relay)
            assert relay.spooled() == []
            assert relay.sample("relay_bounces_total", reason="expired") == 1
            assert relay.sample("relay_bounces_total", reason="tls_policy") == 0
        assert failing.messages == []
    [dsn] = dsn_sink.messages
    _, human, [fields] = dsn_parts(dsn.data)
    assert fields["status"] == "4.4.7" and fields["action"] == "failed"
    # The last error is the TLS failure, so the postmaster knows what to fix.
    assert "4.7.5 TLS required by route (require_ca_signed)" in fields["diagnostic-code"]
    assert "has expired" in human


async def test_bounce_stays_the_default(tmp_path, dnsmasq, dsn_sink):
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    async with Sink(tls_context=pki.server_context("mx1.corp.test", expired=True)) as failing:
        toml = integration_toml(tmp_path, server, _routes(failing.port, dsn_sink), RULES,
                           ca_file=pki.ca_file)  # fmt: skip
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: dsn_sink.messages)
            assert relay.sample("relay_bounces_total", reason="tls_policy") == 1
            assert relay.sample("relay_tls_deferred_total", route="Corp") == 0


# --- certificate expiry ---------------------------------------------------------------


async def test_expiry_gauge_and_one_warning_a_day_per_host(tmp_path, dnsmasq, dsn_sink):
    """An MX host's certificate ending in 10 days: the gauge under the route's
    configured domain, and one warning for two deliveries."""
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    chain, key = pki.issue("mx1.corp.test", expires_in=TEN_DAYS)
    async with Sink(tls_context=tls.server_context(chain, key)) as sink:
        routes = _routes(sink.port, dsn_sink, mx_lookup=True)
        toml = integration_toml(tmp_path, server, routes, RULES, ca_file=pki.ca_file)
        with logs.captured(logs.fields_of("tls_certificate_expiring")) as warned:
            async with InProcessRelay(tmp_path, toml) as relay:
                for n in (1, 2):
                    await relay.send_and_settle(
                        SENDER, ["bob@corp.test"], when=lambda n=n: len(sink.messages) == n
                    )
                expiry = relay.sample(
                    "relay_tls_certificate_expiry_timestamp_seconds",
                    route="Corp", host="corp.test",
                )  # fmt: skip
    assert expiry == _not_after(chain)
    [line] = warned
    assert line["level"] == "WARNING"
    assert line["route"] == "Corp" and line["host"] == "mx1.corp.test"
    assert line["days_left"] == 9  # ten days from issue, less the seconds since
    advice = str(line["advice"])
    assert "the certificate of mx1.corp.test expires on " in advice
    assert "in 9 days ([tls] expiry_warning is 21 days)" in advice
    assert "renew it on mx1.corp.test before then" in advice


async def test_a_certificate_far_from_expiry_is_recorded_not_warned(tmp_path, dnsmasq, dsn_sink):
    pki = Pki(tmp_path / "pki")
    server = dnsmasq(hosts=HOSTS, mx=MX)
    chain, key = pki.issue("mx1.corp.test")
    async with Sink(tls_context=tls.server_context(chain, key)) as sink:
        toml = integration_toml(tmp_path, server, _routes(sink.port, dsn_sink), RULES,
                           ca_file=pki.ca_file)  # fmt: skip
        with logs.captured(logs.fields_of("tls_certificate_expiring")) as warned:
            async with InProcessRelay(tmp_path, toml) as relay:
                await relay.send_and_settle(SENDER, ["bob@corp.test"], when=lambda: sink.messages)
                expiry = relay.sample(
                    "relay_tls_certificate_expiry_timestamp_seconds",
                    route="Corp", host="mx1.corp.test",
                )  # fmt: skip
    assert expiry == _not_after(chain)
    assert warned == []


# --- relay test-tls ---------------------------------------------------------------------


def _probe_config(tmp_path: Path, pki: Pki, port: int, tls_extra: str = "") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[server]\nhostname = "relay.test"\ndomains = ["x.test"]\n'
        f'[tls]\nca_file = "{pki.ca_file}"\n{tls_extra}'
        '[delivery]\nconnect_timeout = "5s"\ncommand_timeout = "5s"\n'
        f'[[routes]]\nname = "Downstream"\nhost = "127.0.0.1"\nport = {port}\n'
    )
    return path


async def _test_tls(config_path: Path, *extra: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "test-tls", "--config", str(config_path), "Downstream",
        *extra, cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode is not None
    return proc.returncode, out.decode()


async def test_test_tls_warns_of_a_certificate_expiring_within_the_window(tmp_path):
    pki = Pki(tmp_path / "pki")
    async with Sink(tls_context=pki.server_context("127.0.0.1", expires_in=TEN_DAYS)) as sink:
        path = _probe_config(tmp_path, pki, sink.port)
        code, text = await _test_tls(path)
        json_code, out = await _test_tls(path, "--json")
    # A warning, not a failure: the certificate is valid today.
    assert code == 0 and json_code == 0
    assert "(9 days left)" in text
    [warn] = [line for line in text.splitlines() if line.strip().startswith("WARN:")]
    assert "the certificate of 127.0.0.1 expires on " in warn
    assert "in 9 days ([tls] expiry_warning is 21 days)" in warn
    [host] = json.loads(out)["hosts"]
    assert host["passed"] is True
    assert host["certificate"]["days_left"] == 9
    [warning] = host["warnings"]
    assert warning == warn.split("WARN:", 1)[1].strip()


async def test_test_tls_window_is_configurable(tmp_path):
    pki = Pki(tmp_path / "pki")
    async with Sink(tls_context=pki.server_context("127.0.0.1", expires_in=TEN_DAYS)) as sink:
        path = _probe_config(tmp_path, pki, sink.port, 'expiry_warning = "5d"\n')
        code, text = await _test_tls(path)
        _, out = await _test_tls(path, "--json")
    assert code == 0
    assert "(9 days left)" in text and "WARN" not in text
    assert json.loads(out)["hosts"][0]["warnings"] == []


# --- the TLS-RPT words -------------------------------------------------------------------


def test_failure_reasons_are_tls_rpt_result_types():
    # RFC 8460 section 4.3.2.1 (negotiation failures) and 4.3.2.2 (certificates).
    assert {f.value for f in TlsFailure} == {
        "starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
        "certificate-not-trusted", "validation-failure",
    }  # fmt: skip


# --- the configuration ---------------------------------------------------------------------


def test_on_tls_failure_is_validated_and_every_problem_named(tmp_path):
    text = BASE.replace("port = 25\n", 'port = 25\non_tls_failure = "later"\n')
    text += '[tls]\nexpiry_warning = "soon"\n'
    with pytest.raises(configload.ConfigError) as caught:
        load_text(tmp_path, text)
    problems = [str(p) for p in caught.value.problems]
    assert any(
        p.startswith("routes[1] 'On-prem': on_tls_failure: 'later' is not a choice; "
                     'use "bounce"') for p in problems
    ), problems  # fmt: skip
    assert any(p.startswith("tls: expiry_warning: 'soon' is not a duration") for p in problems)


def test_defaults_and_check_config_summary(tmp_path):
    cfg = load_text(tmp_path, BASE)
    assert [r.on_tls_failure for r in cfg.routes] == ["bounce", "bounce"]
    assert cfg.tls.expiry_warning == 21 * 86400
    deferring = load_text(tmp_path, BASE.replace("port = 25\n", f"port = 25\n{DEFER}"))
    assert deferring.routes[0].tls_defers and not deferring.routes[1].tls_defers
    assert "route 'On-prem': require_tls=on require_ca_signed=on validate_hostname=on " \
        "on_tls_failure=defer" in configdiff.describe(deferring)  # fmt: skip


def test_audit_records_a_change_of_on_tls_failure(tmp_path):
    old = load_text(tmp_path, BASE)
    new = load_text(tmp_path, BASE.replace("port = 25\n", f"port = 25\n{DEFER}"))
    log = AuditLog(tmp_path / "audit.log")
    log.record_start(old)
    log.record_reload(old, new)
    entry = list(log.entries())[-1]
    assert entry["changes"]["routes"]["changed"] == {
        "On-prem": {"on_tls_failure": ["bounce", "defer"]}
    }


def test_an_audit_snapshot_from_before_the_option_is_not_a_change(tmp_path):
    cfg = load_text(tmp_path, BASE)
    older = configdiff.snapshot(cfg)
    for fields in older["routes"].values():
        del fields["on_tls_failure"]
    del older["tls"]["expiry_warning"]
    assert configdiff.diff_is_empty(configdiff.diff_snapshots(older, configdiff.snapshot(cfg)))


def test_defer_without_require_tls_is_warned_about(tmp_path):
    off = "require_tls = false\nrequire_ca_signed = false\nvalidate_hostname = false\n"
    cfg = load_text(tmp_path, BASE.replace("port = 25\n", f"port = 25\n{off}{DEFER}"))
    found = [str(w) for w in warnings(cfg)]
    assert any(w.startswith("routes[1] 'On-prem': on_tls_failure: \"defer\" has no effect")
               for w in found), found  # fmt: skip


# --- the watch's bookkeeping (its own clock, real metrics) ---------------------------------


def test_watch_takes_the_earliest_host_warns_daily_and_forgets(tmp_path):
    cfg = load_text(tmp_path, BASE)
    metrics = Metrics()
    clock = Clock(1_900_000_000.0)
    watch = ExpiryWatch(metrics, lambda: cfg, clock)
    day = 86400.0

    def gauge(route: str, label: str) -> float | None:
        return metrics.registry.get_sample_value(
            "relay_tls_certificate_expiry_timestamp_seconds", {"route": route, "host": label}
        )

    with logs.captured(logs.fields_of("tls_certificate_expiring")) as warned:
        watch.record("Split", "corp.test", "mx1.corp.test", clock.now + 90 * day)
        watch.record("Split", "corp.test", "mx2.corp.test", clock.now + 10 * day)
        watch.record("Split", "corp.test", "mx1.corp.test", clock.now + 90 * day)
        # The earliest behind the label; only the expiring host is warned about, once.
        assert gauge("Split", "corp.test") == clock.now + 10 * day
        assert [w["host"] for w in warned] == ["mx2.corp.test"]
        watch.record("Split", "corp.test", "mx2.corp.test", clock.now + 10 * day)
        assert len(warned) == 1
        clock.advance(day)
        watch.record("Split", "corp.test", "mx2.corp.test", clock.now + 9 * day)
        assert len(warned) == 2  # a day later, again
        # mx2 leaves the MX set: a week without a handshake and it no longer counts.
        clock.advance(8 * day)
        watch.record("Split", "corp.test", "mx1.corp.test", clock.now + 80 * day)
        assert gauge("Split", "corp.test") == clock.now + 80 * day
    # A route a reload removed loses its series at the next handshake.
    watch.record("Gone", "old.test", "old.test", clock.now + 5 * day)
    watch.record("Split", "corp.test", "mx1.corp.test", clock.now + 80 * day)
    assert gauge("Gone", "old.test") is None
