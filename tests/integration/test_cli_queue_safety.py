"""The CLI never signals a process it cannot prove is relay, and only reads the queue."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from relay.spool import Spool
from tests.integration.test_cli import relay
from tests.support.queue import spool_message
from tests.support.spool import body_path, update_envelope
from tests.unit.test_config import RULE, SERVER, SINGLE


def _config(tmp_path: Path) -> Path:
    path = tmp_path / "relay.toml"
    path.write_text(SERVER + SINGLE + RULE + f'\n[queue]\npath = "{tmp_path / "spool"}"\n')
    return path


def test_stale_pid_file_naming_a_live_process_is_not_signalled(tmp_path: Path) -> None:
    config = _config(tmp_path)
    # A relay killed with -9 left its pid file; the pid now belongs to someone else.
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / "spool").mkdir()
        (tmp_path / "spool" / "relay.pid").write_text(f"{bystander.pid}\n")
        for command in (("reload",), ("queue", "flush")):
            result = relay(*command, "--config", str(config))
            assert result.returncode == 1, result.stdout + result.stderr
            assert "no running relay found" in result.stderr
        assert bystander.poll() is None  # SIGHUP / SIGUSR1 would have killed it
    finally:
        bystander.kill()
        bystander.wait(5)


def test_queue_list_reports_corrupt_messages_and_moves_nothing(tmp_path: Path) -> None:
    config = _config(tmp_path)
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.open()
    good = spool_message(spool, ["bob@example.test"])
    bad = spool_message(spool, ["carol@example.test"])
    old = spool_message(spool, ["dave@example.test"])
    spool.quarantine.add(old.id)  # set aside earlier by the daemon
    (spool.msg_dir / f"{bad.id}.state").write_bytes(b"{truncated")
    result = relay("queue", "list", "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert good.id in result.stdout and bad.id not in result.stdout
    assert "-- 1 message(s), 1 pending recipient(s)" in result.stdout
    assert "warning: 2 corrupt message(s) (unreadable envelope)" in result.stdout
    assert str(spool.corrupt_dir) in result.stdout
    # Read-only: the unreadable envelope is where it was, with its body.
    assert (spool.msg_dir / f"{bad.id}.state").read_bytes() == b"{truncated"
    assert body_path(spool, bad.id).exists()
    show = relay("queue", "show", bad.id, "--config", str(config))
    assert show.returncode == 1 and "unreadable envelope" in show.stderr
    assert "Traceback" not in show.stderr


def test_queue_show_prints_the_headers_of_small_and_large_messages(tmp_path: Path) -> None:
    # One-file messages (envelope line first) and large bodies (read only
    # up to their header section) show the same way; no envelope line.
    from relay.spoolbody import IN_MEMORY_MAX

    config = _config(tmp_path)
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.open()
    big = b"Subject: big one\r\n\r\n" + b"x" * 76 + b"\r\n"
    big += b"y" * 76 * (IN_MEMORY_MAX // 70) + b"\r\n"
    small = spool_message(spool, ["bob@example.test"])
    large = spool_message(spool, ["carol@example.test"], body=big)
    for env, subject in ((small, "Subject: hello"), (large, "Subject: big one")):
        shown = relay("queue", "show", env.id, "--config", str(config))
        assert shown.returncode == 0, shown.stderr
        assert subject in shown.stdout
        assert "#relay-envelope" not in shown.stdout
        assert "yyyy" not in shown.stdout
    # A body being deleted (its envelope left by a delete cut short).
    assert update_envelope(spool, small)
    body_path(spool, small.id).unlink()
    legacy = tmp_path / "spool" / "msg" / f"{small.id}.json"
    legacy.write_bytes(small.dumps())
    shown = relay("queue", "show", small.id, "--config", str(config))
    assert shown.returncode == 0 and "being deleted" in shown.stdout
