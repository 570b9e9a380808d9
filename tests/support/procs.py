"""Subprocess helpers for end-to-end tests: the relay daemon, swaks, ports, polling.

Everything here is bounded in time: every wait takes a timeout and raises
``TimeoutError`` naming what it was waiting for, so a broken scenario fails
with a message instead of hanging until pytest-timeout fires.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from relay.configvalues import parse_listen
from tests.support.peers import SWAKS, require_swaks

T = TypeVar("T")

ROOT = Path(__file__).resolve().parents[2]


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago (bind to port 0, close)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for(
    predicate: Callable[[], T | None],
    timeout: float,
    *,
    interval: float = 0.05,
    what: str = "condition",
) -> T:
    """Poll ``predicate`` until it returns a truthy value and return that value.

    Raises ``TimeoutError(what)`` after ``timeout`` seconds. The predicate is
    always called at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout:.1f}s waiting for {what}")
        time.sleep(interval)


def port_open(host: str, port: int) -> bool:
    """True when a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def wait_port(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until host:port accepts TCP connections."""
    wait_for(lambda: port_open(host, port), timeout, what=f"{host}:{port} to accept connections")


def wait_port_closed(host: str, port: int, timeout: float = 10.0) -> None:
    """Wait until host:port refuses TCP connections."""
    wait_for(lambda: not port_open(host, port), timeout, what=f"{host}:{port} to close")


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


# start()'s ``wait_for`` parameter shadows the function of that name.
_wait_until = wait_for


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
            _wait_until(
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

        return wait_for(find, timeout, what=f"relay stderr line containing {needle!r}")

    def cleanup(self) -> None:
        """Stop the daemon and delete the captured logs."""
        self.stop()
        for path in (self.stderr_path, self.stdout_path):
            path.unlink(missing_ok=True)

    def __enter__(self) -> RelayProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


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

TomlValue = str | int | float | bool | Path | list[str] | tuple[str, ...]


def _toml(value: TomlValue) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(item) for item in value) + "]"
    # TOML basic strings accept JSON's escapes.
    return json.dumps(str(value))


def _table(header: str, items: Mapping[str, object]) -> list[str]:
    lines = [header]
    nested: list[str] = []
    for key, value in items.items():
        if isinstance(value, list) and value and isinstance(value[0], Mapping):
            # An array of tables inside a table: [[routes.primary]] etc.
            for sub in value:
                nested += ["", *_table(f"[[{header.strip('[]')}.{key}]]", sub)]
        else:
            lines.append(f"{key} = {_toml(value)}")  # type: ignore[arg-type]
    return lines + nested


def route(
    name: str,
    host: str = "127.0.0.1",
    port: int = 25,
    *,
    tls: str = "opportunistic",
    mx_lookup: bool = False,
    primary: Sequence[Mapping[str, object]] = (),
    secondary: Sequence[Mapping[str, object]] = (),
) -> dict[str, object]:
    """One ``[[routes]]`` table. ``tls``: "opportunistic" (no checks), "required"
    (STARTTLS only), "ca" (plus a CA-signed chain) or "full" (plus hostname match).
    With ``primary`` (and ``secondary``) lists of ``{"host", "port", "load"}`` it is
    a multiple-host route and ``host``/``port`` are ignored.
    """
    levels = {
        "opportunistic": (False, False, False),
        "required": (True, False, False),
        "ca": (True, True, False),
        "full": (True, True, True),
    }
    require_tls, require_ca, check_name = levels[tls]
    table: dict[str, object] = {"name": name}
    if primary:
        table["primary"] = [dict(h) for h in primary]
        if secondary:
            table["secondary"] = [dict(h) for h in secondary]
    else:
        table |= {"host": host, "port": port}
    return table | {
        "mx_lookup": mx_lookup,
        "require_tls": require_tls,
        "require_ca_signed": require_ca,
        "validate_hostname": check_name,
    }


def relay_config(
    directory: Path,
    routes: Sequence[Mapping[str, object]],
    rules: Sequence[tuple[Sequence[str], str]] | None = None,
    *,
    domains: Sequence[str] = ("example.org",),
    port: int | None = None,
    name: str = "relay",
    **sections: Mapping[str, object],
) -> Path:
    """Write ``directory/<name>.toml`` for a relay under test and return its path.

    Defaults suit a scenario: listen and metrics on free loopback ports,
    spool and audit log inside ``directory``, retries after 1-2 s, short
    delivery timeouts and hold-downs, 127.0.0.0/8 may relay. ``rules`` are (patterns,
    route name) pairs, default: every recipient to the first route. Any
    ``sections`` (``server={...}``, ``queue={...}``, ``tls={"ca_file": ...}``,
    ``dns={"nameservers": [...]}``...) are merged over the defaults.
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
    for key, values in sections.items():
        defaults[key] = {**defaults.get(key, {}), **values}
    if rules is None:
        rules = [(["*"], str(routes[0]["name"]))]
    lines: list[str] = []
    for key, values in defaults.items():
        lines += [*_table(f"[{key}]", values), ""]
    for table in routes:
        lines += [*_table("[[routes]]", table), ""]
    for patterns, route_name in rules:
        lines += [*_table("[[rules]]", {"recipients": list(patterns), "route": route_name}), ""]
    path = directory / f"{name}.toml"
    path.write_text("\n".join(lines))
    return path
