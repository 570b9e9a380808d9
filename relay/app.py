"""The composition root: builds everything from a Config and runs the daemon.

``relay run`` lands here. Start-up: load the config (or the embedded
default), open the spool (cleaning what a crash left), schedule every
spooled message, bind the SMTP listeners and the metrics endpoint, write
the pid file. Signals: SIGHUP reloads the config (an invalid one is
refused and the old one keeps running), SIGUSR1 flushes the queue,
SIGUSR2 says a ``relay queue`` request waits (relay.control),
SIGTERM/SIGINT stop gracefully (stop accepting, 421 to open sessions,
everything stays in the spool, exit 0 within ``SHUTDOWN_GRACE`` seconds).
With ``[server] workers`` above 1, ``run`` hands over to relay.workers'
supervisor, and each of its worker processes is a :class:`Daemon` here in
a :class:`WorkerRole`. Keeping and reloading the config is relay.keeper's.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import random
import signal
import ssl
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import relay
from relay import config as configmod
from relay import configload, events, loops, shards
from relay import metrics as metricsmod
from relay.config import Config
from relay.control import Control
from relay.delivery import Deliverer
from relay.dns import DnsResolver
from relay.inbound import Inbound, listen_texts
from relay.keeper import ConfigKeeper
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
    # Read at each scrape: a hold, a release or a delete by `relay queue`
    # while the daemon is stopped all show without bookkeeping.
    metrics.queue_held.set_function(lambda: len(spool.hold.ids()))
    return Parts(config, metrics, spool, deliverer, scheduler, inbound, control)


def end_hold_downs(deliverer: Deliverer) -> None:
    """End every hold-down (a queue flush), and log which hosts it freed."""
    # A flush means "try now", as Postfix's postqueue -f also retries dead
    # destinations: a held-down host would otherwise defer what was flushed.
    hosts = deliverer.health.end_hold_downs()
    if hosts:
        events.log("hold_downs_ended", hosts=hosts)


@dataclass(frozen=True)
class WorkerRole:
    """This daemon is worker ``index`` of ``count`` under a supervisor (relay.workers).

    Its config's ``queue.path`` is its own spool shard. It locks that
    shard (:data:`WORKER_LOCK`), not the pid file (the supervisor's), binds
    the SMTP listeners with SO_REUSEPORT next to its siblings, writes no
    audit log, and serves ``/metrics``, ``/status`` and ``/healthz`` on a
    loopback port it hands to ``ready`` for the supervisor to gather.
    """

    index: int
    count: int
    ready: Callable[[int], None]


#: A worker's lock on its shard (the pid file stays the supervisor's).
WORKER_LOCK = "worker.pid"

#: Seconds between a worker's checks that its supervisor still runs.
PARENT_CHECK = 1.0


class Daemon(ConfigKeeper):
    """One running relay. ``load`` reads the config (again, on SIGHUP)."""

    def __init__(self, load: Callable[[], Config], worker: WorkerRole | None = None) -> None:
        super().__init__(load, audit=worker is None)
        self.worker = worker
        self.parts = build(self.config, tls_context=self.tls_context)
        # Several workers accept on one port: the kernel spreads connections.
        self.parts.inbound.listeners.reuse_port = worker is not None
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        #: Set once the SMTP listeners are up (a reload may change them).
        self._inbound: Inbound | None = None
        self._started = time.time()

    async def run(self) -> int:
        cfg = self._config
        events.setup(cfg.log.format, cfg.log.level)
        lock = cfg.pid_file if self.worker is None else cfg.queue.path / WORKER_LOCK
        pid_file = PidFile(lock)
        # Lock before touching the spool: open() cleans tmp/, which would
        # break the writes of a relay that is still running on it.
        holder = pid_file.lock()
        if holder is not None:
            events.error("already_running", pid=holder, pid_file=str(pid_file.path))
            return 1
        try:
            if self.worker is None:
                # Shards of an earlier run with more workers (relay.shards).
                shards.adopt_orphans(cfg.queue.path, 1)
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
            metrics_server = await self._serve_metrics(cfg)
        except OSError as exc:
            events.error("start_failed", error=str(exc))
            await inbound.stop(0)
            return 1
        console_runner = None
        if cfg.admin.listen is not None and (self.worker is None or self.worker.index == 0):
            try:
                console_runner = await self._start_console(scheduler, control)
            except (OSError, ssl.SSLError) as exc:
                events.error("start_failed", error=f"admin console: {exc}")
                await inbound.stop(0)
                return 1
        self._applied(cfg, "start")
        run_task = asyncio.create_task(scheduler.run())
        control_task = asyncio.create_task(control.run())
        fields: dict[str, Any] = {
            "version": relay.version(),
            "config": cfg.shown_source,
            "listen": ",".join(listen_texts(inbound)),
            "metrics": str(cfg.metrics.listen) if cfg.metrics.listen is not None else "off",
            "spool": str(self.parts.spool.path),
            "recovered": recovered,
            "pid": os.getpid(),
            "loop": loops.name(),
        }
        if self.worker is not None:
            fields["worker"] = self.worker.index
        events.log(self._event("started"), **fields)
        if self.worker is not None:
            self._spawn(self._watch_parent())
            self.worker.ready(metrics_server.sockets[0].getsockname()[1] if metrics_server else 0)
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

    def _event(self, name: str) -> str:
        """``started``, ``stopping``, ``stopped``: a worker's are ``worker_started``...
        (its supervisor logs the relay's own)."""
        return name if self.worker is None else f"worker_{name}"

    async def _serve_metrics(self, cfg: Config) -> asyncio.Server | None:
        """``[metrics] listen``; a worker's on a loopback port for its supervisor."""
        if self.worker is not None:
            host, port = "127.0.0.1", 0
        elif cfg.metrics.listen is not None:
            host, port = cfg.metrics.listen.host, cfg.metrics.listen.port
        else:
            return None
        return await metricsmod.serve(
            self.parts.metrics, host, port, healthy=self.parts.spool.writable, status=self.status
        )

    async def _watch_parent(self) -> None:
        """A worker stops when its supervisor is gone (killed with -9): no orphan
        keeps the SMTP port and the shard from the next supervisor."""
        parent = os.getppid()
        while os.getppid() == parent:  # noqa: ASYNC110 - no event tells a parent's death
            await asyncio.sleep(PARENT_CHECK)
        events.warning("supervisor_gone", pid=parent)
        self._stop.set()

    def status(self) -> dict[str, Any]:
        """What ``relay status`` shows (``GET /status`` on the metrics listener)."""
        cfg = self._config
        now = time.time()
        report = {
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
        if self.worker is not None:
            # How the kernel spread the connections (relay.workers).
            received = "relay_messages_received_total"
            report["accepted"] = self.parts.metrics.registry.get_sample_value(received) or 0.0
        return report

    async def _start_console(self, scheduler: Scheduler, control: Control) -> Any:
        """The admin web console (relay.console) on this loop, when ``[admin] listen`` is set."""
        from relay import console

        services = console.Services(
            config=self.config, reload=self._console_reload, spool=self.parts.spool,
            scheduler=scheduler, control=control, metrics=self.parts.metrics, started=self._started,
            health=lambda: self.parts.deliverer.health.snapshot(self._config),
        )  # fmt: skip
        return await console.serve(services)

    async def _console_reload(self) -> bool:
        """A save in the console: reload here; a worker also has its supervisor
        reload every worker (and write the audit log)."""
        applied = await self.reload("console")
        if applied and self.worker is not None:
            os.kill(os.getppid(), signal.SIGHUP)
        return applied

    async def _shutdown(
        self,
        inbound: Inbound,
        scheduler: Scheduler,
        run_task: asyncio.Task[None],
        metrics_server: asyncio.Server | None,
    ) -> None:
        events.log(self._event("stopping"), grace=SHUTDOWN_GRACE)
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
        events.log(self._event("stopped"))

    def _install_signals(self, control: Control) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR2, control.wake)
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGUSR1, self.parts.flush)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)

    def _spawn_reload(self) -> None:
        self._spawn(self.reload())

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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

    def _count(self, result: str) -> None:
        self.parts.metrics.config_reloads.labels(result=result).inc()

    def _swapped(self, old: Config, new: Config) -> None:
        # A new resolver each time: [dns] may have changed, and a reload is
        # how an operator makes a DNS change apply before its TTL runs out.
        self.parts.deliverer.use_resolver(DnsResolver(new.dns))
        # Hosts still in the config keep their hold-down; removed ones are forgotten.
        self.parts.deliverer.health.reconfigure(new)


def run(config_path: Path | None) -> int:
    """``relay run``: the daemon in the foreground until SIGTERM; the exit code.

    ``config_path`` None means the embedded default. Raises ConfigError
    for an invalid config at start (the CLI prints it and exits 2). With
    ``[server] workers`` above 1 this process is the supervisor of that
    many worker daemons (relay.workers).
    """

    def load() -> Config:
        return default_config() if config_path is None else configload.load(config_path)

    # Read once before the loop exists, to pick it ([server] event_loop); the
    # daemon starts with this reading and reads the file again on reload.
    first = [load()]
    event_loop = first[0].server.event_loop
    if first[0].server.workers > 1:
        from relay import workers

        return asyncio.run(workers.supervise(config_path, load))

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

    settle_heap()
    return loops.run(main(), event_loop)


def settle_heap() -> None:
    """Take what the process has built so far out of the cyclic garbage
    collector's walks (gc.freeze): the modules, classes and functions
    imported and the config loaded live as long as the process, yet every
    full collection walked them all again. With a connection per message
    the collector took 9-12 % of the daemon's CPU; frozen, 7-8 %.
    Reference counting still frees a frozen object; only a reference cycle
    among them (none expected) would outlive its use."""
    gc.collect()
    gc.freeze()


def run_worker(load: Callable[[], Config], role: WorkerRole) -> int:
    """One worker of ``relay run`` with ``[server] workers`` above 1 (relay.workers)."""

    async def main() -> int:
        try:
            daemon = Daemon(load, role)
            return await daemon.run()
        except (OSError, ssl.SSLError) as exc:
            events.setup()
            events.error("start_failed", error=str(exc), worker=role.index)
            return 1

    event_loop = load().server.event_loop
    settle_heap()
    return loops.run(main(), event_loop)
