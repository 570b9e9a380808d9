"""One relay process against two, on the same machine: does the second core help?

    python -m tests.bench.two_processes [--count 4000] [--one-per-connection] [--pairs 3]

Two relays on two ports (so the 20 ``smtp-source`` sessions are split
exactly in two, 10 each; each relay with half of the benchmark's delivery
concurrency and its own spool) against one relay with all 20 sessions,
forwarding to one ``smtp-sink``, alternating. Prints one JSON line per run:
rates, relay's CPU per message and as a share of a core, how busy the
machine was, and each process's CPU per thread (tests/bench/machine.py).
Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.bench.compare import DELIVERY_CONCURRENCY, DESTINATION_CONCURRENCY, SESSIONS, relay_mta
from tests.bench.machine import MachineWindow, ThreadWindow
from tests.bench.postfix_baseline import SmtpSink, TreeSampler
from tests.support.postfix import SMTP_SOURCE


def _source(port: int, sessions: int, count: int, one: bool) -> subprocess.Popen[bytes]:
    argv = [SMTP_SOURCE, *([] if one else ["-d"]), "-s", str(sessions), "-m", str(count)]
    argv += ["-l", "1024", "-M", "source.test", "-f", "bench@source.test"]
    argv += ["-t", "bench@example.org", f"127.0.0.1:{port}"]
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL)


def run(processes: int, count: int, one: bool, scratch: Path) -> dict[str, Any]:
    """``count`` 1 KiB messages through ``processes`` relays; the figures."""
    delivery = {
        "max_per_host": DESTINATION_CONCURRENCY // processes,
        "max_concurrency": DELIVERY_CONCURRENCY // processes,
    }
    with SmtpSink() as sink, contextlib.ExitStack() as stack:
        relays = [
            stack.enter_context(
                relay_mta(scratch / f"{processes}-{i}", sink.port, delivery=delivery)
            )
            for i in range(processes)
        ]
        for relay in relays:  # warm up: one message each
            _source(relay.port, 1, 1, one).wait(60)
        sink.wait(processes, 60)
        before = sink.received()
        sampler = TreeSampler(lambda: [r.proc.pid for r in relays])
        threads = [ThreadWindow(r.proc.pid).start() for r in relays]
        window = MachineWindow().start()
        sampler.start()
        started = time.monotonic()
        sources = [_source(r.port, SESSIONS // processes, count // processes, one) for r in relays]
        for source in sources:
            source.wait(600)
        accepted = time.monotonic() - started
        sink.wait(before + count, 600)
        e2e = time.monotonic() - started
        window.stop()
        cpu = sampler.stop()
        return {
            "processes": processes,
            "one_per_connection": one,
            "accept_rate": round(count / accepted),
            "end_to_end_rate": round(count / e2e),
            "relay_cpu_ms_per_message": round(1000 * cpu / count, 2),
            "relay_core_pct": round(100 * cpu / e2e),
            "machine_busy_pct": window.busy_pct,
            "loadavg_1m": window.loadavg_1m,
            "thread_core_pct": [t.stop().core_pct() for t in threads],
        }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000, help="1 KiB messages per run")
    parser.add_argument("--pairs", type=int, default=3, help="one/two alternations (max 10)")
    parser.add_argument("--one-per-connection", action="store_true")
    args = parser.parse_args(argv)
    if not 20 <= args.count <= 100_000 or not 1 <= args.pairs <= 10:
        parser.error("--count 20..100000, --pairs 1..10")
    with tempfile.TemporaryDirectory(prefix="relay-two-") as tmp:
        for _ in range(args.pairs):
            for processes in (1, 2):
                figures = run(processes, args.count, args.one_per_connection, Path(tmp))
                print(json.dumps(figures), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
