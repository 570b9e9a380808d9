"""SMTP AUTH to a route's next hops against an aiosmtpd sink that requires it
over STARTTLS: the good password delivers, a bad one is a host failure, and
the password appears in no output (logs, metrics, spool, DSN, audit)."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from relay import audit, config, configdiff, configload, lint
from relay.session import auth_mechanism
from tests.support import configs, logs
from tests.support.authsink import AuthSink, CramMd5Sink
from tests.support.integ import InProcessRelay, integration_toml
from tests.support.pki import Pki
from tests.support.sink import Sink
from tests.support.wait import until

PASSWORD = "s3cret-Pa55word"
DNS = SimpleNamespace(ip="127.0.0.1", port=53)  # every host is an IP literal: never asked


class Events:
    """Every relay event as text (the event and its fields), for leak checks."""

    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    def text(self) -> str:
        return "\n".join(self.lines)


def _as_text(record: logging.LogRecord) -> str:
    fields = getattr(record, "fields", {})
    pairs = " ".join(f"{key}={value}" for key, value in fields.items())
    return f"{record.getMessage()} {pairs}"


@contextlib.contextmanager
def events() -> Iterator[Events]:
    with logs.captured(_as_text, logging.DEBUG) as lines:
        yield Events(lines)


def password_file(tmp_path: Path, password: str = PASSWORD, mode: int = 0o600) -> Path:
    path = tmp_path / "smarthost.password"
    path.write_text(password + "\n")
    path.chmod(mode)
    return path


def auth_route(port: int, secret: Path, *, username: str = "relay", extra: str = "") -> str:
    return (
        configs.route("Smarthost", "127.0.0.1", port, require_tls=True, require_ca_signed=True)
        + f'auth = {{ username = "{username}", password_file = "{secret}" }}\n{extra}'
    )


def senders_route(port: int) -> str:
    return configs.route("Senders", "127.0.0.1", port)


RULES = (
    '[[rules]]\nrecipients = ["@sender.test"]\nroute = "Senders"\n'
    '[[rules]]\nrecipients = ["*"]\nroute = "Smarthost"\n'
)


def no_password_in(relay: InProcessRelay, *texts: str) -> None:
    assert PASSWORD not in relay.metrics.exposition().decode()
    for path in (relay.config.queue.path).rglob("*"):
        if path.is_file():
            assert PASSWORD.encode() not in path.read_bytes(), path
    for text in texts:
        assert PASSWORD not in text
    # Nor base64 of the PLAIN exchange (\0user\0password).
    assert "AHJlbGF5A" not in "".join(texts)


async def test_good_password_is_delivered_over_tls(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    secret = password_file(tmp_path)
    tls = pki.server_context("smarthost.test")
    async with AuthSink(username="relay", password=PASSWORD, tls_context=tls) as sink:
        routes = auth_route(sink.port, secret) + senders_route(2526)  # no DSN expected
        toml = integration_toml(tmp_path, DNS, routes, RULES, ca_file=pki.ca_file)  # type: ignore[arg-type]
        with events() as log:
            async with InProcessRelay(tmp_path, toml) as relay:
                await relay.send_and_settle(
                    "alice@sender.test", ["bob@partner.test"], when=lambda: sink.messages
                )
                no_password_in(relay, log.text())
    assert sink.auths == [("PLAIN", b"relay", True)]
    (message,) = sink.messages
    assert message.rcpt_tos == ["bob@partner.test"] and message.tls is not None
    assert relay.spooled() == []


async def test_cram_md5_is_preferred_when_offered(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    secret = password_file(tmp_path)
    tls = pki.server_context("smarthost.test")
    async with CramMd5Sink(username="relay", password=PASSWORD, tls_context=tls) as sink:
        routes = auth_route(sink.port, secret) + senders_route(2526)
        toml = integration_toml(tmp_path, DNS, routes, RULES, ca_file=pki.ca_file)  # type: ignore[arg-type]
        async with InProcessRelay(tmp_path, toml) as relay:
            await relay.send_and_settle(
                "alice@sender.test", ["bob@partner.test"], when=lambda: sink.messages
            )
    assert sink.auths == [("CRAM-MD5", b"relay", True)]
    assert not any(PASSWORD in line for line in sink.lines)


async def test_bad_password_is_a_host_failure_named_in_the_log_and_the_dsn(
    tmp_path: Path,
) -> None:
    pki = Pki(tmp_path / "pki")
    secret = password_file(tmp_path)
    tls = pki.server_context("smarthost.test")
    async with (
        AuthSink(username="relay", password="another", tls_context=tls) as sink,
        Sink() as senders,
    ):
        routes = auth_route(sink.port, secret) + senders_route(senders.port)
        toml = integration_toml(
            tmp_path, DNS, routes, RULES, ca_file=pki.ca_file, max_lifetime="1s",  # type: ignore[arg-type]
        )  # fmt: skip
        with events() as log:
            async with InProcessRelay(tmp_path, toml) as relay:
                await relay.send_and_settle(
                    "alice@sender.test", ["bob@partner.test"], when=lambda: senders.messages
                )
                assert relay.sample(
                    "relay_delivery_attempts_total",
                    route="Smarthost", host="127.0.0.1", result="auth_failed",
                ) >= 1  # fmt: skip
                no_password_in(relay, log.text(), senders.messages[0].data.decode())
    assert sink.messages == []
    assert sink.auths and all(not ok for _, _, ok in sink.auths)
    # The attempt line says which route, which account, what the host said and the fix.
    line = next(line for line in log.lines if "result=auth_failed" in line)
    assert line.startswith("attempt") and "route=Smarthost" in line
    assert "detail=route \"Smarthost\": AUTH as 'relay' at 127.0.0.1 failed: PLAIN refused" in line
    assert "535" in line and str(secret) in line
    # The DSN at max_lifetime: the last error names the route.
    dsn = " ".join(senders.messages[0].data.decode().split())
    assert 'Authentication to the next hop failed for route "Smarthost"' in dsn
    assert "535" in dsn


async def test_the_password_is_never_sent_without_tls(tmp_path: Path) -> None:
    secret = password_file(tmp_path)
    async with Sink() as sink:  # no STARTTLS offered
        route = configs.route("Smarthost", "127.0.0.1", sink.port)
        route += f'auth = {{ username = "relay", password_file = "{secret}" }}\n'
        toml = integration_toml(tmp_path, DNS, route + senders_route(2526), RULES)  # type: ignore[arg-type]
        with events() as log:
            async with InProcessRelay(tmp_path, toml) as relay:
                relay.put("alice@sender.test", ["bob@partner.test"])
                await until(lambda: relay.sample(
                    "relay_delivery_attempts_total",
                    route="Smarthost", host="127.0.0.1", result="auth_failed",
                ))  # fmt: skip
    assert sink.messages == []
    assert not any(line.startswith("AUTH") for line in sink.lines)
    assert "the password is sent only over TLS" in log.text()


def test_mechanism_preference() -> None:
    assert auth_mechanism(["PLAIN", "LOGIN", "CRAM-MD5"]) == "cram-md5"
    assert auth_mechanism(["LOGIN", "PLAIN"]) == "plain"
    assert auth_mechanism(["LOGIN"]) == "login"
    assert auth_mechanism(["XOAUTH2"]) is None


# --- configuration ------------------------------------------------------------

SERVER = '[server]\nhostname = "relay.test"\ndomains = ["corp.test"]\n'


def load(tmp_path: Path, route: str) -> config.Config:
    path = tmp_path / "relay.toml"
    path.write_text(SERVER + route + '[[rules]]\nrecipients = ["*"]\nroute = "Smarthost"\n')
    return configload.load(path)


def problems(tmp_path: Path, route: str) -> list[str]:
    with pytest.raises(configload.ConfigError) as info:
        load(tmp_path, route)
    return [str(p) for p in info.value.problems]


def test_a_password_file_others_can_read_is_refused_with_the_fix(tmp_path: Path) -> None:
    secret = password_file(tmp_path, mode=0o644)
    (problem,) = problems(tmp_path, auth_route(2525, secret))
    assert problem == (
        f"routes[1] 'Smarthost': auth.password_file: '{secret}' is readable by others "
        f"(mode 0644): a password file must be private; run: chmod 600 {secret}"
    )
    secret.chmod(0o600)
    route = load(tmp_path, auth_route(2525, secret)).routes[0]
    assert route.auth is not None and route.auth.password == PASSWORD
    # Never in a repr (log lines, tracebacks) nor in check-config's summary.
    assert PASSWORD not in repr(route) and PASSWORD not in "\n".join(
        configdiff.describe(load(tmp_path, auth_route(2525, secret)))
    )


def test_auth_config_problems(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    assert problems(tmp_path, auth_route(2525, missing)) == [
        f"routes[1] 'Smarthost': auth.password_file: cannot read '{missing}': "
        "No such file or directory"
    ]
    route = configs.route("Smarthost", "127.0.0.1", 2525) + 'auth = { password_file = "x" }\n'
    found = problems(tmp_path, route)
    assert "routes[1] 'Smarthost': auth.username: is required" in found[0]
    route = configs.route("Smarthost", "127.0.0.1", 2525) + "auth_over_plaintext = true\n"
    assert problems(tmp_path, route) == [
        "routes[1] 'Smarthost': auth_over_plaintext: applies to a route with auth = { ... } only"
    ]
    empty = password_file(tmp_path, password="")
    (problem,) = problems(tmp_path, auth_route(2525, empty))
    assert problem.endswith("holds no password on its first line")


def test_auth_over_plaintext_is_warned(tmp_path: Path) -> None:
    secret = password_file(tmp_path)
    route = configs.route("Smarthost", "127.0.0.1", 2525)
    route += f'auth = {{ username = "relay", password_file = "{secret}" }}\n'
    cfg = load(tmp_path, route + "auth_over_plaintext = true\n")
    warned = [str(w) for w in lint.warnings(cfg)]
    assert any("auth_over_plaintext: the password may be sent without TLS" in w for w in warned)
    cfg = load(tmp_path, auth_route(2525, secret, extra="auth_over_plaintext = true\n"))
    warned = [str(w) for w in lint.warnings(cfg)]
    assert any("auth_over_plaintext: has no effect: require_tls = true" in w for w in warned)


def test_the_audit_says_credentials_changed_and_never_the_password(tmp_path: Path) -> None:
    secret = password_file(tmp_path)
    old = load(tmp_path, auth_route(2525, secret))
    password_file(tmp_path, password="a-new-one")
    new = load(tmp_path, auth_route(2525, secret))
    changes = configdiff.diff(old, new)
    assert changes["routes"]["changed"] == {"Smarthost": {"credentials": ["(hidden)", "(hidden)"]}}
    lines = audit.format_entry({"time": "t", "event": "reload", "changes": changes})
    assert '  route "Smarthost": credentials changed' in lines
    snap = str(configdiff.snapshot(new))
    assert "a-new-one" not in snap and PASSWORD not in snap
    assert configdiff.diff(old, load(tmp_path, auth_route(2525, secret)))["routes"]["changed"]
    same = load(tmp_path, auth_route(2525, secret))
    assert configdiff.diff(new, same)["routes"]["changed"] == {}
    assert os.stat(secret).st_mode & 0o077 == 0
    assert re.fullmatch(
        r"[0-9a-f]{8}", configdiff.snapshot(new)["routes"]["Smarthost"]["credentials"]
    )


# --- relay test-tls -----------------------------------------------------------


@pytest.mark.timeout(60)
@pytest.mark.parametrize("good", [True, False])
async def test_test_tls_checks_auth_when_credentials_are_set(tmp_path: Path, good: bool) -> None:
    from tests.integration.test_testtls_cli import _config, _run

    pki = Pki(tmp_path / "pki")
    secret = password_file(tmp_path)
    tls = pki.server_context("127.0.0.1")
    account = PASSWORD if good else "another"
    async with AuthSink(username="relay", password=account, tls_context=tls) as sink:
        auth = f'auth = {{ username = "relay", password_file = "{secret}" }}\n'
        path = _config(tmp_path, pki, sink.port, auth)
        code, out, err = await _run(path)
        json_code, json_out, _ = await _run(path, "--json")
    assert not sink.messages
    assert PASSWORD not in out + err + json_out
    if good:
        assert code == 0 and json_code == 0, out + err
        assert "pass (PLAIN as relay)" in out and "verdict:          PASS" in out
        assert '"mechanism": "PLAIN"' in json_out
    else:
        assert code == 1 and json_code == 1, out + err
        assert "FAIL: route \"Downstream\": AUTH as 'relay' at 127.0.0.1 failed" in out
        assert "verdict:          FAIL (auth)" in out
