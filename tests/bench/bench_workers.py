"""``[server] workers``: one process against several, side by side, alternating.

``python -m tests.bench workers`` (defaults) or ``python -m
tests.bench.bench_workers --count 5000 --rounds 2 --workers 1,2 [--reuse]``.

Each run starts ``relay run`` (fsync on, ``max_per_host = 20``,
``max_concurrency = 100`` as in tests/bench/compare.py) forwarding to
Postfix's ``smtp-sink``, sends one warm-up message, then ``--count``
messages of ``--size`` bytes with ``smtp-source`` over 20 sessions, one
message per connection (``--reuse``: ``-d``, connections reused), and
waits until the sink has them all. It reports the end-to-end rate, how
busy the machine was (``/proc/stat``: the share of all CPUs' time not idle
or in iowait, over the run), the load average, each relay process's CPU
and of its event loop thread (the supervisor's and each worker's, user +
system, as a share of one core) and, with workers, how the kernel spread the connections (messages
accepted per worker, from ``/status``). The configurations alternate
(1, 2, 1, 2 ...) so that load from other work on the machine falls on
both. Every run is bounded (count, and a 300 s wait).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench.postfix_baseline import CLOCK_TICKS, SMTP_SOURCE, SmtpSink, _cpu_ticks
from tests.support import configs
from tests.support.postfix import postfix_missing
from tests.support.procs import RelayProcess, free_port, iter_tree, relay_config

SESSIONS = 20
TIMEOUT = 300.0


def _busy_ticks() -> tuple[int, int]:
    """(not idle, total) jiffies of all CPUs, from /proc/stat's first line."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return sum(fields) - idle, sum(fields)


def _process_ticks(root: int) -> dict[int, tuple[int, int]]:
    """Per process of the tree: (its CPU jiffies, its main thread's: the event loop)."""
    out = {}
    for pid in iter_tree(root):
        try:
            loop = Path(f"/proc/{pid}/task/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            out[pid] = (_cpu_ticks(pid), int(loop[11]) + int(loop[12]))
        except OSError:
            continue
    return out


def _status(metrics_port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{metrics_port}/status"
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
        report: dict[str, Any] = json.loads(response.read())
    return report


def _source(port: int, count: int, size: int, reuse: bool) -> None:
    argv = [SMTP_SOURCE, *(["-d"] if reuse else []), "-s", str(min(SESSIONS, count))]
    argv += ["-m", str(count), "-l", str(size), "-M", "source.test"]
    argv += ["-f", "bench@source.test", "-t", "bench@example.org", f"127.0.0.1:{port}"]
    subprocess.run(argv, stdin=subprocess.DEVNULL, check=True, timeout=TIMEOUT)


def run_once(scratch: Path, workers: int, count: int, size: int, reuse: bool) -> dict[str, Any]:
    metrics_port = free_port()
    with SmtpSink() as sink:
        config = relay_config(
            scratch / f"w{workers}-{time.monotonic_ns()}",
            configs.route("Sink", "127.0.0.1", sink.port),
            server={"workers": workers},
            delivery={"max_per_host": 20, "max_concurrency": 100},
            metrics={"listen": f"127.0.0.1:{metrics_port}"},
        )
        with RelayProcess(config) as proc:
            proc.wait_log("event=started", 30)
            _source(proc.port, 1, size, reuse)  # warm-up: every worker's loop and pool
            sink.wait(1, 30)
            load_before = os.getloadavg()[0]
            ticks = _process_ticks(proc.pid)
            busy, total = _busy_ticks()
            started = time.monotonic()
            _source(proc.port, count, size, reuse)
            sink.wait(1 + count, TIMEOUT)
            elapsed = time.monotonic() - started
            busy_after, total_after = _busy_ticks()
            after = _process_ticks(proc.pid)
            report = _status(metrics_port) if workers > 1 else {}
            load_after = os.getloadavg()[0]

    def pct(pid: int, which: int) -> float:
        used = after[pid][which] - ticks.get(pid, (0, 0))[which]
        return round(100 * used / CLOCK_TICKS / elapsed, 1)

    # Each process's CPU, and its loop thread's, as a share of one core.
    cpu = {
        ("supervisor" if pid == proc.pid and workers > 1 else f"pid {pid}"): [
            pct(pid, 0),
            pct(pid, 1),
        ]
        for pid in after
    }
    return {
        "workers": workers,
        "shape": "reuse" if reuse else "one-per-connection",
        "count": count,
        "size": size,
        "end_to_end_rate": round(count / elapsed, 1),
        "seconds": round(elapsed, 2),
        "machine_busy_pct": round(100 * (busy_after - busy) / max(1, total_after - total), 1),
        "load_before_after": [round(load_before, 2), round(load_after, 2)],
        "cpu_pct_process_and_loop_thread": cpu,
        "accepted_per_worker": [w.get("accepted") for w in report.get("workers", [])],
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_workers")
    parser.add_argument("--count", type=int, default=2000)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts")
    parser.add_argument("--reuse", action="store_true", help="smtp-source -d: reuse connections")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv if argv is not None else [])
    missing = postfix_missing()
    if missing:
        print(f"cannot run: {missing}")
        return 2
    if not (1 <= args.count <= 50_000 and 1 <= args.rounds <= 5):
        parser.error("--count 1..50000, --rounds 1..5")
    counts = [int(n) for n in args.workers.split(",")]
    results = []
    with tempfile.TemporaryDirectory(prefix="relay-workers-") as tmp:
        for round_no in range(args.rounds):
            for workers in counts:
                result = run_once(Path(tmp), workers, args.count, args.size, args.reuse)
                result["round"] = round_no + 1
                results.append(result)
                print(json.dumps(result), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
