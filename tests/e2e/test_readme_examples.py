"""README.md's examples are what the commands print.

Each ```text block of the README that starts with ``$ relay ...`` is
compared with the output of that command run here, on the README's own
set-up (config/relay.toml on free ports, the README's sink, the configs in
tests/data/bad_configs/readme and tests/data/warning_configs/readme). What differs
from one run to the next is normalised on both sides before comparing:
queue ids, hashes, absolute paths and numbers (see ``normalise``). The log lines
are compared by event and keys. A failure prints the real output: paste
it into README.md.
"""

from __future__ import annotations

import os
import re
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import version
from tests.support.paths import DATA, ROOT
from tests.support.procs import RelayProcess, free_port, wait_port

README = (ROOT / "README.md").read_text()
MSG = b"From: me@example.org\r\nTo: user@example.com\r\nSubject: hello\r\n\r\nthrough relay\r\n"


def example(command: str) -> str:
    """The output the README shows for ``$ command`` (the block's lines after it)."""
    for block in re.findall(r"```text\n(.*?)```", README, re.S):
        first, _, rest = block.partition("\n")
        if first == f"$ {command}":
            return rest
    raise AssertionError(f"README.md has no ```text block starting with `$ {command}`")


def normalise(text: str) -> list[str]:
    """The parts of an output that are the same on every run and machine."""
    text = re.sub(r"\b[0-9A-Z]{16,}\b", "ID", text)  # queue ids
    text = re.sub(r"\b[0-9a-f]{8,}\b", "HEX", text)  # hashes
    text = re.sub(r"(?<![\w.])/[^\s'\"`:,)]*", "PATH", text)  # absolute paths
    text = re.sub(r"\d+", "0", text)
    text = re.sub(r"[ \t]+", " ", text)
    return [line.rstrip() for line in text.strip().splitlines()]


def assert_shown(command: str, output: str) -> None:
    shown = example(command)
    assert normalise(output) == normalise(shown), (
        f"README.md shows for `$ {command}`:\n{shown}\nbut the command prints:\n{output}"
    )


def labels(text: str) -> list[str]:
    """Each line's label (the words before its first colon), repeats collapsed."""
    found: list[str] = []
    for line in normalise(text):
        label = line.split(":", 1)[0].strip() if ":" in line else line
        if not found or found[-1] != label:
            found.append(label)
    return found


def keys(line: str) -> list[str]:
    """A key=value log line's event and keys, in order."""
    pairs = re.findall(r'(\w+)=(?:"(?:[^"\\]|\\.)*"|\S*)', line)
    return [f"event={line.split('event=')[1].split()[0]}"] + [k for k in pairs if k != "event"]


def run(*args: str, cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    """``relay ARGS`` as the README runs it: stderr (the config line first), then stdout."""
    clean = {k: v for k, v in os.environ.items() if k != "RELAY_CONFIG"}
    done = subprocess.run(
        [sys.executable, "-m", "relay", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**clean, "PYTHONPATH": str(ROOT), **(env or {})},
        check=False,
    )
    return done.stderr + done.stdout


def test_version() -> None:
    assert run("--version") == f"relay {version()}\n"
    assert_shown("relay --version", run("--version"))


def test_check_config_valid() -> None:
    assert_shown("relay check-config", run("check-config"))


def test_check_config_invalid() -> None:
    case = DATA / "bad_configs/readme"
    assert_shown(
        "relay check-config --config relay.toml",
        run("check-config", "--config", "relay.toml", cwd=case),
    )


def test_check_config_warnings() -> None:
    case = DATA / "warning_configs/readme"
    assert_shown(
        "relay check-config --config /etc/relay/relay.toml",
        run("check-config", "--config", "relay.toml", cwd=case),
    )


class Sink:
    """The README's sink: ``.venv/bin/python -m aiosmtpd -n -l 127.0.0.1:PORT``."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{self.port}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_port("127.0.0.1", self.port)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Session:
    """What the README's quick start leaves behind: the log, a queued message, an audit log."""

    folder: Path
    config: Path
    sink_port: int
    log: str


def send(port: int) -> None:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("me@example.org", ["user@example.com"], MSG)


@pytest.fixture(scope="module")
def session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Session]:
    """config/relay.toml on free ports: one message delivered to the sink, then
    (the sink stopped) one deferred; the relay stopped so the queue is still."""
    folder = tmp_path_factory.mktemp("readme")
    (folder / "config").mkdir()
    port, sink_port, metrics_port = free_port(), free_port(), free_port()
    text = (ROOT / "config/relay.toml").read_text()
    text = text.replace("2525", str(port)).replace("2526", str(sink_port))
    text = text.replace("9325", str(metrics_port))
    config = folder / "config/relay.toml"
    config.write_text(text)
    sink = Sink(sink_port)
    sink.start()
    relay = RelayProcess(config, cwd=folder)
    try:
        relay.start(wait_for="event=started")
        send(port)
        relay.wait_log("event=delivered")
        sink.stop()
        send(port)
        relay.wait_log("event=deferred")
        relay.stop()
        yield Session(folder, config, sink_port, relay.log)
    finally:
        relay.stop()
        sink.stop()


def test_log_lines(session: Session) -> None:
    for event in ("started", "accepted", "attempt", "delivered"):
        [real] = [x for x in session.log.splitlines() if f" event={event} " in x][:1]
        [shown] = [x for x in example("relay run").splitlines() if f" event={event} " in x]
        assert keys(real) == keys(shown), f"README.md shows:\n{shown}\nrelay logs:\n{real}"


def test_queue_list(session: Session) -> None:
    assert_shown("relay queue list", run("queue", "list", cwd=session.folder))


def test_audit(session: Session) -> None:
    assert_shown("relay audit", run("audit", cwd=session.folder))


def test_test_tls_against_a_sink(tmp_path: Path) -> None:
    """The README's failing host: a route requiring TLS to a sink that offers none."""
    sink = Sink(free_port())
    sink.start()
    try:
        (tmp_path / "config").mkdir()
        (tmp_path / "config/relay.toml").write_text(
            '[server]\ndomains = ["example.com"]\n\n'
            f'[[routes]]\nname = "On-prem Exchange"\nhost = "127.0.0.1"\nport = {sink.port}\n\n'
            '[[rules]]\nrecipients = ["*"]\nroute = "On-prem Exchange"\n'
        )
        output = run("test-tls", "On-prem Exchange", cwd=tmp_path)
    finally:
        sink.stop()
    shown = example('relay test-tls "On-prem Exchange"')
    assert labels(output) == labels(shown), (
        f"README.md shows:\n{shown}\nbut the command prints:\n{output}"
    )


def test_no_example_is_left_unchecked() -> None:
    """Every ``$ relay`` example block is one of those above."""
    checked = {
        "relay --version",
        "relay check-config",
        "relay check-config --config relay.toml",
        "relay check-config --config /etc/relay/relay.toml",
        "relay run",
        "relay queue list",
        "relay audit",
        'relay test-tls "On-prem Exchange"',
    }
    blocks = re.findall(r"```text\n\$ (relay[^\n]*)\n", README)
    assert set(blocks) == checked
