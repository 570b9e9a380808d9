"""``relay run`` as a real subprocess: kill -9 recovery, SIGTERM, SIGHUP, SIGUSR1, pid file."""

from __future__ import annotations

import signal
import smtplib
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import app, errors
from relay import version as relay_version
from relay.spool import Spool
from tests.support.paths import ROOT
from tests.support.procs import DaemonUnderTest, RelayProcess, free_port

MSG = b"From: a@example.org\r\nSubject: hi\r\n\r\nHello.\r\n"


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[DaemonUnderTest]:
    with DaemonUnderTest(tmp_path) as daemon:
        yield daemon


def send(relay: DaemonUnderTest, rcpt: str = "user@example.com") -> None:
    client = relay.smtp()
    try:
        assert client.sendmail("sender@example.org", [rcpt], MSG) == {}
    finally:
        client.quit()


def test_kill_9_after_250_then_next_start_recovers(relay: DaemonUnderTest) -> None:
    relay.process.start(wait_for="event=started")
    client = relay.smtp()
    client.mail("sender@example.org")
    client.rcpt("user@example.com")
    code, text = client.data(MSG)
    assert code == 250
    queue_id = text.decode().split()[-1]
    relay.process.proc.kill()  # type: ignore[union-attr]
    relay.process.wait()
    client.close()

    spool = Spool(relay.spool_dir)
    assert [e.id for e in spool.load_all()] == [queue_id]
    (spool.tmp_dir / "junk.tmp").write_bytes(b"half-written")

    relay.process = RelayProcess(relay.config, cwd=relay.tmp_path)
    relay.process.start(wait_for="event=started")
    assert "recovered=1" in relay.process.log
    assert not (spool.tmp_dir / "junk.tmp").exists()
    assert relay.metric("relay_queue_messages") == "relay_queue_messages 1.0"
    listed = relay.cli("queue", "list")
    assert queue_id in listed.stdout, listed.stderr


def test_sigterm_421_to_open_sessions_exit_0_spool_kept(relay: DaemonUnderTest) -> None:
    relay.process.start(wait_for="event=started")
    send(relay)
    pid_file = relay.spool_dir / "relay.pid"
    assert pid_file.read_text().strip() == str(relay.process.proc.pid)  # type: ignore[union-attr]
    raw = socket.create_connection(("127.0.0.1", relay.port), timeout=10)
    lines = raw.makefile("rb")
    assert lines.readline().startswith(b"220 ")
    raw.sendall(b"EHLO client.test\r\n")
    while not lines.readline().startswith(b"250 "):
        pass
    started = time.monotonic()
    relay.process.signal(signal.SIGTERM)
    goodbye = lines.readline()
    lines.close()
    raw.close()
    assert goodbye == f"{errors.SHUTTING_DOWN}\r\n".encode()
    assert relay.process.wait(timeout=app.SHUTDOWN_GRACE + 5) == 0
    assert time.monotonic() - started < app.SHUTDOWN_GRACE
    assert not pid_file.exists()
    assert len(list(Spool(relay.spool_dir).load_all())) == 1


def test_sighup_refuses_invalid_config_then_applies_valid_one(relay: DaemonUnderTest) -> None:
    relay.process.start(wait_for="event=started")
    client = relay.smtp()
    client.mail("sender@example.org")
    assert client.rcpt("user@other.test")[0] == 550

    good = relay.config.read_text()
    relay.config.write_text(good.replace('route = "Corp"', 'route = "Nope"'))
    relay.process.signal(signal.SIGHUP)
    relay.process.wait_log("event=reload_failed")
    relay.process.wait_log("event=reload_problem")
    assert "no route is named 'Nope'" in relay.process.log
    assert 'result="error"} 1.0' in relay.metric("relay_config_reloads_total")
    assert client.rcpt("user@example.com")[0] == 250  # old config still in force

    relay.config.write_text(
        good.replace(
            'domains = ["example.com", "example.net"]', 'domains = ["other.test"]'
        ).replace('recipients = ["@example.com", "known@example.net"]', 'recipients = ["*"]')
    )
    relay.process.signal(signal.SIGHUP)
    relay.process.wait_log("reason=reload")
    # The open session sees the new config at its next command: no reconnect.
    assert client.rcpt("user@other.test")[0] == 250
    assert 'result="success"} 1.0' in relay.metric("relay_config_reloads_total")
    client.quit()


def test_queue_flush_and_reload_commands_signal_the_daemon(relay: DaemonUnderTest) -> None:
    relay.process.start(wait_for="event=started")
    send(relay)
    done = relay.cli("queue", "flush")
    assert done.returncode == 0, done.stderr
    relay.process.wait_log("event=flush messages=1")
    done = relay.cli("reload")
    assert done.returncode == 0, done.stderr
    relay.process.wait_log("reason=reload")
    [env] = Spool(relay.spool_dir).load_all()
    shown = relay.cli("queue", "show", env.id)
    assert shown.returncode == 0, shown.stderr
    assert "Received: from client.test (localhost [127.0.0.1])" in shown.stdout
    assert "<user@example.com> pending" in shown.stdout
    assert relay.cli("queue", "delete", env.id).returncode == 0
    assert list(Spool(relay.spool_dir).load_all()) == []


def test_second_daemon_on_same_spool_refuses(relay: DaemonUnderTest, tmp_path: Path) -> None:
    relay.process.start(wait_for="event=started")
    (tmp_path / "other").mkdir()
    other = DaemonUnderTest(tmp_path / "other")
    other.spool_dir = relay.spool_dir
    other.write()
    other.process.start(wait_for="event=already_running")
    assert other.process.wait() == 1


def test_listens_on_ipv4_and_ipv6(tmp_path: Path) -> None:
    try:
        port6 = free_port("::1")
    except OSError:
        pytest.skip("no IPv6 loopback")
    port4 = free_port()
    r = DaemonUnderTest(tmp_path, listen=[f"127.0.0.1:{port4}", f"[::1]:{port6}"])
    try:
        r.process.start(wait_for="event=started")
        for host, port in (("127.0.0.1", port4), ("::1", port6)):
            client = smtplib.SMTP(host, port, timeout=10)
            assert client.ehlo("client.test")[0] == 250
            client.mail("s@example.org")
            assert client.rcpt("user@example.com")[0] == 250
            client.quit()
        with urllib.request.urlopen(f"http://127.0.0.1:{r.metrics_port}/healthz", timeout=5) as h:
            assert h.status == 200
    finally:
        r.process.stop()


def test_embedded_default_config_runs_without_any_file(tmp_path: Path) -> None:
    cfg = app.default_config()
    assert [str(x) for x in cfg.server.listen] == ["127.0.0.1:2525"]
    assert cfg.queue.path == (Path.cwd() / "var/spool").resolve()
    proc = RelayProcess(None, cwd=tmp_path)
    try:
        try:
            proc.start(wait_for="event=")
            proc.wait_log("event=started", timeout=10)
        except AssertionError:
            if "Address already in use" in proc.log:
                pytest.skip("default ports 2525/9325 are taken on this machine")
            raise
        assert (tmp_path / "var/spool/relay.pid").exists()
        [started] = [x for x in proc.log.splitlines() if "event=started" in x]
        assert 'config="(embedded default)"' in started
    finally:
        proc.stop()
    assert proc.proc is not None and proc.proc.returncode == 0


def test_embedded_default_is_not_used_when_a_config_is_named(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "relay", "run", "--config", str(tmp_path / "missing.toml")],
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    assert "cannot read config file" in done.stderr


def test_embedded_default_matches_config_relay_toml() -> None:
    # One file read two ways: the embedded default is config/relay.toml as
    # packaged, whose paths land in the same place from the repository root.
    from relay import configdiff, configload

    shipped = configload.load(ROOT / "config/relay.toml")
    embedded = app.default_config()
    assert configdiff.describe(embedded) == configdiff.describe(shipped)
    for section in ("server", "delivery", "dns", "tls", "metrics", "log", "bounces"):
        assert getattr(embedded, section) == getattr(shipped, section), section
    for field in ("max_lifetime", "min_backoff", "max_backoff"):
        assert getattr(embedded.queue, field) == getattr(shipped.queue, field), field


def test_started_line_names_version_config_and_addresses(relay: DaemonUnderTest) -> None:
    relay.process.start(wait_for="event=started")
    [line] = [x for x in relay.process.log.splitlines() if "event=started" in x]
    assert f"version={relay_version()}" in line
    assert f"config={relay.config.resolve()}" in line
    assert f"listen=127.0.0.1:{relay.port}" in line
    assert f"metrics=127.0.0.1:{relay.metrics_port}" in line
