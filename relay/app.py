"""The composition root: builds everything from a Config and runs the daemon.

``relay run`` lands here. Start-up: load the config (or the embedded
default), open the spool (cleaning what a crash left), schedule every
spooled message, bind the SMTP listeners and the metrics endpoint, write
the pid file. Signals: SIGHUP reloads the config (an invalid one is
refused and the old one keeps running), SIGUSR1 flushes the queue,
SIGTERM/SIGINT stop gracefully (stop accepting, 421 to open sessions,
everything stays in the spool, exit 0 within ``SHUTDOWN_GRACE`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import signal
import ssl
import time
import tomllib
from collections.abc import Callable
from pathlib import Path

from relay import config as configmod
from relay import events, tls
from relay import metrics as metricsmod
from relay.audit import AuditLog
from relay.config import Config, ConfigError
from relay.delivery import Deliverer
from relay.dns import DnsResolver
from relay.inbound import Inbound, listen_texts
from relay.metrics import Metrics
from relay.queue import Scheduler
from relay.spool import Spool

#: Seconds SIGTERM may take: spool writes in flight, 421s, in-flight attempts.
SHUTDOWN_GRACE = 10.0

#: ``relay run`` with no --config, no $RELAY_CONFIG and no config/relay.toml
#: runs on this (DESIGN.md: one command runs the relay on an embedded
#: default). Relative paths are relative to the current directory.
DEFAULT_CONFIG_TOML = """\
[server]
hostname = "relay.localhost"
listen = ["127.0.0.1:2525"]
domains = ["example.com"]
relay_networks = ["127.0.0.0/8", "::1/128"]

[queue]
path = "var/spool"

[metrics]
listen = "127.0.0.1:9325"

[audit]
path = "var/audit.log"

[[routes]]
name = "Local sink"
host = "127.0.0.1"
port = 2526
require_tls = false
require_ca_signed = false
validate_hostname = false

[[rules]]
recipients = ["*"]
route = "Local sink"
"""

#: Shown as the config source when the embedded default is used.
EMBEDDED = "(embedded default)"


def default_config() -> Config:
    """The embedded default, with paths relative to the current directory."""
    source = Path.cwd() / EMBEDDED
    return configmod.parse(tomllib.loads(DEFAULT_CONFIG_TOML), source, "embedded")


def _server_tls_context(cfg: Config) -> ssl.SSLContext | None:
    """Inbound STARTTLS is offered only when a certificate is configured."""
    if cfg.server.tls_cert is None or cfg.server.tls_key is None:
        return None
    return tls.server_context(cfg.server.tls_cert, cfg.server.tls_key)


class PidFile:
    """``<queue.path>/relay.pid``: how ``relay reload`` and ``relay queue flush`` find us.

    The file is also a lock (flock): a second relay on the same spool
    cannot start, and a stale file from a killed relay is simply reused.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def lock(self) -> int | None:
        """Take the lock; None on success, else the pid of the relay that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            return int(holder) if holder.isdigit() else -1
        self._fd = fd
        return None

    def write(self) -> None:
        """Write our pid (once signal handlers are in place: they are what it invites)."""
        assert self._fd is not None
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, f"{os.getpid()}\n".encode(), 0)

    def remove(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


class Daemon:
    """One running relay. ``load`` reads the config (again, on SIGHUP)."""

    def __init__(self, load: Callable[[], Config]) -> None:
        self._load = load
        self._config = load()
        self._tls = _server_tls_context(self._config)
        self.metrics = Metrics()
        self.spool = Spool(self._config.queue.path)
        self.deliverer = Deliverer(self.config, DnsResolver(self._config.dns), self.metrics)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[bool]] = set()

    def config(self) -> Config:
        """The current config: every component reads it through this callable."""
        return self._config

    def tls_context(self) -> ssl.SSLContext | None:
        return self._tls

    async def run(self) -> int:
        cfg = self._config
        events.setup(cfg.log.format, cfg.log.level)
        pid_file = PidFile(cfg.pid_file)
        # Lock before touching the spool: open() cleans tmp/, which would
        # break the writes of a relay that is still running on it.
        holder = pid_file.lock()
        if holder is not None:
            events.error("already_running", pid=holder, pid_file=str(pid_file.path))
            return 1
        try:
            return await self._serve(cfg, pid_file)
        finally:
            pid_file.remove()

    async def _serve(self, cfg: Config, pid_file: PidFile) -> int:
        self.spool.open()
        scheduler = Scheduler(self.config, self.spool, self.deliverer, self.metrics)
        self._install_signals(scheduler)
        pid_file.write()
        recovered = 0
        for envelope in self.spool.load_all():
            scheduler.add(envelope)
            recovered += 1
        inbound = Inbound(
            self.config, self.spool, self.metrics, scheduler.add, tls_context=self.tls_context
        )
        metrics_server = None
        try:
            await inbound.start()
            if cfg.metrics.listen is not None:
                listen = cfg.metrics.listen
                metrics_server = await metricsmod.serve(
                    self.metrics, listen.host, listen.port, healthy=self.spool.writable
                )
        except OSError as exc:
            events.error("start_failed", error=str(exc))
            await inbound.stop(0)
            return 1
        self._applied(cfg, "start")
        run_task = asyncio.create_task(scheduler.run())
        events.log(
            "started",
            listen=",".join(listen_texts(inbound)),
            spool=str(self.spool.path),
            recovered=recovered,
            config=str(cfg.source),
            pid=os.getpid(),
        )
        try:
            await self._stop.wait()
        finally:
            await self._shutdown(inbound, scheduler, run_task, metrics_server)
        return 0

    async def _shutdown(
        self,
        inbound: Inbound,
        scheduler: Scheduler,
        run_task: asyncio.Task[None],
        metrics_server: asyncio.Server | None,
    ) -> None:
        events.log("stopping", grace=SHUTDOWN_GRACE)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        start = time.monotonic()
        await inbound.stop(grace=SHUTDOWN_GRACE / 2)
        remaining = max(0.5, SHUTDOWN_GRACE - (time.monotonic() - start))
        try:
            await asyncio.wait_for(scheduler.stop(remaining), remaining + 1)
        except TimeoutError:
            events.warning("scheduler_stop_timeout")
        run_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await run_task
        await self.deliverer.close()
        if metrics_server is not None:
            metrics_server.close()
            await metrics_server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        self.spool.close()
        events.log("stopped")

    def _install_signals(self, scheduler: Scheduler) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, scheduler.flush)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)

    def _spawn_reload(self) -> None:
        task = asyncio.create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self) -> bool:
        """SIGHUP: load the config again; swap it in only if it is valid."""
        old = self._config
        try:
            new = await asyncio.to_thread(self._load)
            server_tls = _server_tls_context(new)
        except ConfigError as exc:
            self.metrics.config_reloads.labels(result="error").inc()
            events.error("reload_failed", config=str(exc.path), problems=len(exc.problems))
            for problem in exc.problems:
                events.error("reload_problem", problem=str(problem))
            path, problems = exc.path, exc.problems
            self._audit(old, lambda log: log.record_refused(path, problems))
            return False
        except (OSError, ssl.SSLError) as exc:
            self.metrics.config_reloads.labels(result="error").inc()
            events.error("reload_failed", config=str(old.source), error=str(exc))
            return False
        # One reference swap: inbound and the scheduler read it per command.
        self._config, self._tls = new, server_tls
        # A CA file may have changed on disk under the same path.
        tls.client_context.cache_clear()
        if new.dns != old.dns:
            self.deliverer.use_resolver(DnsResolver(new.dns))
        self.metrics.config_reloads.labels(result="success").inc()
        if new.log != old.log:
            events.setup(new.log.format, new.log.level)
        for field in ("listen", "queue", "metrics"):
            changed = (
                old.server.listen != new.server.listen
                if field == "listen"
                else getattr(old, field) != getattr(new, field)
            )
            if changed:
                events.warning("reload_needs_restart", setting=field)
        self._applied(new, "reload", old)
        return True

    def _applied(self, new: Config, reason: str, old: Config | None = None) -> None:
        """A config took effect (start or reload): log it, and audit it."""
        events.log(
            "config_applied",
            reason=reason,
            config=str(new.source),
            sha256=new.sha256,
            routes=len(new.routes),
            rules=len(new.rules),
        )
        for line in configmod.describe(new):
            events.log("config", line=line)
        if old is None:
            self._audit(new, lambda log: log.record_start(new))
        else:
            self._audit(new, lambda log: log.record_reload(old, new))

    def _audit(self, cfg: Config, write: Callable[[AuditLog], None]) -> None:
        """Append to the audit log; a failed write is logged, never fatal to a reload."""
        try:
            write(AuditLog(cfg.audit.path))
        except OSError as exc:
            events.error("audit_failed", path=str(cfg.audit.path), error=str(exc))


def run(config_path: Path | None) -> int:
    """``relay run``: the daemon in the foreground until SIGTERM; the exit code.

    ``config_path`` None means the embedded default. Raises ConfigError
    for an invalid config at start (the CLI prints it and exits 2).
    """

    def load() -> Config:
        return default_config() if config_path is None else configmod.load(config_path)

    async def main() -> int:
        try:
            daemon = Daemon(load)
        except (OSError, ssl.SSLError) as exc:
            events.setup()
            events.error("start_failed", error=str(exc))
            return 1
        try:
            return await daemon.run()
        except OSError as exc:
            events.error("start_failed", error=str(exc))
            return 1

    return asyncio.run(main())
