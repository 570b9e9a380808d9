"""relay against Postfix, side by side, in one invocation.

    python -m tests.bench compare [--quick] [--json bench.json] [--only plain,tls,queue,large,hung]

Every variant runs the same workload through both MTAs on loopback,
``smtp-source`` → MTA → sink, 20 concurrent sessions (``-d``: connections
reused), both MTAs fsyncing each message before their 250, and relay
allowed the delivery concurrency Postfix's defaults allow it (20 connections
to the sink, 100 deliveries at once; relay's defaults are 5 and 20):

* ``plain``: 20 000 × 1 KiB and 2 000 × 100 KiB to Postfix's ``smtp-sink``;
  plus the latency of both MTAs at half of relay's peak rate, offered
  evenly by :mod:`tests.bench.pacer`.
* ``tls``: the same 1 KiB workload to a sink that requires STARTTLS with a
  certificate from a trustme CA; relay's route has all three options on
  (require_tls, require_ca_signed, validate_hostname), Postfix runs with
  ``smtp_tls_security_level = secure`` and the CA, once at its default
  (a TLS handshake per message) and once as ``postfix-reuse``
  (``smtp_tls_connection_reuse = yes``); the sink counts the handshakes.
* ``queue``: 100 000 × 1 KiB accepted while the downstream is down (retries
  pushed an hour out), RSS growth per queued message; then the sink comes
  up, the queue is flushed (SIGUSR1 / ``postqueue -f``) and the drain timed.
* ``large``: relay only: peak RSS relaying one 30 MiB message, and 4 at once.
* ``hung``: 200 × 1 KiB over a route of two primaries at 50/50, one of them
  wedged (it accepts TCP and never greets, :mod:`tests.bench.wedged`), the
  other the sink; an 8 s connect/greeting timeout on both MTAs. Messages per
  second end to end and the connections each MTA made to the wedged host;
  each MTA gets ``--hung-deadline`` seconds (60), then what arrived counts.

``--one-per-connection`` runs plain and tls in both client shapes: also
``smtp-source`` without ``-d``, a new connection for every message (rows
"<variant> 1/conn"). ``--diagnose`` adds one session that times each
reply (tests/bench/replywait.py) and samples what relay's event-loop thread
is doing (running, waiting for the GIL, idle in epoll). Every row has the MTA's CPU, how busy
the whole machine was (/proc/stat) and the load average (tests/bench/machine.py);
relay's rows the CPU of each of its threads and the spool's fsync batches.

``--quick`` divides the counts by 10 (2 000 × 1 KiB, 200 × 100 KiB, queue
10 000; hung: 50). Latency is accept → delivered as each MTA records it: for relay the
``event=accepted`` and ``event=delivered`` log lines of each queue id
(millisecond timestamps); for Postfix the ``delay=`` of each ``status=sent``
line (from the queue file's creation at MAIL FROM, 10 ms resolution). Both
end when the sink answered 250 to the MTA, i.e. on arrival at the sink.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tests.bench.latency import postfix_latencies, quantiles_ms, relay_latencies
from tests.bench.machine import StateSampler, ThreadWindow
from tests.bench.pacer import pace
from tests.bench.postfix_baseline import (
    BenchResult,
    SmtpSink,
    TreeSampler,
    _memory_kib,
    run_mta_benchmark,
)
from tests.bench.pysink import PySink
from tests.bench.replywait import ReplyProbe
from tests.bench.report import Row, format_table, machine
from tests.bench.wedged import (
    HUNG_DEADLINE_S,
    HUNG_TIMEOUT_S,
    WEDGED_ADDRESS,
    WedgedHost,
    hung_postfix_settings,
    hung_route,
)
from tests.support import configs
from tests.support.configs import TLS_LEVELS
from tests.support.pki import Pki
from tests.support.postfix import SMTP_SOURCE, PostfixFactory, UpstreamClient, postfix_missing
from tests.support.procs import RelayProcess, free_port, iter_tree, relay_config
from tests.support.wait import blocking_until

SESSIONS = 20
KIB = 1024


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


# -- the two MTAs ----------------------------------------------------------------


class Mta:
    """What a variant needs from an MTA under test."""

    name: str
    port: int

    def pids(self) -> list[int]:
        raise NotImplementedError

    def log_offset(self) -> int:
        raise NotImplementedError

    def latencies(self, offset: int) -> list[float]:
        raise NotImplementedError

    def flush(self) -> None:
        raise NotImplementedError

    def settled(self, count: int) -> bool:
        """True once ``count`` messages are queued and no attempt is in flight."""
        raise NotImplementedError


class RelayMta(Mta):
    name = "relay"

    def __init__(self, proc: RelayProcess, metrics_port: int) -> None:
        self.proc, self.port, self.metrics_port = proc, proc.port, metrics_port

    def pids(self) -> list[int]:
        return [self.proc.pid]

    def log_offset(self) -> int:
        return _size(self.proc.stderr_path)

    def latencies(self, offset: int) -> list[float]:
        return relay_latencies(self.proc.stderr_path, offset)

    def flush(self) -> None:
        self.proc.signal(signal.SIGUSR1)

    def _get(self, path: str) -> bytes:
        """``GET path`` from relay's metrics endpoint (/metrics, /status)."""
        url = f"http://127.0.0.1:{self.metrics_port}{path}"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 (loopback)
            body: bytes = response.read()
        return body

    def metric(self, name: str, labels: str = "") -> float:
        text = self._get("/metrics").decode()
        total = 0.0
        for line in text.splitlines():
            if line.startswith(name) and labels in line and not line.startswith("#"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def settled(self, count: int) -> bool:
        deferred = self.metric("relay_recipients_total", 'outcome="deferred"')
        return deferred >= count

    def worker_accepted(self) -> list[int]:
        """With ``[server] workers``: the messages each worker has accepted
        (``/status``), to see how the kernel spread the connections."""
        report = json.loads(self._get("/status"))
        return [int(worker.get("accepted", 0)) for worker in report.get("workers", [])]

    def spool_syncs(self) -> tuple[float, float]:
        """(directory fsyncs, renames and unlinks they covered) so far."""
        return self.metric("relay_spool_dir_syncs_total"), self.metric(
            "relay_spool_dir_sync_changes_total"
        )


class PostfixMta(Mta):
    name = "postfix"

    def __init__(self, inst: UpstreamClient) -> None:
        self.inst, self.port = inst, inst.port

    def pids(self) -> list[int]:
        return [pid] if (pid := self.inst.master_pid) else []

    def log_offset(self) -> int:
        return _size(self.inst.maillog_path)

    def latencies(self, offset: int) -> list[float]:
        return postfix_latencies(self.inst.maillog_path, offset)

    def flush(self) -> None:
        self.inst.flush()

    def settled(self, count: int) -> bool:
        spool = self.inst.queue_dir
        busy = sum(1 for d in ("incoming", "active", "maildrop") for _ in _files(spool / d))
        return busy == 0 and sum(1 for _ in _files(spool / "deferred")) >= count


def _files(directory: Path) -> Iterator[Path]:
    for path in directory.rglob("*"):
        if path.is_file():
            yield path


#: What relay may run at once, set to what Postfix's stock defaults allow the
#: Postfix under test: 20 connections to one destination
#: (``default_destination_concurrency_limit``) and 100 deliveries in all
#: (``default_process_limit``). relay's own defaults, ``[delivery]
#: max_per_host = 5`` and ``max_concurrency = 20``, limited its delivery to
#: below its accept rate: 5 connections at two round trips per message, and
#: each attempt holds its slot until its delete is fsynced.
DESTINATION_CONCURRENCY = 20
DELIVERY_CONCURRENCY = 100

#: The relays under test: name -> directories put first on PYTHONPATH (none:
#: this checkout). ``--baseline-relay DIR`` adds "relay-base" (the relay
#: package in DIR, e.g. an export of main; ``--baseline-name`` renames it).
RELAYS: dict[str, tuple[Path, ...]] = {"relay": ()}
#: ``--relay-setting NAME:SECTION.KEY=VALUE``: a relay from this checkout run
#: as NAME with that config setting on top (e.g. ``uvloop:server.event_loop=uvloop``).
RELAY_SETTINGS: dict[str, dict[str, dict[str, object]]] = {}


def relay_setting(text: str) -> tuple[str, str, str, object]:
    """``NAME:SECTION.KEY=VALUE`` -> (name, section, key, value); VALUE is TOML."""
    name, _, setting = text.partition(":")
    dotted, _, value = setting.partition("=")
    section, _, key = dotted.partition(".")
    if not (name and section and key and value):
        raise ValueError(f"{text!r} is not NAME:SECTION.KEY=VALUE")
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value  # a bare word: the string itself
    return name, section, key, parsed


#: ``--relay-workers N``: ``[server] workers`` of the relays under test.
RELAY_WORKERS = 1


@contextlib.contextmanager
def relay_mta(
    scratch: Path,
    sink_port: int,
    policy: str = "opportunistic",
    name: str = "relay",
    routes: str | None = None,
    **sections: dict[str, object],
) -> Iterator[RelayMta]:
    """``python -m relay run`` from the tree RELAYS[name]; ``routes`` (default:
    one route to the sink) take every recipient, the first of them."""
    metrics_port = free_port()
    delivery = {"max_per_host": DESTINATION_CONCURRENCY, "max_concurrency": DELIVERY_CONCURRENCY}
    sections = {
        "metrics": {"listen": f"127.0.0.1:{metrics_port}"},
        **sections,
        "delivery": {**delivery, **sections.get("delivery", {})},
        "server": {"workers": RELAY_WORKERS, **sections.get("server", {})},
    }
    for section, values in RELAY_SETTINGS.get(name, {}).items():
        sections[section] = {**sections.get(section, {}), **values}
    scratch = scratch / name
    if routes is None:
        routes = configs.route("Sink", "127.0.0.1", sink_port, **TLS_LEVELS[policy])
    config = relay_config(scratch, routes, **sections)
    paths = [str(p) for p in RELAYS[name]]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [*paths, os.environ.get("PYTHONPATH")]))}
    proc = RelayProcess(config, env=env if paths else None)
    # Not just the port: with [server] workers the first worker listens
    # before the others, and the 20 reused connections a run opens at once
    # would all stay with it (seen: 100:0). "started" follows every worker.
    proc.start(wait_for="event=started")
    try:
        mta = RelayMta(proc, metrics_port)
        mta.name = name
        yield mta
    finally:
        proc.stop()


@contextlib.contextmanager
def postfix_mta(sink_port: int, **kwargs: Any) -> Iterator[PostfixMta]:
    with PostfixFactory() as factory:
        yield PostfixMta(factory.upstream(relay_port=sink_port, name="bench", **kwargs))


# -- the variants ----------------------------------------------------------------


#: The client shapes each of the plain and TLS workloads runs in: False is
#: ``smtp-source -d`` (connections reused), True one message per connection
#: (``--one-per-connection`` adds it, reported as "<variant> 1/conn").
SHAPES: list[bool] = [False]
#: ``--diagnose``: a ReplyProbe session times every reply during each run, and
#: relay's event-loop thread is sampled (running, waiting for the GIL, idle).
DIAGNOSE = [False]


def shaped(variant: str, one_per_connection: bool) -> str:
    return f"{variant} 1/conn" if one_per_connection else variant


def measure(
    variant: str,
    mta: Mta,
    sink: SmtpSink,
    count: int,
    size: int,
    sessions: int = SESSIONS,
    one_per_connection: bool = False,
) -> Row:
    """Warm up, then the workload; latency from the MTA's log lines of this run.

    For relay also the CPU of each of its threads (``main`` is the event
    loop) and the spool's directory fsyncs with the changes each covered.
    """
    # As many messages as sessions, in parallel: every smtpd Postfix forks
    # and every worker and outbound connection of relay's exist before the clock.
    run_mta_benchmark(
        mta.port, sink, sessions, size, sessions, mta_pids=list, mta="warmup", timeout=60
    )
    offset = mta.log_offset()
    probe = ReplyProbe(mta.port, size, one_per_connection) if DIAGNOSE[0] else None
    threads = ThreadWindow(mta.pids()[0]) if isinstance(mta, RelayMta) else None
    states = StateSampler(mta.pids()[0]) if threads is not None and DIAGNOSE[0] else None
    if states is not None:
        states.start()
    syncs = mta.spool_syncs() if isinstance(mta, RelayMta) else (0.0, 0.0)
    spread = mta.worker_accepted() if isinstance(mta, RelayMta) else []
    if threads is not None:
        threads.start()
    result = run_mta_benchmark(
        mta.port,
        sink,
        count,
        size,
        sessions,
        mta_pids=mta.pids,
        mta=mta.name,
        timeout=900,
        one_per_connection=one_per_connection,
        probe=probe,
    )
    extra: dict[str, Any] = {}
    if threads is not None:
        extra["thread_core_pct"] = threads.stop().core_pct()
        extra["thread_runqueue_pct"] = threads.runqueue_pct()
    if states is not None:
        extra["loop_thread_states_pct"] = states.stop()
    if isinstance(mta, RelayMta):
        after = mta.spool_syncs()
        fsyncs, changes = after[0] - syncs[0], after[1] - syncs[1]
        if spread:
            extra["worker_messages"] = [
                now - then for now, then in zip(mta.worker_accepted(), spread, strict=True)
            ]
        if fsyncs:
            extra["spool_dir_fsyncs"] = int(fsyncs)
            extra["changes_per_dir_fsync"] = round(changes / fsyncs, 2)
    if probe is not None:
        extra["reply_wait_ms_p50_p99"] = probe.summary()
    time.sleep(0.3)  # the delivered lines follow the sink's 250 by a hair
    p50, p99 = quantiles_ms(mta.latencies(offset))
    return Row(shaped(variant, one_per_connection), mta.name, result, p50, p99, extra)


def paced(mta: Mta, sink: SmtpSink, rate: int, seconds: int = 10) -> dict[str, Any]:
    """Latency at an even ``rate`` msg/s of 1 KiB messages for about ``seconds``
    (:mod:`tests.bench.pacer`: 20 sessions, phases offset; not
    ``smtp-source -R``, whose whole-second sleeps send synchronized bursts)."""
    offset = mta.log_offset()
    before = sink.received()
    started = time.monotonic()
    sent = pace(mta.port, rate, seconds)
    sink.wait(before + sent.sent, 120)
    elapsed = time.monotonic() - started
    time.sleep(0.3)
    p50, p99 = quantiles_ms(mta.latencies(offset))
    return {
        "target_rate": rate,
        "achieved_rate": round(sent.rate, 1),
        "end_to_end_seconds": round(elapsed, 2),
        "p50_ms": p50,
        "p99_ms": p99,
        "messages": sent.sent,
    }


def variant_plain(scratch: Path, counts: dict[str, int]) -> list[Row]:
    rows: list[Row] = []
    for label, size in (("1k", KIB), ("100k", 100 * KIB)):
        count = counts[label]
        for one in SHAPES:
            variant = f"plain {label}"
            with SmtpSink() as sink, postfix_mta(sink.port, tls_level="none") as pf:
                reference = measure(variant, pf, sink, count, size, one_per_connection=one)
                rows.append(reference)
            for name in RELAYS:
                with (
                    SmtpSink() as sink,
                    relay_mta(scratch / f"plain-{label}", sink.port, name=name) as relay,
                ):
                    row = measure(variant, relay, sink, count, size, one_per_connection=one)
                    rows.append(row)
                    if label == "1k" and not one:
                        half = int(row.result.end_to_end_rate / 2)
                        row.extra["half_rate_latency"] = paced(relay, sink, half)
            if label == "1k" and not one:
                # Postfix at the same even rate: the reference for relay's figure.
                half = rows[-1].extra["half_rate_latency"]["target_rate"]
                with SmtpSink() as sink, postfix_mta(sink.port, tls_level="none") as pf:
                    run_mta_benchmark(
                        pf.port, sink, 1, KIB, 1, mta_pids=list, mta="warmup", timeout=60
                    )
                    reference.extra["half_rate_latency"] = paced(pf, sink, half)
    return rows


#: Postfix at its best for TLS: one TLS session per connection reused for many
#: messages (Postfix 3.4+; the ``tlsproxy`` service holds the TLS state of a
#: cached connection). Its default, ``no``, makes a handshake per message.
TLS_REUSE = {"smtp_tls_connection_reuse": "yes"}


def variant_tls(scratch: Path, counts: dict[str, int]) -> list[Row]:
    """Verified TLS to the sink: Postfix at its default, Postfix reusing its
    TLS connections (``postfix-reuse``), then relay; the handshakes the sink saw."""
    ca = Pki(scratch / "pki")
    leaf = ca.issue("sink.test", "127.0.0.1", stem="sink")
    rows: list[Row] = []
    count = counts["1k"]
    secure = {"tls_level": "secure", "ca_file": ca.ca_file, "tls_match": "sink.test"}
    for one in SHAPES:
        for mta_name, settings in (("postfix", {}), ("postfix-reuse", TLS_REUSE)):
            with (
                PySink(leaf.cert, leaf.key) as sink,
                postfix_mta(sink.port, settings=settings, **secure) as pf,
            ):
                pf.name = mta_name
                row = measure("tls 1k", pf, sink, count, KIB, one_per_connection=one)
                row.extra["sink_tls_handshakes"] = sink.handshakes()
                rows.append(row)
        for name in RELAYS:
            with PySink(leaf.cert, leaf.key) as sink:
                tls_section = {"ca_file": str(ca.ca_file)}
                with relay_mta(scratch / "tls", sink.port, "full", name, tls=tls_section) as relay:
                    row = measure("tls 1k", relay, sink, count, KIB, one_per_connection=one)
                    row.extra["sink_tls_handshakes"] = sink.handshakes()
                    rows.append(row)
    return rows


def _rss_kib(pids: Sequence[int]) -> tuple[int, int]:
    rss = pss = 0
    for pid in {p for root in pids for p in iter_tree(root)}:
        with contextlib.suppress(OSError):
            one_rss, one_pss = _memory_kib(pid)
            rss, pss = rss + one_rss, pss + one_pss
    return rss, pss


def queue_run(variant: str, mta: Mta, sink_port: int, count: int) -> Row:
    """Accept ``count`` messages with the downstream down, then drain them."""
    rss0, pss0 = _rss_kib(mta.pids())
    sampler = TreeSampler(mta.pids)
    sampler.start()
    started = time.monotonic()
    argv = [SMTP_SOURCE, "-d", "-s", str(SESSIONS), "-m", str(count), "-l", str(KIB)]
    argv += ["-M", "source.test", "-f", "bench@source.test", "-t", "bench@example.org"]
    subprocess.run([*argv, f"127.0.0.1:{mta.port}"], stdin=subprocess.DEVNULL, check=True)
    accepted = time.monotonic()
    blocking_until(lambda: mta.settled(count), 900, interval=0.5, what=f"{count} deferred")
    settled = time.monotonic()
    rss1, pss1 = _rss_kib(mta.pids())
    with SmtpSink(port=sink_port) as sink:
        drain_start = time.monotonic()
        # One flush, as an operator would: what it makes due while relay's
        # one probe of the held-down sink runs waits for that probe's outcome.
        mta.flush()
        sink.wait(count, 1800)
        drained = time.monotonic()
    cpu = sampler.stop()
    accept_s, drain_s = accepted - started, drained - drain_start
    result = BenchResult.measured(mta.name, count, KIB, SESSIONS, accept_s, drain_s, sampler, cpu)
    extra = {
        "settle_seconds": round(settled - accepted, 3),
        "rss_per_queued_message_bytes": round((rss1 - rss0) * 1024 / count),
        "pss_per_queued_message_bytes": round((pss1 - pss0) * 1024 / count),
        "drain_seconds": round(drain_s, 3),
    }
    return Row(variant, mta.name, result, extra=extra)


def variant_queue(scratch: Path, counts: dict[str, int]) -> list[Row]:
    count = counts["queue"]
    rows: list[Row] = []
    hour = "3600s"
    slow = {
        "queue_run_delay": hour,
        "minimal_backoff_time": hour,
        "maximal_backoff_time": hour,
        # The first attempt fails at connect; do not mark the host dead for long.
        "smtp_connect_timeout": "2s",
    }
    down = free_port()
    with postfix_mta(down, tls_level="none", settings=slow) as pf:
        rows.append(queue_run("queue 1k", pf, down, count))
    for name in RELAYS:
        down = free_port()
        with relay_mta(
            scratch / "queue", down, name=name, queue={"min_backoff": "1h", "max_backoff": "1h"}
        ) as relay:
            rows.append(queue_run("queue 1k", relay, down, count))
    return rows


def variant_large(scratch: Path, counts: dict[str, int]) -> list[Row]:
    """Peak RSS relaying 30 MiB messages, 1 and then 4 sessions at once (relays only)."""
    size = 30 * KIB * KIB
    rows: list[Row] = []
    for name in RELAYS:
        mine: list[Row] = []
        for sessions in (1, 4):
            with (
                SmtpSink() as sink,
                relay_mta(
                    scratch / f"large-{sessions}",
                    sink.port,
                    name=name,
                    server={"max_message_size": 40 * KIB * KIB},
                ) as relay,
            ):
                run_mta_benchmark(relay.port, sink, 1, KIB, 1, mta_pids=list, mta="warmup")
                rss0, _ = _rss_kib(relay.pids())
                result = run_mta_benchmark(
                    relay.port, sink, sessions, size, sessions, mta_pids=relay.pids, mta=name
                )
                row = Row(f"large 30M x{sessions}", name, result)
                row.extra["rss_before_mib"] = round(rss0 / 1024, 1)
                row.extra["growth_mib"] = round(result.peak_rss_mib - rss0 / 1024, 1)
                mine.append(row)
        one, four = (r.extra["growth_mib"] for r in mine)
        mine[-1].extra["growth_per_extra_session_mib"] = round((four - one) / 3, 1)
        rows += mine
    return rows


def hung_run(
    variant: str, mta: Mta, sink: SmtpSink, wedged: WedgedHost, count: int, deadline: float
) -> Row:
    """``count`` 1 KiB messages; until the sink has them all or ``deadline`` s passed.

    ``smtp-source -N`` gives each message its own recipient, so Postfix's
    resolver client cache cannot reuse one random pick for every message.
    No warm-up message: it would meet the wedged host half of the time.
    """
    offset, before, connections = mta.log_offset(), sink.received(), wedged.accepted
    sampler = TreeSampler(mta.pids)
    argv = [SMTP_SOURCE, "-d", "-N", "-s", str(SESSIONS), "-m", str(count), "-l", str(KIB)]
    argv += ["-M", "source.test", "-f", "bench@source.test", "-t", "bench@example.org"]
    sampler.start()
    started = time.monotonic()
    source_exit = 0
    try:
        subprocess.run(
            [*argv, f"127.0.0.1:{mta.port}"], stdin=subprocess.DEVNULL, check=True, timeout=deadline
        )
    except subprocess.TimeoutExpired:
        source_exit = -1
    except subprocess.CalledProcessError as exc:
        # A session lost at the MTA: keep the run (and the rows before it); the
        # row says so, and ``delivered`` counts what did arrive.
        print(f"{mta.name}: smtp-source exited with {exc.returncode}", file=sys.stderr)
        source_exit = exc.returncode
    accepted = time.monotonic()
    with contextlib.suppress(TimeoutError):
        sink.wait(before + count, max(0.1, deadline - (accepted - started)))
    done = time.monotonic()
    cpu = sampler.stop()
    delivered = sink.received() - before
    result = BenchResult.measured(
        mta.name, count, KIB, SESSIONS, accepted - started, done - started, sampler, cpu
    )
    # Cut short by the deadline: the rate of what did arrive.
    result = replace(result, end_to_end_rate=round(delivered / (done - started), 1))
    time.sleep(0.3)  # the delivered lines follow the sink's 250 by a hair
    p50, p99 = quantiles_ms(mta.latencies(offset))
    extra = {
        "delivered": delivered,
        "end_to_end_seconds": result.end_to_end_seconds,
        "wedged_connections": wedged.accepted - connections,
    }
    if source_exit:
        extra["smtp_source_exit"] = source_exit
    return Row(variant, mta.name, result, p50, p99, extra)


def variant_hung(scratch: Path, counts: dict[str, int]) -> list[Row]:
    """One primary wedged, one healthy: the rate and the connections to the wedged one."""
    count, deadline = counts["hung"], float(counts["hung_deadline"])
    rows: list[Row] = []
    with SmtpSink() as sink, WedgedHost(WEDGED_ADDRESS) as wedged:
        settings = hung_postfix_settings(wedged.port, sink.port)
        with postfix_mta(sink.port, tls_level="none", settings=settings) as pf:
            rows.append(hung_run("hung 1k", pf, sink, wedged, count, deadline))
    for name in RELAYS:
        with (
            SmtpSink() as sink,
            WedgedHost(WEDGED_ADDRESS) as wedged,
            relay_mta(
                scratch / "hung",
                sink.port,
                name=name,
                routes=hung_route(wedged.port, sink.port),
                delivery={"connect_timeout": f"{HUNG_TIMEOUT_S}s"},
            ) as relay,
        ):
            rows.append(hung_run("hung 1k", relay, sink, wedged, count, deadline))
    return rows


VARIANTS: dict[str, Callable[[Path, dict[str, int]], list[Row]]] = {
    "plain": variant_plain,
    "tls": variant_tls,
    "queue": variant_queue,
    "large": variant_large,
    "hung": variant_hung,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.bench compare", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="counts divided by 10")
    parser.add_argument("--only", default=",".join(VARIANTS), help="comma-separated variants")
    parser.add_argument("--count-1k", type=int, help="1 KiB messages (default 20000)")
    parser.add_argument("--count-100k", type=int, help="100 KiB messages (default 2000)")
    parser.add_argument("--count-queue", type=int, help="queue-run messages (default 100000)")
    parser.add_argument("--count-hung", type=int, help="hung-variant messages (default 200)")
    parser.add_argument(
        "--one-per-connection",
        action="store_true",
        help="plain and tls also with one message per connection (smtp-source without -d)",
    )
    parser.add_argument(
        "--relay-setting",
        action="append",
        default=[],
        metavar="NAME:SECTION.KEY=VALUE",
        help="also run this checkout's relay as NAME with a config setting (repeatable)",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="one more session times every reply (p50/p99 ms per command) during each run; "
        "relay's event-loop thread sampled every ms (running, gil, poll)",
    )
    parser.add_argument(
        "--hung-deadline",
        type=float,
        default=HUNG_DEADLINE_S,
        help=f"seconds each MTA gets in the hung variant (default {HUNG_DEADLINE_S:g})",
    )
    parser.add_argument("--json", type=Path, default=Path("bench-compare.json"))
    parser.add_argument(
        "--baseline-relay",
        type=Path,
        metavar="DIR",
        help="also run the relay package in DIR (e.g. from `git archive main relay`) as relay-base",
    )
    parser.add_argument(
        "--baseline-name",
        default="relay-base",
        help="the name of --baseline-relay's rows (e.g. relay-after for a branch to merge)",
    )
    parser.add_argument(
        "--relay-workers", type=int, default=1, help="[server] workers of relay (default 1)"
    )
    args = parser.parse_args(argv)
    global RELAY_WORKERS  # noqa: PLW0603 - one run, one setting, read by relay_mta
    RELAY_WORKERS = args.relay_workers
    missing = postfix_missing()
    if missing:
        print(f"cannot run the comparison: {missing}", file=sys.stderr)
        return 2
    scale = 10 if args.quick else 1
    counts = {
        "1k": args.count_1k or 20_000 // scale,
        "100k": args.count_100k or 2_000 // scale,
        "queue": args.count_queue or 100_000 // scale,
        "hung": args.count_hung or 200 // (4 if args.quick else 1),
        "hung_deadline": int(args.hung_deadline),
    }
    wanted = [v.strip() for v in args.only.split(",") if v.strip()]
    unknown = set(wanted) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    if args.baseline_relay:
        if not (args.baseline_relay / "relay" / "__main__.py").exists():
            parser.error(f"{args.baseline_relay} holds no relay package")
        RELAYS.clear()
        if args.baseline_name in ("relay", "postfix"):
            parser.error(f"--baseline-name {args.baseline_name} is taken")
        RELAYS.update({args.baseline_name: (args.baseline_relay.resolve(),), "relay": ()})
    for text in args.relay_setting:
        try:
            name, section, key, value = relay_setting(text)
        except ValueError as exc:
            parser.error(str(exc))
        if name in ("relay", "postfix", args.baseline_name):
            parser.error(f"--relay-setting {name} is taken")
        RELAYS[name] = ()
        RELAY_SETTINGS.setdefault(name, {}).setdefault(section, {})[key] = value
    SHAPES[:] = [False, True] if args.one_per_connection else [False]
    DIAGNOSE[0] = args.diagnose
    info = machine()
    print(f"machine: {info}", flush=True)
    rows: list[Row] = []
    started = time.monotonic()

    def write_json() -> None:
        # After every variant: a run cut short still leaves its figures.
        info["loadavg_now"] = [round(x, 2) for x in os.getloadavg()]
        info["wall_seconds"] = round(time.monotonic() - started, 1)
        payload = {
            "machine": info,
            "counts": counts,
            "sessions": SESSIONS,
            "rows": [
                {
                    "variant": r.variant,
                    "mta": r.mta,
                    **asdict(r.result),
                    "latency_p50_ms": r.latency_p50_ms,
                    "latency_p99_ms": r.latency_p99_ms,
                    **r.extra,
                }
                for r in rows
            ],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="relay-compare-") as tmp:
        for name in wanted:
            print(f"== {name}", flush=True)
            new = VARIANTS[name](Path(tmp), counts)
            rows += new
            print(format_table(new), flush=True)
            write_json()
    print("\n== all")
    print(format_table(rows))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
