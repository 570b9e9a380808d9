"""How busy the machine, and each thread of a process, was over a run window.

``MachineWindow`` reads the ``cpu`` line of ``/proc/stat`` at the start and
at the end of a run: the share of the machine's time (all cores) that was
not idle (idle and iowait count as idle), the share that was idle with a
disk write outstanding (iowait: every runnable thread waited on the disk,
e.g. an fsync), and the load average when the run ended. ``ThreadWindow``
reads ``/proc/<pid>/task/*/stat`` the same way for one process: the CPU
seconds of each thread, grouped by the thread's OS name (``main`` for the
thread whose id is the pid, the event loop in relay). ``StateSampler``
samples what one thread is doing: running, waiting for a futex (the GIL),
or waiting in epoll (nothing to do).

Only reads ``/proc``; nothing here changes what it measures.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

from tests.support.procs import iter_tree

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_line() -> tuple[int, int, int]:
    """(busy, iowait, total) jiffies of all cores since boot."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user nice system idle iowait irq softirq steal (guest time is inside user).
    total = sum(fields[:8])
    idle = fields[3] + fields[4]
    return total - idle, fields[4], total


class MachineWindow:
    """The machine's busy share between ``start()`` and ``stop()``."""

    def __init__(self) -> None:
        self._busy0, self._iowait0, self._total0, self._t0 = 0, 0, 0, 0.0
        self.busy_pct: float | None = None
        self.iowait_pct: float | None = None
        self.loadavg_1m: float | None = None
        self.seconds = 0.0

    def start(self) -> MachineWindow:
        self._busy0, self._iowait0, self._total0 = _cpu_line()
        self._t0 = time.monotonic()
        return self

    def stop(self) -> MachineWindow:
        busy, iowait, total = _cpu_line()
        self.seconds = time.monotonic() - self._t0
        if total > self._total0:
            self.busy_pct = round(100 * (busy - self._busy0) / (total - self._total0), 1)
            self.iowait_pct = round(100 * (iowait - self._iowait0) / (total - self._total0), 1)
        self.loadavg_1m = round(os.getloadavg()[0], 2)
        return self


def _thread_ticks(pid: int) -> dict[int, tuple[str, int, int]]:
    """tid -> (name, utime + stime ticks, ns waited on a run queue) for every
    thread of ``pid`` and of its child processes now.

    The run-queue wait (``/proc/<pid>/task/<tid>/schedstat``, second field)
    is time the thread was ready to run and got no core: on a machine busy
    with other work it is what a thread lost to it.
    """
    threads: dict[int, tuple[str, int, int]] = {}
    # With [server] workers the threads that work are in the supervisor's
    # children: theirs count as "worker-<name>", summed over the workers.
    for proc in iter_tree(pid):
        prefix = "" if proc == pid else "worker-"
        task = Path(f"/proc/{proc}/task")
        with contextlib.suppress(OSError):
            for entry in task.iterdir():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    tid = int(entry.name)
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                    comm = "main" if tid == proc else (entry / "comm").read_text().strip()
                    waited = int((entry / "schedstat").read_text().split()[1])
                    threads[tid] = (prefix + comm, int(fields[11]) + int(fields[12]), waited)
    return threads


class ThreadWindow:
    """CPU seconds per thread name of ``pid`` between ``start()`` and ``stop()``.

    A thread that started during the window counts from zero; one that
    ended during it is lost (relay's threads live as long as the daemon).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._before: dict[int, tuple[str, int, int]] = {}
        self._t0 = 0.0
        self.cpu_seconds: dict[str, float] = {}
        #: Seconds each thread name was ready to run but had no core.
        self.runqueue_seconds: dict[str, float] = {}
        self.threads: dict[str, int] = {}
        self.seconds = 0.0

    def start(self) -> ThreadWindow:
        self._before = _thread_ticks(self.pid)
        self._t0 = time.monotonic()
        return self

    def stop(self) -> ThreadWindow:
        after = _thread_ticks(self.pid)
        self.seconds = time.monotonic() - self._t0
        ticks: dict[str, int] = {}
        waited: dict[str, int] = {}
        for tid, (name, now, wait_ns) in after.items():
            _, then, wait0 = self._before.get(tid, (name, 0, 0))
            ticks[name] = ticks.get(name, 0) + now - then
            waited[name] = waited.get(name, 0) + wait_ns - wait0
            self.threads[name] = self.threads.get(name, 0) + 1
        self.cpu_seconds = {name: round(t / CLOCK_TICKS, 2) for name, t in sorted(ticks.items())}
        self.runqueue_seconds = {name: round(ns / 1e9, 2) for name, ns in sorted(waited.items())}
        return self

    def core_pct(self) -> dict[str, float]:
        """Each thread name's CPU as a percentage of one core over the window."""
        if not self.seconds:
            return {}
        return {n: round(100 * s / self.seconds, 1) for n, s in self.cpu_seconds.items()}

    def runqueue_pct(self) -> dict[str, float]:
        """Each thread name's time ready but without a core, as a percentage of the window."""
        if not self.seconds:
            return {}
        return {n: round(100 * s / self.seconds, 1) for n, s in self.runqueue_seconds.items()}


class StateSampler:
    """What one thread is doing, sampled every ``interval`` s from /proc in a thread.

    Each sample is the thread's scheduler state and, when it sleeps, the
    kernel function it waits in (``wchan``): ``running`` (state R), ``gil``
    (a futex: CPython's GIL, or another lock), ``poll`` (epoll/select: the
    event loop has nothing to do), or the wchan name. The share of samples
    in each is how the thread spent the window. ``running`` includes time
    ready to run but waiting for a core (ThreadWindow.runqueue_pct tells
    that part). Bounded by ``max_samples``.
    """

    def __init__(self, pid: int, tid: int | None = None, interval: float = 0.001) -> None:
        self._task = Path(f"/proc/{pid}/task/{tid or pid}")
        self.interval = interval
        self.max_samples = 600_000
        self.counts: dict[str, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="state-sampler", daemon=True)

    def start(self) -> StateSampler:
        self._thread.start()
        return self

    def stop(self) -> dict[str, float]:
        """Stop; the percentage of samples per state."""
        self._stop.set()
        self._thread.join(5)
        total = sum(self.counts.values())
        return (
            {k: round(100 * v / total, 1) for k, v in sorted(self.counts.items())} if total else {}
        )

    def sample(self) -> None:
        state = (self._task / "stat").read_text().rsplit(")", 1)[1].split()[0]
        if state == "R":
            kind = "running"
        else:
            wchan = (self._task / "wchan").read_text().strip()
            if "futex" in wchan:
                kind = "gil"
            elif "poll" in wchan or "select" in wchan:
                kind = "poll"
            else:
                kind = wchan or state
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def _run(self) -> None:
        for _ in range(self.max_samples):
            if self._stop.wait(self.interval):
                return
            try:
                self.sample()
            except OSError:
                return
