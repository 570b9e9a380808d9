"""The baseline: how fast does a stock Postfix relay the same workload?

    smtp-source --(SMTP)--> MTA under test --(SMTP)--> smtp-sink

``run_mta_benchmark()`` drives any MTA listening on a loopback port (Postfix
here, ``relay`` later) and measures it the same way; ``postfix_baseline()``
starts a private Postfix configured as a pure relay (``relayhost`` = the
sink, queue fsync on as shipped) and runs it. Run it as::

    python -m tests.bench.postfix_baseline --count 2000 --size 1024

Figures: accept rate (messages the MTA acknowledged per second, i.e. until
smtp-source finished), end-to-end rate (until the sink had every message),
peak memory of the MTA's process tree (sum of RSS, and of PSS which counts
shared pages once) and CPU seconds the tree used. Loopback only, bounded in
count, size and time; no assertions: it prints numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.bench.machine import MachineWindow
from tests.bench.replywait import ReplyProbe
from tests.support import configs
from tests.support.postfix import SMTP_SINK, SMTP_SOURCE, PostfixFactory, postfix_missing
from tests.support.procs import RelayProcess, free_port, iter_tree, relay_config, wait_port
from tests.support.wait import blocking_until

MAX_COUNT = 100_000
MAX_SIZE = 32 << 20  # the 30 MiB message check of docs/performance.md
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


class SmtpSink:
    """Postfix's ``smtp-sink`` on 127.0.0.1: accepts and discards, counts messages.

    ``-c`` makes it print ``sess=N quit=N mesg=N`` progress lines; we read
    the last ``mesg`` figure from its output file.
    """

    def __init__(self, port: int | None = None, backlog: int = 256) -> None:
        self.port = port or free_port()
        self.backlog = backlog
        self._dir = Path(tempfile.mkdtemp(prefix="relay-sink-"))
        self.out_path = self._dir / "sink.out"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SmtpSink:
        with self.out_path.open("wb") as out:
            self._proc = subprocess.Popen(
                # -u: the user to drop to (required when started as root).
                [SMTP_SINK, "-u", "nobody", "-c", f"127.0.0.1:{self.port}", str(self.backlog)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        wait_port("127.0.0.1", self.port, 10)
        return self

    def received(self) -> int:
        counts = re.findall(rb"mesg=(\d+)", self.out_path.read_bytes())
        return int(counts[-1]) if counts else 0

    def wait(self, count: int, timeout: float) -> None:
        blocking_until(
            lambda: self.received() >= count,
            timeout,
            interval=0.02,
            what=f"{count} messages at smtp-sink (have {self.received()})",
        )

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait(5)
        for path in self._dir.iterdir():
            path.unlink()
        self._dir.rmdir()

    def __enter__(self) -> SmtpSink:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _stat_fields(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def _cpu_ticks(pid: int) -> int:
    # Fields after the command name: utime stime cutime cstime are 12..15 (0-based 11..14).
    fields = _stat_fields(pid)
    return sum(int(value) for value in fields[11:15])


def _memory_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) of one process in KiB; PSS falls back to RSS if unreadable."""
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
        pss = int(re.search(r"^Pss:\s+(\d+) kB", rollup, re.M).group(1))  # type: ignore[union-attr]
    except (OSError, AttributeError):
        pss = rss
    return rss, pss


class TreeSampler:
    """Samples the process trees under ``roots`` every ``interval`` s in a thread.

    Peak memory is the peak of the per-sample sums. CPU is counted as
    utime+stime+cutime+cstime summed over the live tree: a child that exits
    is reaped by its parent in the tree, whose cutime then carries it.
    """

    def __init__(self, roots: Callable[[], Iterable[int]], interval: float = 0.05) -> None:
        self.roots = roots
        self.interval = interval
        self.peak_rss_kib = 0
        self.peak_pss_kib = 0
        self.peak_processes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._cpu_start = 0

    def pids(self) -> list[int]:
        return sorted({pid for root in self.roots() for pid in iter_tree(root)})

    def cpu_ticks(self) -> int:
        total = 0
        pids = {pid for root in self.roots() for pid in iter_tree(root, zombies=True)}
        for pid in pids:
            with contextlib.suppress(OSError):  # exited between listing and reading
                total += _cpu_ticks(pid)
        return total

    def sample(self) -> None:
        rss = pss = alive = 0
        for pid in self.pids():
            try:
                one_rss, one_pss = _memory_kib(pid)
            except OSError:
                continue
            rss, pss, alive = rss + one_rss, pss + one_pss, alive + 1
        self.peak_rss_kib = max(self.peak_rss_kib, rss)
        self.peak_pss_kib = max(self.peak_pss_kib, pss)
        self.peak_processes = max(self.peak_processes, alive)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._cpu_start = self.cpu_ticks()
        self._thread.start()

    def stop(self) -> float:
        """Stop sampling; return the CPU seconds the trees used since ``start()``."""
        self._stop.set()
        self._thread.join(5)
        self.sample()
        return (self.cpu_ticks() - self._cpu_start) / CLOCK_TICKS


@dataclass(frozen=True)
class BenchResult:
    """One run's figures; rates in messages per second, memory in MiB."""

    mta: str
    count: int
    size: int
    sessions: int
    accept_seconds: float
    accept_rate: float
    end_to_end_seconds: float
    end_to_end_rate: float
    peak_rss_mib: float
    peak_pss_mib: float
    peak_processes: int
    cpu_seconds: float
    cpu_ms_per_message: float
    #: The MTA's CPU over the run as a percentage of one core.
    mta_core_pct: float | None = None
    #: How busy the whole machine (every core) was over the run, and the
    #: 1-minute load average when it ended (tests/bench/machine.py).
    machine_busy_pct: float | None = None
    #: Of the machine's idle share, the part with a disk write outstanding.
    machine_iowait_pct: float | None = None
    loadavg_1m: float | None = None
    #: True: ``smtp-source`` without ``-d``, one message per connection.
    one_per_connection: bool = False

    @classmethod
    def measured(
        cls,
        mta: str,
        count: int,
        size: int,
        sessions: int,
        accept_s: float,
        e2e_s: float,
        sampler: TreeSampler,
        cpu: float,
        window: MachineWindow | None = None,
        one_per_connection: bool = False,
    ) -> BenchResult:
        """The figures from raw timings (seconds) and the process sampler."""
        return cls(
            mta=mta,
            count=count,
            size=size,
            sessions=sessions,
            accept_seconds=round(accept_s, 3),
            accept_rate=round(count / accept_s, 1),
            end_to_end_seconds=round(e2e_s, 3),
            end_to_end_rate=round(count / e2e_s, 1),
            peak_rss_mib=round(sampler.peak_rss_kib / 1024, 1),
            peak_pss_mib=round(sampler.peak_pss_kib / 1024, 1),
            peak_processes=sampler.peak_processes,
            cpu_seconds=round(cpu, 2),
            cpu_ms_per_message=round(1000 * cpu / count, 3),
            mta_core_pct=round(100 * cpu / e2e_s, 1),
            machine_busy_pct=window.busy_pct if window else None,
            machine_iowait_pct=window.iowait_pct if window else None,
            loadavg_1m=window.loadavg_1m if window else None,
            one_per_connection=one_per_connection,
        )


def check_bounds(count: int, size: int, sessions: int) -> None:
    if not 1 <= count <= MAX_COUNT:
        raise ValueError(f"count must be 1..{MAX_COUNT}")
    if not 1 <= size <= MAX_SIZE:
        raise ValueError(f"size must be 1..{MAX_SIZE} bytes")
    if not 1 <= sessions <= min(count, 100):
        raise ValueError("sessions must be 1..min(count, 100)")


def run_mta_benchmark(
    smtp_port: int,
    sink: SmtpSink,
    count: int,
    size: int,
    sessions: int,
    *,
    mta_pids: Callable[[], Iterable[int]],
    mta: str = "mta",
    timeout: float = 300.0,
    recipient: str = "bench@example.org",
    one_per_connection: bool = False,
    probe: ReplyProbe | None = None,
) -> BenchResult:
    """Send ``count`` messages of ``size`` bytes over ``sessions`` parallel sessions
    (connections reused, smtp-source ``-d``; with ``one_per_connection``, a
    new connection for every message) to 127.0.0.1:``smtp_port``; wait
    until ``sink`` has them all; measure the process trees ``mta_pids()``.

    ``probe`` (tests/bench/replywait.py) runs alongside ``smtp-source``
    until it is done; the messages it sent are waited for at the sink too.
    The MTA must forward mail for ``recipient`` to ``sink``. Raises
    ``TimeoutError`` if the sink does not see every message within ``timeout``.
    """
    check_bounds(count, size, sessions)
    sampler = TreeSampler(mta_pids)
    before = sink.received()
    argv = [SMTP_SOURCE, *([] if one_per_connection else ["-d"]), "-s", str(sessions)]
    argv += ["-m", str(count), "-l", str(size)]
    argv += ["-M", "source.test", "-f", "bench@source.test", "-t", recipient]
    window = MachineWindow()
    sampler.start()
    window.start()
    started = time.monotonic()
    if probe is not None:
        probe.start()
    try:
        subprocess.run(
            [*argv, f"127.0.0.1:{smtp_port}"],
            stdin=subprocess.DEVNULL,
            check=True,
            timeout=timeout,
        )
    finally:
        if probe is not None:
            probe.stop()
    accepted = time.monotonic()
    extra = probe.messages if probe is not None else 0
    try:
        sink.wait(before + count + extra, max(1.0, timeout - (accepted - started)))
    finally:
        done = time.monotonic()
        window.stop()
        cpu = sampler.stop()
    accept_s, e2e_s = accepted - started, done - started
    return BenchResult.measured(
        mta, count, size, sessions, accept_s, e2e_s, sampler, cpu, window, one_per_connection
    )


def postfix_baseline(
    count: int = 2000, size: int = 1024, sessions: int = 10, timeout: float = 300.0
) -> BenchResult:
    """Start smtp-sink and a private Postfix relaying to it; benchmark Postfix.

    Postfix runs with its shipped performance defaults (queue files fsynced,
    in_flow_delay 1s, default process limits); only the isolation settings
    of tests.support.postfix differ. TLS is off on both hops.
    """
    check_bounds(count, size, sessions)
    with SmtpSink() as sink, PostfixFactory() as factory:
        mta = factory.upstream(relay_port=sink.port, name="bench", tls_level="none")
        # Warm up: one message through the whole path so every daemon is forked.
        run_mta_benchmark(mta.port, sink, 1, size, 1, mta_pids=list, mta="warmup", timeout=30)

        def pids() -> list[int]:
            return [pid] if (pid := mta.master_pid) else []

        return run_mta_benchmark(
            mta.port, sink, count, size, sessions, mta_pids=pids, mta="postfix", timeout=timeout
        )


def relay_benchmark(
    count: int = 2000, size: int = 1024, sessions: int = 10, timeout: float = 300.0
) -> BenchResult:
    """The same workload through ``python -m relay run`` (docs/performance.md).

    relay gets a scratch config from ``relay_config()``: one opportunistic
    route to the sink, spool in a temporary directory (fsynced, as a
    250 promises). Raises ``RuntimeError`` if the relay cannot start.
    """
    check_bounds(count, size, sessions)
    with SmtpSink() as sink, tempfile.TemporaryDirectory(prefix="relay-bench-") as scratch:
        config = relay_config(Path(scratch), configs.route("Sink", "127.0.0.1", sink.port))
        with RelayProcess(config) as proc:
            run_mta_benchmark(proc.port, sink, 1, size, 1, mta_pids=list, mta="warmup", timeout=30)
            return run_mta_benchmark(
                proc.port,
                sink,
                count,
                size,
                sessions,
                mta_pids=lambda: [proc.pid],
                mta="relay",
                timeout=timeout,
            )


def format_table(results: Sequence[BenchResult]) -> str:
    rows = [(name, *(str(getattr(r, name)) for r in results)) for name in asdict(results[0])]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help=f"messages (max {MAX_COUNT})")
    parser.add_argument("--size", type=int, default=1024, help="bytes per message")
    parser.add_argument("--sessions", type=int, default=10, help="parallel SMTP sessions")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per run")
    parser.add_argument(
        "--mta",
        choices=("postfix", "relay", "both"),
        default="postfix",
        help="what to measure (relay: python -m relay run)",
    )
    parser.add_argument("--json", type=Path, default=Path("postfix_baseline.json"))
    args = parser.parse_args(argv)
    missing = next(
        (f"{b} is not installed" for b in (SMTP_SINK, SMTP_SOURCE) if not os.access(b, os.X_OK)),
        None,
    )
    if args.mta != "relay":
        missing = missing or postfix_missing()
    if missing:
        print(f"cannot run the benchmark: {missing}", file=sys.stderr)
        return 2
    try:
        check_bounds(args.count, args.size, args.sessions)
    except ValueError as exc:
        parser.error(str(exc))
    runs = {"postfix": [postfix_baseline], "relay": [relay_benchmark]}
    runs["both"] = runs["postfix"] + runs["relay"]
    results = [run(args.count, args.size, args.sessions, args.timeout) for run in runs[args.mta]]
    print(format_table(results))
    payload = [asdict(r) for r in results]
    args.json.write_text(json.dumps(payload[0] if len(payload) == 1 else payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
