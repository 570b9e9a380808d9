"""``relay run`` with ``[server] workers`` above 1: a supervisor and its worker processes.

The supervisor holds the pid file (``relay reload``, ``relay queue`` and
``kill`` find it there), moves the messages of shards no worker owns
(relay.shards), then starts ``workers`` processes (``python -m
relay.workers``), each a whole relay (relay.app.Daemon in its
:class:`~relay.app.WorkerRole`) with its own event loop and its own spool
shard. Each worker binds the SMTP listeners with SO_REUSEPORT: the kernel
hands each new connection to one of them, by a hash of its addresses and
ports. A worker's config is :func:`worker_config`: its shard, and the
machine-wide limits divided among the workers.

What stays one:

- the config and the audit log: SIGHUP makes the supervisor load and check
  the file (relay.keeper, exactly as a single relay does); only a config
  it accepted is passed on, by SIGHUP to every worker, which applies it
  without auditing again;
- signals: SIGUSR1 (flush) and SIGUSR2 (a queue request waits) go on to
  every worker; SIGTERM/SIGINT stop every worker gracefully, then the
  supervisor;
- ``[metrics] listen``: the supervisor serves ``/metrics`` (every worker's
  series combined, :mod:`relay.metricsmerge`), ``/status`` (one report:
  the queue summed, host health as the workers see it, one line per
  worker) and ``/healthz`` (200 only while every worker is up and healthy).
  Each worker answers these on a loopback port it reported at start;
- ``relay queue``: each shard's worker takes the requests written into
  that shard's ``control/`` (relay.control, relay.queuecli).

A worker that dies (kill -9, a crash) is started again after a back-off
(1 s, doubling to 30 s while it keeps dying within 30 s of its start); its
shard waits on disk meanwhile and the new worker schedules all of it. A
worker that fails before it ever got ready (a port in use) stops the whole
relay, as a single relay's failed start does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

import relay
from relay import configload, events, shards
from relay import metrics as metricsmod
from relay.app import PidFile, WorkerRole, default_config, run_worker
from relay.config import Config
from relay.keeper import ConfigKeeper
from relay.metricsmerge import merge_expositions, merge_status

#: Seconds before a dead worker starts again, doubling up to RESTART_MAX
#: while it keeps dying within STABLE seconds of its start.
RESTART_MIN = 1.0
RESTART_MAX = 30.0
STABLE = 30.0

#: Seconds a starting worker has to report that it listens.
READY_TIMEOUT = 30.0

#: Seconds to ask the workers for their metrics or status.
GATHER_TIMEOUT = 5.0

#: Seconds the workers get to stop (theirs is relay.app.SHUTDOWN_GRACE).
STOP_TIMEOUT = 15.0


def worker_config(cfg: Config, index: int, count: int) -> Config:
    """Worker ``index``'s share: its shard as the spool, and the limits that
    are the machine's (connections, memory, delivery attempts) divided by
    ``count``, rounded up. ``max_connections_per_ip`` stays per worker: the
    kernel spreads one client's connections over the workers."""

    def share(total: int) -> int:
        return max(1, -(-total // count))

    server = replace(
        cfg.server,
        max_connections=share(cfg.server.max_connections),
        max_memory=share(cfg.server.max_memory),
    )
    delivery = replace(
        cfg.delivery,
        max_concurrency=share(cfg.delivery.max_concurrency),
        max_per_host=share(cfg.delivery.max_per_host),
    )
    queue = replace(cfg.queue, path=shards.shard_path(cfg.queue.path, index))
    return replace(cfg, server=server, delivery=delivery, queue=queue)


@dataclass
class Slot:
    """One worker: the process running now (None between runs) and its history."""

    index: int
    proc: asyncio.subprocess.Process | None = None
    #: Its loopback /metrics, /status and /healthz port (0: not ready).
    port: int = 0
    restarts: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)


class Supervisor(ConfigKeeper):
    """Starts, watches, signals and restarts the workers; serves their one view."""

    def __init__(self, config_path: Path | None, load: Callable[[], Config]) -> None:
        super().__init__(load)
        self._path = config_path
        self.registry = CollectorRegistry()
        self._reloads = Counter(
            "relay_config_reloads_total", "Configuration reloads.", ["result"],
            registry=self.registry,
        )  # fmt: skip
        for result in metricsmod.RELOAD_RESULTS:
            self._reloads.labels(result)
        self._up = Gauge("relay_workers_up", "Worker processes running.", registry=self.registry)
        self._restarts = Counter(
            "relay_worker_restarts_total", "Worker processes started again after they died.",
            registry=self.registry,
        )  # fmt: skip
        self.slots = [Slot(index) for index in range(self._config.server.workers)]
        self._stop = asyncio.Event()
        self._failed = False
        self._started = time.time()
        self._tasks: set[asyncio.Task[Any]] = set()

    def _count(self, result: str) -> None:
        self._reloads.labels(result=result).inc()

    async def run(self) -> int:
        cfg = self._config
        events.setup(cfg.log.format, cfg.log.level)
        pid_file = PidFile(cfg.pid_file)
        holder = pid_file.lock()
        if holder is not None:
            events.error("already_running", pid=holder, pid_file=str(pid_file.path))
            return 1
        try:
            return await self._serve(cfg, pid_file)
        finally:
            pid_file.remove()

    async def _serve(self, cfg: Config, pid_file: PidFile) -> int:
        try:
            shards.adopt_orphans(cfg.queue.path, len(self.slots))
        except OSError as exc:
            events.error("start_failed", error=f"spool shards: {exc}")
            return 1
        self._install_signals()
        pid_file.write()
        server = None
        if cfg.metrics.listen is not None:
            try:
                server = await metricsmod.serve(
                    self.exposition, cfg.metrics.listen.host, cfg.metrics.listen.port,
                    healthy=self.healthy, status=self.status,
                )  # fmt: skip
            except OSError as exc:
                events.error("start_failed", error=str(exc))
                return 1
        self._applied(cfg, "start")
        keepers = [asyncio.create_task(self._keep(slot)) for slot in self.slots]
        await self._all_ready()
        if not self._failed:
            events.log(
                "started", version=relay.version(), config=cfg.shown_source,
                listen=",".join(map(str, cfg.server.listen)), workers=len(self.slots),
                metrics=str(cfg.metrics.listen) if cfg.metrics.listen is not None else "off",
                spool=str(cfg.queue.path), pid=os.getpid(),
                worker_pids=",".join(str(s.proc.pid) for s in self.slots if s.proc),
            )  # fmt: skip
        await self._stop.wait()
        events.log("stopping", workers=len(self.slots))
        await self._stop_workers()
        for task in [*keepers, *self._tasks]:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        if server is not None:
            server.close()
            await server.wait_closed()
        events.log("stopped")
        return 1 if self._failed else 0

    async def _all_ready(self) -> None:
        async def every_slot() -> None:
            for slot in self.slots:
                await slot.ready.wait()

        tasks = [asyncio.create_task(every_slot()), asyncio.create_task(self._stop.wait())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            task.cancel()

    def _argv(self, index: int) -> list[str]:
        argv = [sys.executable, "-m", "relay.workers", "--index", str(index)]
        argv += ["--of", str(len(self.slots))]
        if self._path is not None:
            argv += ["--config", str(self._path)]
        return argv

    async def _keep(self, slot: Slot) -> None:
        """Run worker ``slot`` until the supervisor stops, starting it again when it dies."""
        delay = RESTART_MIN / 2
        while not self._stop.is_set():
            began = time.monotonic()
            try:
                proc = await asyncio.create_subprocess_exec(
                    *self._argv(slot.index), stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                )  # fmt: skip
            except OSError as exc:  # no process at all (EAGAIN, ENOMEM): as if it died
                events.error("worker_not_started", worker=slot.index, error=str(exc))
                delay = min(delay * 2, RESTART_MAX)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
                continue
            slot.proc = proc
            if self._stop.is_set():
                proc.terminate()  # started while the others were told to stop
            self._up.set(sum(s.proc is not None for s in self.slots))
            await self._await_ready(slot, proc)
            code = await proc.wait()
            slot.proc, slot.port = None, 0
            self._up.set(sum(s.proc is not None for s in self.slots))
            if self._stop.is_set():
                return
            if not slot.ready.is_set():
                # It never listened: a config or port problem no retry cures.
                events.error("start_failed", worker=slot.index, code=code)
                self._failed = True
                self._stop.set()
                return
            ran = time.monotonic() - began
            delay = RESTART_MIN if ran >= STABLE else min(delay * 2, RESTART_MAX)
            events.error(
                "worker_died", worker=slot.index, pid=proc.pid, code=code, restart_in=delay
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
            if not self._stop.is_set():
                slot.restarts += 1
                self._restarts.inc()

    async def _await_ready(self, slot: Slot, proc: asyncio.subprocess.Process) -> None:
        """The worker's first stdout line is its status port, written once it listens."""
        assert proc.stdout is not None
        try:
            line = await asyncio.wait_for(proc.stdout.readline(), READY_TIMEOUT)
        except TimeoutError:
            line = b""
        if line.strip().isdigit():
            slot.port = int(line)
            slot.ready.set()
        elif proc.returncode is None:
            events.error("worker_not_ready", worker=slot.index, pid=proc.pid)
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    async def _stop_workers(self) -> None:
        running = [slot.proc for slot in self.slots if slot.proc is not None]
        for proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        waits = [proc.wait() for proc in running]
        try:
            await asyncio.wait_for(asyncio.gather(*waits), STOP_TIMEOUT)
        except TimeoutError:
            for proc in running:
                if proc.returncode is None:
                    events.error("worker_stop_timeout", pid=proc.pid)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()

    # --- signals -----------------------------------------------------------

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._spawn_reload)
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            loop.add_signal_handler(sig, self.tell, sig)

    def tell(self, sig: signal.Signals) -> None:
        """Pass ``sig`` on to every running worker."""
        for slot in self.slots:
            if slot.proc is not None and slot.proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    slot.proc.send_signal(sig)

    def _spawn_reload(self) -> None:
        task = asyncio.create_task(self._reload_all())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_all(self) -> None:
        # Checked and audited here, once; the workers only apply it.
        if await self.reload():
            self.tell(signal.SIGHUP)

    # --- the one view ------------------------------------------------------

    async def _gather(self, path: str) -> list[tuple[Slot, bytes | None]]:
        async def one(slot: Slot) -> bytes | None:
            if not slot.port:
                return None
            try:
                code, body = await asyncio.wait_for(
                    metricsmod.get("127.0.0.1", slot.port, path), GATHER_TIMEOUT
                )
            except (OSError, TimeoutError, ValueError):
                return None
            return body if code == 200 else None

        answers = await asyncio.gather(*(one(slot) for slot in self.slots))
        return list(zip(self.slots, answers, strict=True))

    async def exposition(self) -> bytes:
        """``/metrics``: the workers' series combined, and the supervisor's own."""
        answers = await self._gather("/metrics")
        texts = [body.decode() for _, body in answers if body is not None]
        return merge_expositions(texts, generate_latest(self.registry).decode())

    async def healthy(self) -> bool:
        answers = await self._gather("/healthz")
        return all(body is not None for _, body in answers)

    async def status(self) -> dict[str, Any]:
        """``/status``: one report for ``relay status``."""
        answers = await self._gather("/status")
        reports: list[dict[str, Any] | None] = []
        for _, body in answers:
            try:
                reports.append(json.loads(body) if body is not None else None)
            except ValueError:
                reports.append(None)
        cfg, now = self._config, time.time()
        report = merge_status(reports)
        report.update(
            version=relay.version(), pid=os.getpid(), started=self._started,
            uptime=now - self._started, now=now, config=str(cfg.source),
            config_sha256=cfg.sha256,
        )  # fmt: skip
        report["workers"] = [
            {
                "worker": slot.index,
                "pid": slot.proc.pid if slot.proc is not None else None,
                "up": reports[slot.index] is not None,
                "queue": (reports[slot.index] or {}).get("queue", 0),
                "accepted": (reports[slot.index] or {}).get("accepted", 0),
                "restarts": slot.restarts,
            }
            for slot in self.slots
        ]
        return report


async def supervise(config_path: Path | None, load: Callable[[], Config]) -> int:
    """``relay run`` with ``[server] workers`` above 1 (relay.app.run)."""
    return await Supervisor(config_path, load).run()


# --- the worker process ---------------------------------------------------


def worker_main(argv: Sequence[str] | None = None) -> int:
    """``python -m relay.workers --index K --of N [--config PATH]``: one worker."""
    parser = argparse.ArgumentParser(prog="relay.workers")
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--of", type=int, required=True)
    parser.add_argument("--config", type=Path)
    args = parser.parse_args(argv)

    def load() -> Config:
        cfg = default_config() if args.config is None else configload.load(args.config)
        return worker_config(cfg, args.index, args.of)

    def ready(port: int) -> None:
        # One line on stdout for the supervisor, then stdout is done with.
        os.write(1, f"{port}\n".encode())
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        os.close(devnull)

    return run_worker(load, WorkerRole(args.index, args.of, ready))


if __name__ == "__main__":
    sys.exit(worker_main())
