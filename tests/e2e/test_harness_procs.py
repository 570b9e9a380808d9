"""RelayProcess starts, signals and reaps a daemon; tested with a stand-in daemon.

The real ``python -m relay run`` is exercised by the scenario tests; here a
tiny asyncio SMTP greeter with the same command-line shape proves the
process handling on its own: readiness on the configured port, stderr
capture, graceful stop, kill -9, and clear failures for a daemon that dies
or never listens.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.procs import RESERVATION_NAME, RelayProcess, free_port, port_open, swaks

# Reads [server] listen from the config it is given, greets, logs to stderr,
# exits 0 on SIGTERM and logs SIGHUP: the shape of `relay run` (README.md).
FAKE_DAEMON = r"""
import asyncio, signal, sys, tomllib
cfg = tomllib.load(open(sys.argv[-1], "rb"))
host, port = cfg["server"]["listen"][0].rsplit(":", 1)
mode = cfg.get("fake", {}).get("mode", "serve")
if mode == "die":
    print("fatal: cannot start", file=sys.stderr, flush=True)
    sys.exit(3)

async def greet(reader, writer):
    writer.write(b"220 fake ESMTP\r\n")
    while line := await reader.readline():
        if line.upper().startswith(b"QUIT"):
            writer.write(b"221 bye\r\n")
            break
        writer.write(b"250 ok\r\n")
    writer.close()

async def main():
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    reload = lambda: print("event=reload", file=sys.stderr, flush=True)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if mode == "mute":
        await stop.wait()
        return
    server = await asyncio.start_server(greet, host, int(port))
    print(f"event=listening addr={host}:{port}", file=sys.stderr, flush=True)
    async with server:
        await stop.wait()
    print("event=stopped", file=sys.stderr, flush=True)

asyncio.run(main())
"""


class FakeRelay(RelayProcess):
    @property
    def argv(self) -> list[str]:
        return [self.python, "-c", FAKE_DAEMON, "--config", str(self.config_path)]


def config(tmp_path: Path, mode: str = "serve") -> tuple[Path, int]:
    port = free_port()
    path = tmp_path / "relay.toml"
    path.write_text(f'[server]\nlisten = ["127.0.0.1:{port}"]\n[fake]\nmode = "{mode}"\n')
    return path, port


def test_start_waits_for_port_then_stop_is_graceful(tmp_path: Path) -> None:
    path, port = config(tmp_path)
    proc = FakeRelay(path)
    assert proc.argv[-2:] == ["--config", str(path)]
    assert RelayProcess(path).argv[1:4] == ["-m", "relay", "run"]
    with proc:
        assert (proc.host, proc.port) == ("127.0.0.1", port)
        assert port_open("127.0.0.1", port)
        assert swaks("--server", f"127.0.0.1:{port}", "--quit-after", "EHLO").returncode == 0
        proc.reload()
        proc.wait_for_stderr("event=reload")
    assert proc.returncode == 0
    assert proc.stderr_lines()[0].startswith("event=listening")
    assert proc.stderr_lines()[-1] == "event=stopped"
    proc.cleanup()


def test_kill9_then_restart(tmp_path: Path) -> None:
    path, port = config(tmp_path)
    proc = FakeRelay(path).start()
    try:
        proc.kill9()
        assert proc.returncode == -signal.SIGKILL
        assert not port_open("127.0.0.1", port)
        proc.start()
        assert port_open("127.0.0.1", port)
        assert sum("event=listening" in line for line in proc.stderr_lines()) == 2
    finally:
        proc.cleanup()


def test_daemon_that_exits_early_reports_its_stderr(tmp_path: Path) -> None:
    path, _ = config(tmp_path, mode="die")
    proc = FakeRelay(path)
    with pytest.raises(RuntimeError, match="(?s)exited with 3.*fatal: cannot start"):
        proc.start(timeout=10)
    proc.cleanup()


def test_daemon_that_never_listens_times_out_and_is_killed(tmp_path: Path) -> None:
    path, port = config(tmp_path, mode="mute")
    proc = FakeRelay(path)
    with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}"):
        proc.start(timeout=1.5)
    assert proc.returncode == -signal.SIGKILL
    proc.cleanup()


def test_uses_the_interpreter_running_the_tests(tmp_path: Path) -> None:
    path, _ = config(tmp_path)
    assert RelayProcess(path).argv[0] == sys.executable


# --- free_port: what no other process is handed meanwhile ----------------------------


def test_free_port_is_never_a_port_the_kernel_hands_out_by_itself() -> None:
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    assert not [p for p in ports if low <= p <= high]
    # What took a daemon's port before: a port-0 listener (or a connection's
    # source port) elsewhere on the machine, drawn from that range.
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        assert low <= other.getsockname()[1] <= high


def test_a_port_handed_out_stays_reserved_for_other_processes() -> None:
    port = free_port()
    probe = (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        "try:\n"
        f"    s.bind({RESERVATION_NAME % port!r})\n"
        "except OSError:\n"
        "    sys.exit(7)\n"
    )
    assert subprocess.run([sys.executable, "-c", probe], timeout=30).returncode == 7
