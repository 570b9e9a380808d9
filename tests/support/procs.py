"""Subprocess helpers for end-to-end tests: the relay daemon, swaks, ports.

Everything here is bounded in time: every wait takes a timeout and raises
``TimeoutError`` naming what it was waiting for (tests/support/wait.py), so a broken scenario fails
with a message instead of hanging until pytest-timeout fires.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import smtplib
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from relay.configvalues import parse_listen
from tests.support import configs
from tests.support.inbound import inbound_toml
from tests.support.paths import ROOT
from tests.support.peers import SWAKS, require_swaks
from tests.support.wait import blocking_until

#: How long a port free_port handed out stays reserved against every other
#: free_port caller on this loopback (seconds): far longer than any daemon
#: takes to bind it.
PORT_RESERVATION = 300.0
#: The abstract Unix socket name that reserves a port (``% port``).
RESERVATION_NAME = "\0relay-test-port-%d"
_reservations: list[tuple[float, socket.socket]] = []
_random = random.SystemRandom()  # whatever a test seeds the random module with


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that is free now and is handed to nobody else meanwhile.

    Every daemon, sink and peer a test starts on a port of its own gets it
    here. Binding port 0 and closing the socket (as this once did) leaves a
    window, until the daemon binds, in which the kernel may give the same
    port to anyone on the machine: another test's port-0 listener, or the
    source port of any outgoing connection, all drawn from the ephemeral
    range (``/proc/sys/net/ipv4/ip_local_port_range``); a worker then failed
    to bind with EADDRINUSE. So the port is drawn from outside that range,
    where the kernel assigns none by itself, and reserved for
    :data:`PORT_RESERVATION` seconds under an abstract Unix socket name,
    which every process sharing this network namespace sees whatever its
    chroot, so no other caller of this function hands it out meanwhile.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    now = time.monotonic()
    while _reservations and now - _reservations[0][0] > PORT_RESERVATION:
        _reservations.pop(0)[1].close()
    candidates = _outside_ephemeral_range()
    for _ in range(1000):
        port = _random.choice(candidates)
        reservation = _reserve(port)
        if reservation is None:
            continue
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            try:
                sock.bind((host, port))
            except OSError:
                reservation.close()
                continue
        _reservations.append((now, reservation))
        return port
    raise RuntimeError(f"no free port on {host} outside the ephemeral range")


def _outside_ephemeral_range() -> range:
    """Ports the kernel never hands out by itself: below the ephemeral range
    (or above it, when below leaves too few)."""
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        low, high = (int(part) for part in text.split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    below = range(max(1024, low - 10000), low)
    above = range(high + 1, 65536)
    return below if len(below) >= len(above) else above


def _reserve(port: int) -> socket.socket | None:
    """Hold ``port``'s reservation name; None if another process holds it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(RESERVATION_NAME % port)
    except OSError:
        sock.close()
        return None
    return sock


def port_open(host: str, port: int) -> bool:
    """True when a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until host:port accepts TCP connections."""
    blocking_until(
        lambda: port_open(host, port), timeout, what=f"{host}:{port} to accept connections"
    )


def wait_port_closed(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until host:port refuses TCP connections."""
    blocking_until(lambda: not port_open(host, port), timeout, what=f"{host}:{port} to close")


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    # The state letter follows the parenthesised command name (which may hold spaces).
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def swaks(
    *args: str, timeout: float = 30.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run ``swaks ARGS`` with a bounded runtime and return the finished process.

    swaks' own ``--timeout`` (per SMTP step) is set to 10 s unless the caller
    passes one. stdout holds the transcript; ``check=True`` raises on a
    non-zero exit (swaks exits 2x for connection errors and 2x/3x/4x for
    rejected commands, see swaks(1) "EXIT CODES").
    """
    require_swaks(tls="--tls" in args)
    argv = [SWAKS, *args]
    if "--timeout" not in args and "-to" not in args:
        argv += ["--timeout", "10"]
    return subprocess.run(
        argv,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=check,
    )


def _first_listener(config_path: Path) -> tuple[str, int]:
    with config_path.open("rb") as handle:
        raw = tomllib.load(handle)
    listen = raw.get("server", {}).get("listen", ["127.0.0.1:2525"])
    first = parse_listen(str(listen[0]))
    return first.host, first.port


@dataclass
class RelayProcess:
    """``python -m relay run [--config CONFIG]`` as a child process.

    ``start()`` returns once the first ``[server] listen`` address accepts TCP
    connections, or, with ``wait_for=TEXT``, once TEXT is in this run's stderr
    (what the daemon tests wait on: ``event=started``, ``event=already_running``).
    stderr (the event log) goes to a file so the child never blocks on a full
    pipe (``<config stem>.stderr.log`` in ``log_dir``, default ``cwd``); read
    this run's with ``log`` / ``wait_log()``, every run's with ``stderr_lines()``.
    The child runs in ``cwd`` (default: next to the config; required without
    one) with this checkout on PYTHONPATH and no RELAY_CONFIG. Use as a context
    manager, or call ``stop()`` in a finalizer: it never leaves the child behind.
    """

    config_path: Path | None
    env: Mapping[str, str] | None = None
    python: str = sys.executable
    startup_timeout: float = 15.0
    # Where stderr/stdout are captured; default: cwd.
    log_dir: Path | None = None
    cwd: Path | None = None

    def __post_init__(self) -> None:
        if self.config_path is None:
            if self.cwd is None:
                raise ValueError("a RelayProcess without a config needs a cwd")
            stem = "relay"
        else:
            self.config_path = Path(self.config_path)
            stem = self.config_path.stem
        # The first listener, read from the config at each start().
        self.host, self.port = "127.0.0.1", 2525
        self.cwd = Path(self.cwd) if self.cwd else self.config_path.parent  # type: ignore[union-attr]
        self._proc: subprocess.Popen[bytes] | None = None
        log_dir = Path(self.log_dir) if self.log_dir else self.cwd
        self.stderr_path = log_dir / f"{stem}.stderr.log"
        self.stdout_path = log_dir / f"{stem}.stdout.log"
        # Where this run's stderr starts in the file (earlier runs come before it).
        self._log_start = 0

    @property
    def argv(self) -> list[str]:
        args = [self.python, "-m", "relay", "run"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        return args

    @property
    def child_env(self) -> dict[str, str]:
        """The child's environment; also right for ``python -m relay`` CLI calls."""
        env = dict(os.environ)
        env.pop("RELAY_CONFIG", None)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        env.update(self.env or {})
        return env

    def cli(self, *args: str, config: Path | None = None) -> subprocess.CompletedProcess[str]:
        """``python -m relay ARGS --config CONFIG`` (default: this daemon's config)
        in the daemon's environment; output captured as text, 30 s at most."""
        config = config or self.config_path
        assert config is not None, "no config to run the CLI against"
        return subprocess.run(
            [self.python, "-m", "relay", *args, "--config", str(config)],
            env=self.child_env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )

    @property
    def proc(self) -> subprocess.Popen[bytes] | None:
        return self._proc

    @property
    def pid(self) -> int:
        assert self._proc is not None, "relay not started"
        return self._proc.pid

    @property
    def returncode(self) -> int | None:
        return None if self._proc is None else self._proc.poll()

    def start(self, timeout: float | None = None, *, wait_for: str | None = None) -> RelayProcess:
        """Spawn the daemon and wait until its SMTP port accepts connections.

        Raises ``RuntimeError`` with the tail of stderr if the process exits
        first, ``TimeoutError`` if the port never opens (the child is killed).
        With ``wait_for``, waits for that stderr text instead, as ``wait_log``.
        """
        assert self._proc is None or self._proc.poll() is not None, "relay already running"
        if self.config_path is not None:
            self.host, self.port = _first_listener(self.config_path)
        # The child keeps its own descriptors; ours are closed right away.
        with self.stderr_path.open("ab") as err, self.stdout_path.open("ab") as out:
            self._log_start = err.tell()
            self._proc = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=err,
                env=self.child_env,
                cwd=self.cwd,
                start_new_session=True,  # its own process group: kill9() reaches any children
            )
        if wait_for is not None:
            self.wait_log(wait_for, timeout or self.startup_timeout)
            return self

        def ready() -> bool:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(
                    f"relay exited with {self._proc.returncode} before listening on "
                    f"{self.host}:{self.port}; stderr:\n" + "\n".join(self.stderr_lines()[-30:])
                )
            return port_open(self.host, self.port)

        try:
            blocking_until(
                ready, timeout or self.startup_timeout, what=f"relay on {self.host}:{self.port}"
            )
        except TimeoutError:
            self.kill9()
            raise
        return self

    @property
    def log(self) -> str:
        """This run's stderr so far (since the last ``start()``)."""
        try:
            with self.stderr_path.open("rb") as handle:
                handle.seek(self._log_start)
                return handle.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, text: str, timeout: float = 10) -> None:
        """Wait until ``text`` is in this run's stderr; AssertionError (with the log)
        if the daemon exits first or ``timeout`` s pass."""
        deadline = time.monotonic() + timeout
        while text not in self.log:
            assert self._proc is not None, "relay not started"
            if self._proc.poll() is not None:
                raise AssertionError(f"relay exited {self._proc.returncode}:\n{self.log}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{text!r} not logged in {timeout}s:\n{self.log}")
            time.sleep(0.05)

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the daemon (SIGHUP reloads, SIGTERM stops)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(sig)

    def reload(self) -> None:
        self.signal(signal.SIGHUP)

    def wait(self, timeout: float = 15) -> int:
        """Wait for the daemon to exit by itself; its exit code."""
        assert self._proc is not None, "relay not started"
        return self._proc.wait(timeout)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s (past the daemon's 10 s shutdown grace),
        then SIGKILL. Returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        return self._proc.returncode

    def kill9(self) -> None:
        """SIGKILL the daemon's whole process group at once (simulated crash)."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)

    def stderr_lines(self) -> list[str]:
        """Every stderr line written so far (all runs of this object)."""
        try:
            return self.stderr_path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            return []

    def wait_for_stderr(self, needle: str, timeout: float = 10.0) -> str:
        """Wait until a stderr line contains ``needle``; return that line."""

        def find() -> str | None:
            return next((line for line in self.stderr_lines() if needle in line), None)

        return blocking_until(find, timeout, what=f"relay stderr line containing {needle!r}")

    def cleanup(self) -> None:
        """Stop the daemon and delete the captured logs."""
        self.stop()
        for path in (self.stderr_path, self.stdout_path):
            path.unlink(missing_ok=True)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


class DaemonUnderTest:
    """``relay run`` on free loopback ports: its config file in ``tmp_path``
    (tests/support/inbound.py's ``inbound_toml``: example.com to route Corp),
    and the RelayProcess that runs it (not started)."""

    def __init__(self, tmp_path: Path, listen: Sequence[str] | None = None) -> None:
        self.tmp_path = tmp_path
        self.port = free_port()
        self.metrics_port = free_port()
        self.spool_dir = tmp_path / "spool"
        self.config = tmp_path / "relay.toml"
        self.audit = tmp_path / "audit.log"
        self.listen = list(listen or [f"127.0.0.1:{self.port}"])
        self.write()
        self.process = RelayProcess(self.config, cwd=tmp_path)

    def write(
        self, *, spool: Path | None = None, metrics: int | None = None, lifetime: str = "5d"
    ) -> None:
        """(Re)write the config: by default this spool and metrics port, 5 days' lifetime."""
        text = inbound_toml(
            spool or self.spool_dir,
            metrics=f"127.0.0.1:{metrics or self.metrics_port}",
            listen=self.listen,
            queue={"max_lifetime": lifetime},
            extra=configs.table("[audit]", {"path": self.audit}),
        )
        self.config.write_text(text)

    def smtp(self) -> smtplib.SMTP:
        """A client that said EHLO."""
        client = smtplib.SMTP("127.0.0.1", self.port, timeout=10)
        client.ehlo("client.test")
        return client

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text: str = resp.read().decode()
        return text

    def metric(self, line_start: str) -> str:
        """The exposition's lines that start with ``line_start``."""
        lines = self.metrics().splitlines()
        return "\n".join(line for line in lines if line.startswith(line_start))

    def reloads(self, result: str) -> str:
        """``relay_config_reloads_total{result=...}``'s value, as exposed."""
        needle = f'relay_config_reloads_total{{result="{result}"}} '
        lines = self.metrics().splitlines()
        return next(line for line in lines if line.startswith(needle))[len(needle) :]

    def audit_entries(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.audit.read_text().splitlines()]

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.process.cli(*args, config=self.config)

    def __enter__(self) -> DaemonUnderTest:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.process.stop()


def iter_tree(root_pid: int, *, zombies: bool = False) -> Iterator[int]:
    """``root_pid`` and all its live descendants (from /proc, one pass).

    With ``zombies`` also exited-but-unreaped ones (their CPU times are still
    readable and not yet in the parent's cutime).
    """
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    stack = [root_pid]
    while stack:
        pid = stack.pop()
        if zombies or pid_alive(pid):
            yield pid
        stack.extend(children.get(pid, ()))


def kill_tree(root_pid: int) -> None:
    """SIGKILL ``root_pid`` and its descendants (children first found, then all)."""
    for pid in reversed(list(iter_tree(root_pid))):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- relay configs for scenarios --------------------------------------------------


def relay_config(
    directory: Path,
    routes: str,
    rules: str = "",
    *,
    domains: Sequence[str] = ("example.org",),
    port: int | None = None,
    name: str = "relay",
    **sections: Mapping[str, object],
) -> Path:
    """Write ``directory/<name>.toml`` for a relay under test and return its path.

    ``routes`` and ``rules`` come from tests/support/configs.py; default rule:
    every recipient to the first route. Defaults suit a scenario: listen and
    metrics on free loopback ports, spool and audit log inside ``directory``,
    retries after 1-2 s, short delivery timeouts and hold-downs, 127.0.0.0/8
    may relay. Any ``sections`` (``server={...}``, ``queue={...}``,
    ``tls={"ca_file": ...}``, ``dns={"nameservers": [...]}``...) are merged
    over the defaults.
    """
    directory.mkdir(parents=True, exist_ok=True)
    defaults: dict[str, dict[str, object]] = {
        "server": {
            "hostname": "relay.test",
            "listen": [f"127.0.0.1:{port or free_port()}"],
            "domains": list(domains),
            "relay_networks": ["127.0.0.0/8"],
        },
        "queue": {
            "path": str(directory / f"{name}-spool"),
            "min_backoff": "1s",
            "max_backoff": "2s",
        },
        # Hold-downs as short as the retries: a downstream that comes back
        # is tried again at once (relay.health).
        "delivery": {
            "connect_timeout": "5s",
            "command_timeout": "30s",
            "hold_down": "1s",
            "max_hold_down": "2s",
        },
        "metrics": {"listen": f"127.0.0.1:{free_port()}"},
        "audit": {"path": str(directory / f"{name}-audit.log")},
    }
    rules = rules or configs.rule(configs.first_route_name(routes), "*")
    path = directory / f"{name}.toml"
    path.write_text(configs.relay_toml(configs.merged(defaults, sections), routes, rules))
    return path
