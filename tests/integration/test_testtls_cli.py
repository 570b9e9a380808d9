"""`relay test-tls` as a subprocess against in-process sinks (docs/tls.md)."""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from pathlib import Path

import pytest

from tests.support.paths import ROOT
from tests.support.pki import Pki
from tests.support.sink import Sink

pytestmark = pytest.mark.timeout(60)


def _config(tmp_path: Path, pki: Pki, port: int, policy: str = "") -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(
        f"""
[server]
hostname = "relay.test"
domains = ["x.test"]

[tls]
ca_file = "{pki.ca_file}"

[delivery]
connect_timeout = "5s"
command_timeout = "5s"

[[routes]]
name = "Downstream"
host = "127.0.0.1"
port = {port}
{policy}
"""
    )
    return path


async def _run(config: Path, *extra: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "relay",
        "test-tls",
        "--config",
        str(config),
        "Downstream",
        *extra,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 45)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path / "pki")


# kind -> (certificate spec or None for no STARTTLS, failing check reason, option)
CASES = {
    "good": ({"names": ("127.0.0.1", "mx1.test")}, None, None),
    "self_signed": (
        {"names": ("127.0.0.1",), "untrusted": True},
        "certificate-not-trusted",
        "require_ca_signed",
    ),
    "wrong_name": ({"names": ("mx1.test",)}, "certificate-host-mismatch", "validate_hostname"),
    "expired": (
        {"names": ("127.0.0.1",), "expired": True},
        "certificate-expired",
        "require_ca_signed",
    ),
    "no_starttls": (None, "starttls-not-supported", "require_tls"),
}


def _sink(pki: Pki, spec) -> Sink:
    if spec is None:
        return Sink()
    names = spec["names"]
    return Sink(
        tls_context=pki.server_context(
            *names, untrusted=spec.get("untrusted", False), expired=spec.get("expired", False)
        )
    )


@pytest.mark.parametrize("kind", sorted(CASES))
async def test_json_verdict_per_sink(tmp_path, pki, kind):
    spec, reason, option = CASES[kind]
    async with _sink(pki, spec) as sink:
        code, out, err = await _run(_config(tmp_path, pki, sink.port), "--json")
    assert not sink.messages and not any(line.startswith("MAIL") for line in sink.lines)
    report = json.loads(out)
    (host,) = report["hosts"]
    assert host["address"] == "127.0.0.1" and host["port"] == sink.port
    if reason is None:
        assert code == 0, err
        assert report["passed"] and host["passed"]
        assert host["chain_verified"] and host["hostname_matched"]
        assert host["hostname_checked"] == "127.0.0.1"
        assert "IP Address:127.0.0.1" in host["certificate"]["sans"]
        assert host["certificate"]["days_left"] >= 1
        assert host["tls_version"].startswith("TLSv1.")
        return
    assert code == 1
    assert not report["passed"]
    assert [(f["reason"], f["option"]) for f in host["failures"]] == [(reason, option)]
    assert host["checks"][option] == {
        "enabled": True,
        "passed": False,
        "reason": host["checks"][option]["reason"],
    }
    if spec is not None:
        # The certificate is read even when verification fails.
        assert host["certificate"]["subject"] is not None
        assert host["certificate"]["issuer"]


async def test_text_report_names_the_failed_option_and_fixes(tmp_path, pki):
    async with _sink(pki, {"names": ("mx1.test",)}) as sink:
        code, out, _ = await _run(_config(tmp_path, pki, sink.port))
    assert code == 1
    assert "hostname matched: no (against 127.0.0.1)" in out
    assert "verdict:          FAIL (validate_hostname)" in out
    assert "chain verified:   yes" in out
    assert "DNS:mx1.test" in out
    # The names the certificate carries, and the advice built from them.
    assert "  names:            mx1.test\n" in out
    assert (
        "validate_hostname: the certificate of 127.0.0.1 does not name 127.0.0.1; "
        "it names: mx1.test" in out
    )
    assert "fix: use one of these as the route host: mx1.test" in out
    assert "ca_file" not in out and "STARTTLS on" not in out


#: kind -> the lines test-tls must print for it, and words that belong to
#: other failures' advice and must not appear.
ADVICE = {
    "self_signed": (
        [
            "require_ca_signed: the certificate of 127.0.0.1 is issued by "
            '"O=untrusted test CA, OU=',
            "fix: install a certificate issued by a trusted CA on 127.0.0.1",
            "fix: or, if that is your private CA, add its certificate to [tls] ca_file",
        ],
        ["route host", "STARTTLS on", "renew"],
    ),
    "expired": (
        [
            "require_ca_signed: the certificate of 127.0.0.1 expired on ",
            "fix: renew the certificate on 127.0.0.1",
        ],
        ["route host", "ca_file", "STARTTLS on"],
    ),
    "no_starttls": (
        [
            "require_tls: 127.0.0.1 does not offer STARTTLS",
            "fix: enable STARTTLS on 127.0.0.1",
            'fix: or set require_tls = false in route "Downstream"',
        ],
        ["route host", "ca_file", "renew", "certificate"],
    ),
}


@pytest.mark.parametrize("kind", sorted(ADVICE))
async def test_text_advice_fits_the_failure(tmp_path, pki, kind):
    expected, foreign = ADVICE[kind]
    async with _sink(pki, CASES[kind][0]) as sink:
        code, out, _ = await _run(_config(tmp_path, pki, sink.port))
    assert code == 1
    for line in expected:
        assert line in out, line
    for word in foreign:
        assert word not in out, word


async def test_self_signed_certificate_is_called_so(tmp_path, pki):
    async with Sink(tls_context=pki.self_signed_context()) as sink:
        code, out, _ = await _run(_config(tmp_path, pki, sink.port, "validate_hostname = false"))
    assert code == 1
    assert "(self-signed)" in out
    assert "require_ca_signed: the certificate of 127.0.0.1 is self-signed" in out
    assert "fix: or add that certificate to [tls] ca_file to trust it as its own CA" in out


async def test_certificate_dates_are_shown(tmp_path, pki):
    async with _sink(pki, CASES["expired"][0]) as sink:
        code, out, _ = await _run(_config(tmp_path, pki, sink.port), "--json")
    assert code == 1
    (host,) = json.loads(out)["hosts"]
    cert = host["certificate"]
    assert cert["names"] == ["127.0.0.1"]
    assert cert["not_before"] and cert["not_after"] and cert["days_left"] < 0
    (failure,) = host["failures"]
    assert failure["reason"] == "certificate-expired"
    assert failure["problem"].startswith("the certificate of 127.0.0.1 expired on ")
    assert failure["fixes"][0] == "renew the certificate on 127.0.0.1"


async def test_options_off_pass_and_report_what_would_fail(tmp_path, pki):
    policy = "require_tls = false\nrequire_ca_signed = false\nvalidate_hostname = false"
    async with _sink(pki, {"names": ("mx1.test",), "untrusted": True}) as sink:
        code, out, _ = await _run(_config(tmp_path, pki, sink.port, policy))
    assert code == 0, out
    assert "require_ca_signed = false:" in out and "off (would fail" in out
    assert "verdict:          PASS" in out


async def test_unreachable_host_fails(tmp_path, pki):
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code, out, _ = await _run(_config(tmp_path, pki, port), "--json")
    assert code == 1
    (host,) = json.loads(out)["hosts"]
    assert host["error"]


async def test_unknown_route_is_a_usage_error(tmp_path, pki):
    config = _config(tmp_path, pki, 2525)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "relay", "test-tls", "--config", str(config), "Nope",
        cwd=ROOT, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert "no route named 'Nope'" in err.decode()


async def test_every_host_of_a_multi_host_route(tmp_path, pki):
    async with (
        _sink(pki, {"names": ("127.0.0.1",)}) as good,
        _sink(pki, {"names": ("127.0.0.1",), "untrusted": True}) as bad,
    ):
        config = tmp_path / "multi.toml"
        config.write_text(
            f"""
[server]
hostname = "relay.test"
domains = ["x.test"]
[tls]
ca_file = "{pki.ca_file}"
[[routes]]
name = "Downstream"
[[routes.primary]]
host = "127.0.0.1"
port = {good.port}
load = 100
[[routes.secondary]]
host = "127.0.0.1"
port = {bad.port}
load = 100
"""
        )
        code, out, _ = await _run(config, "--json")
    assert code == 1
    hosts = json.loads(out)["hosts"]
    assert [(h["table"], h["port"], h["passed"]) for h in hosts] == [
        ("primary", good.port, True),
        ("secondary", bad.port, False),
    ]
