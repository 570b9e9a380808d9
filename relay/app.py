"""The composition root: builds everything from a Config and runs the daemon.

``relay run`` lands here. Start-up: load the config (or the embedded
default), open the spool (cleaning what a crash left), schedule every
spooled message, bind the SMTP listeners and the metrics endpoint, write
the pid file. Signals: SIGHUP reloads the config (an invalid one is
refused and the old one keeps running), SIGUSR1 flushes the queue,
SIGUSR2 says a ``relay queue`` request waits (relay.control),
SIGTERM/SIGINT stop gracefully (stop accepting, 421 to open sessions,
everything stays in the spool, exit 0 within ``SHUTDOWN_GRACE`` seconds).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import random
import signal
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import relay
from relay import config as configmod
from relay import configdiff, configload, events, loops, tls
from relay import metrics as metricsmod
from relay.audit import AuditLog
from relay.config import Config
from relay.configload import ConfigError
from relay.control import Control
from relay.delivery import Deliverer
from relay.dns import DnsResolver
from relay.inbound import Inbound, listen_texts
from relay.metrics import Metrics
from relay.queue import Scheduler
from relay.spool import Spool

#: Seconds SIGTERM may take: spool writes in flight, 421s, in-flight attempts.
SHUTDOWN_GRACE = 10.0

EMBEDDED = configmod.EMBEDDED


def default_config() -> Config:
    """The embedded default: config/relay.toml as packaged (relay.configload.load_embedded).

    ``relay run`` with no --config, no $RELAY_CONFIG and no config/relay.toml
    runs on it (README.md "Quick start"), its spool in ./var/spool.
    """
    return configload.load_embedded()


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
        """Take the lock; None on success, else the pid of the relay that holds it.

        The lock is held on a read-only descriptor: a daemon that keeps no
        file in the spool open for writing between writes lets its file
        system be remounted read-only (which /healthz then reports).
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDONLY | os.O_CREAT, 0o644)
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
        fd = os.open(self.path, os.O_WRONLY | os.O_TRUNC)
        try:
            os.write(fd, f"{os.getpid()}\n".encode())
        finally:
            os.close(fd)

    def remove(self) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.path.unlink()
        os.close(self._fd)
        self._fd = None


@dataclass(frozen=True)
class Parts:
    """One relay's components, wired to each other and to one config; nothing started.

    Every component reads the config through ``config`` at each use, so a
    reload is one reference swap behind that callable. The resolver and the
    host health live in ``deliverer`` (``deliverer.resolver``, ``deliverer.health``).
    """

    config: Callable[[], Config]
    metrics: Metrics
    spool: Spool
    deliverer: Deliverer
    scheduler: Scheduler
    inbound: Inbound
    control: Control

    def end_hold_downs(self) -> None:
        """Every held-down next hop is due its probe now (a queue flush)."""
        end_hold_downs(self.deliverer)

    def flush(self) -> None:
        """SIGUSR1: every message due now, and every held-down host due its probe."""
        self.end_hold_downs()
        self.scheduler.flush()


def build(
    config: Callable[[], Config],
    *,
    tls_context: Callable[[], ssl.SSLContext | None] = lambda: None,
    fsync: bool = True,
    clock: Callable[[], float] = time.time,
    seed: int | None = None,
) -> Parts:
    """Wire a relay: the one place that says which component talks to which.

    The daemon and the tests' in-process relay (tests/support/integ.py) both
    build here, so what is tested is what ships. ``fsync``, ``clock`` and
    ``seed`` (the delivery and retry jitter) are for tests; the daemon keeps
    the defaults.
    """
    metrics = Metrics()
    spool = Spool(config().queue.path, fsync=fsync)
    metrics.watch_spool_syncs(spool.group)
    deliverer = Deliverer(config, DnsResolver(config().dns), metrics, random.Random(seed))
    scheduler = Scheduler(config, spool, deliverer, metrics, clock=clock, rng=random.Random(seed))
    inbound = Inbound(
        config,
        spool,
        metrics,
        scheduler.add,
        tls_context=tls_context,
        clock=clock,
        # A reload may replace the resolver: Received names use the current one.
        resolver=lambda: deliverer.resolver,
    )
    control = Control(spool, scheduler, on_flush=lambda: end_hold_downs(deliverer))
    return Parts(config, metrics, spool, deliverer, scheduler, inbound, control)


def end_hold_downs(deliverer: Deliverer) -> None:
    """End every hold-down (a queue flush), and log which hosts it freed."""
    # A flush means "try now", as Postfix's postqueue -f also retries dead
    # destinations: a held-down host would otherwise defer what was flushed.
    hosts = deliverer.health.end_hold_downs()
    if hosts:
        events.log("hold_downs_ended", hosts=hosts)


class Daemon:
    """One running relay. ``load`` reads the config (again, on SIGHUP)."""

    def __init__(self, load: Callable[[], Config]) -> None:
        self._load = load
        self._config = load()
        self._tls = _server_tls_context(self._config)
        self.parts = build(self.config, tls_context=self.tls_context)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[bool]] = set()
        self._reloading = asyncio.Lock()
        #: Set once the SMTP listeners are up (a reload may change them).
        self._inbound: Inbound | None = None
        self._started = time.time()

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
        self.parts.spool.open()
        scheduler, control = self.parts.scheduler, self.parts.control
        control.open()
        self._install_signals(control)
        pid_file.write()
        recovered = 0
        unreadable: list[str] = []
        for envelope in self.parts.spool.load_all(unreadable=unreadable):
            scheduler.add(envelope)
            recovered += 1
        for qid in unreadable:
            events.error(
                "dropped", id=qid, reason="unreadable envelope",
                kept=str(self.parts.spool.corrupt_dir),
            )  # fmt: skip
        inbound = self.parts.inbound
        metrics_server = None
        try:
            await inbound.start()
            self._inbound = inbound
            if cfg.metrics.listen is not None:
                listen = cfg.metrics.listen
                metrics_server = await metricsmod.serve(
                    self.parts.metrics,
                    listen.host,
                    listen.port,
                    healthy=self.parts.spool.writable,
                    status=self.status,
                )
        except OSError as exc:
            events.error("start_failed", error=str(exc))
            await inbound.stop(0)
            return 1
        console_runner = None
        if cfg.admin.listen is not None:
            try:
                console_runner = await self._start_console(scheduler, control)
            except (OSError, ssl.SSLError) as exc:
                events.error("start_failed", error=f"admin console: {exc}")
                await inbound.stop(0)
                return 1
        self._applied(cfg, "start")
        run_task = asyncio.create_task(scheduler.run())
        control_task = asyncio.create_task(control.run())
        events.log(
            "started",
            version=relay.version(),
            config=cfg.shown_source,
            listen=",".join(listen_texts(inbound)),
            metrics=str(cfg.metrics.listen) if cfg.metrics.listen is not None else "off",
            spool=str(self.parts.spool.path),
            recovered=recovered,
            pid=os.getpid(),
            loop=loops.name(),
        )
        try:
            await self._stop.wait()
        finally:
            if console_runner is not None:
                await console_runner.cleanup()
            control_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await control_task
            control.close()
            await self._shutdown(inbound, scheduler, run_task, metrics_server)
        return 0

    def status(self) -> dict[str, Any]:
        """What ``relay status`` shows (``GET /status`` on the metrics listener)."""
        cfg = self._config
        now = time.time()
        return {
            "version": relay.version(),
            "pid": os.getpid(),
            "started": self._started,
            "uptime": now - self._started,
            "now": now,
            "config": str(cfg.source),
            "config_sha256": cfg.sha256,
            "queue": len(self.parts.scheduler),
            "routes": self.parts.deliverer.health.snapshot(cfg),
        }

    async def _start_console(self, scheduler: Scheduler, control: Control) -> Any:
        """The admin web console (relay.console) on this loop, when ``[admin] listen`` is set."""
        from relay import console

        services = console.Services(
            config=self.config, reload=lambda: self.reload("console"), spool=self.parts.spool,
            scheduler=scheduler, control=control, metrics=self.parts.metrics, started=self._started,
            health=lambda: self.parts.deliverer.health.snapshot(self._config),
        )  # fmt: skip
        return await console.serve(services)

    async def _shutdown(
        self,
        inbound: Inbound,
        scheduler: Scheduler,
        run_task: asyncio.Task[None],
        metrics_server: asyncio.Server | None,
    ) -> None:
        events.log("stopping", grace=SHUTDOWN_GRACE)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
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
        await self.parts.deliverer.close()
        if metrics_server is not None:
            metrics_server.close()
            await metrics_server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        self.parts.spool.close()
        events.log("stopped")

    def _install_signals(self, control: Control) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR2, control.wake)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.parts.flush)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)

    def _spawn_reload(self) -> None:
        task = asyncio.create_task(self.reload())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reload(self, trigger: str = "SIGHUP") -> bool:
        """SIGHUP: load the config again; swap it in only if it is valid.

        Reloads run one at a time: each one compares with (and audits
        against) the config the previous one left, never a stale one.
        ``trigger`` is what the audit log says asked for it ("console" for
        a save in the admin console).
        """
        async with self._reloading:
            return await self._reload(trigger)

    async def _reload(self, trigger: str = "SIGHUP") -> bool:
        old = self._config
        try:
            new = await asyncio.to_thread(self._load)
            server_tls = _server_tls_context(new)
        except ConfigError as exc:
            self._refuse(old, exc.path, list(exc.problems), trigger)
            return False
        except (OSError, ssl.SSLError) as exc:
            self.parts.metrics.config_reloads.labels(result="error").inc()
            events.error("reload_failed", config=old.shown_source, error=str(exc))
            return False
        needs_restart = restart_problems(old, new)
        if needs_restart:
            self._refuse(old, new.source, needs_restart, trigger)
            return False
        if not await self._relisten(old, new, trigger):
            return False
        # One reference swap: inbound and the scheduler read it per command.
        self._config, self._tls = new, server_tls
        # A CA file may have changed on disk under the same path.
        tls.client_context.cache_clear()
        if new.dns != old.dns:
            self.parts.deliverer.use_resolver(DnsResolver(new.dns))
        # Hosts still in the config keep their hold-down; removed ones are forgotten.
        self.parts.deliverer.health.reconfigure(new)
        self.parts.metrics.config_reloads.labels(result="success").inc()
        if new.log != old.log:
            events.setup(new.log.format, new.log.level)
        self._applied(new, "reload", old, trigger)
        return True

    async def _relisten(self, old: Config, new: Config, trigger: str = "SIGHUP") -> bool:
        """Bind the listeners a reload added, close the ones it removed.

        Only when ``[server] listen`` changed; open sessions are never
        dropped. False (the reload is refused, listeners as before) when
        a new address cannot be bound.
        """
        if self._inbound is None or new.server.listen == old.server.listen:
            return True
        try:
            added, removed = await self._inbound.relisten(new.server.listen)
        except OSError as exc:
            problem = configload.Problem("server", "listen", f"cannot listen: {exc}")
            self._refuse(old, new.source, [problem], trigger)
            return False
        events.log(
            "listen_changed",
            added=",".join(map(str, added)) or "-",
            removed=",".join(map(str, removed)) or "-",
            listen=",".join(listen_texts(self._inbound)),
        )
        return True

    def _refuse(
        self,
        old: Config,
        source: Path,
        problems: list[configload.Problem],
        trigger: str = "SIGHUP",
    ) -> None:
        """A loaded config cannot be applied: count, log and audit it; ``old`` keeps running."""
        self.parts.metrics.config_reloads.labels(result="error").inc()
        events.error("reload_failed", config=str(source), problems=len(problems))
        for problem in problems:
            events.error("reload_problem", problem=str(problem))
        self._audit(old, lambda log: log.record_refused(source, problems, trigger))

    def _applied(
        self, new: Config, reason: str, old: Config | None = None, trigger: str = "SIGHUP"
    ) -> None:
        """A config took effect (start or reload): log it, and audit it."""
        events.log(
            "config_applied",
            reason=reason,
            config=new.shown_source,
            sha256=new.sha256,
            routes=len(new.routes),
            rules=len(new.rules),
        )
        for line in configdiff.describe(new):
            events.log("config", line=line)
        for route in new.routes:
            # Only where it can happen: require_tls encrypts before any AUTH.
            if route.auth is not None and route.auth.over_plaintext and not route.tls.require_tls:
                events.warning(
                    "auth_over_plaintext", route=route.name,
                    risk="the password may cross the network unencrypted",
                )  # fmt: skip
        if old is None:
            self._audit(new, lambda log: log.record_start(new))
        else:
            self._audit(new, lambda log: log.record_reload(old, new, trigger))

    def _audit(self, cfg: Config, write: Callable[[AuditLog], None]) -> None:
        """Append to the audit log; a failed write is logged, never fatal to a reload."""
        try:
            write(AuditLog(cfg.audit.path))
        except OSError as exc:
            events.error("audit_failed", path=str(cfg.audit.path), error=str(exc))


def restart_problems(old: Config, new: Config) -> list[configload.Problem]:
    """The changes from ``old`` to ``new`` a reload cannot apply, as Problems.

    ``queue.path`` (the spool, and the pid file ``relay reload`` and
    ``relay queue`` find the daemon by) and ``metrics.listen`` are bound
    at start. A reload changing either is refused as a whole, so the audit
    log never says a config applied that did not. The ``[queue]``
    durations apply live: the scheduler reads them at every use.
    """
    problems = []
    if new.server.event_loop != old.server.event_loop:
        problems.append(
            configload.Problem(
                "server",
                "event_loop",
                f"changing it needs a restart; the running relay keeps {old.server.event_loop}",
            )
        )
    if new.queue.path != old.queue.path:
        problems.append(
            configload.Problem(
                "queue",
                "path",
                f"changing it needs a restart; the running relay keeps {old.queue.path}",
            )
        )
    if new.metrics.listen != old.metrics.listen:
        keeps = str(old.metrics.listen) if old.metrics.listen else "the endpoint off"
        problems.append(
            configload.Problem(
                "metrics",
                "listen",
                f"changing it needs a restart; the running relay keeps {keeps}",
            )
        )
    if new.admin.listen != old.admin.listen or (new.admin.tls_cert, new.admin.tls_key) != (
        old.admin.tls_cert,
        old.admin.tls_key,
    ):
        problems.append(
            configload.Problem(
                "admin",
                "listen",
                "changing listen, tls_cert or tls_key needs a restart; "
                "the running console keeps its address and certificate",
            )
        )
    return problems


def run(config_path: Path | None) -> int:
    """``relay run``: the daemon in the foreground until SIGTERM; the exit code.

    ``config_path`` None means the embedded default. Raises ConfigError
    for an invalid config at start (the CLI prints it and exits 2).
    """

    def load() -> Config:
        return default_config() if config_path is None else configload.load(config_path)

    # Read once before the loop exists, to pick it ([server] event_loop); the
    # daemon starts with this reading and reads the file again on reload.
    first = [load()]
    event_loop = first[0].server.event_loop

    def first_then_load() -> Config:
        return first.pop() if first else load()

    async def main() -> int:
        try:
            daemon = Daemon(first_then_load)
        except (OSError, ssl.SSLError) as exc:
            events.setup()
            events.error("start_failed", error=str(exc))
            return 1
        try:
            return await daemon.run()
        except OSError as exc:
            events.error("start_failed", error=str(exc))
            return 1

    return loops.run(main(), event_loop)
