"""The comparison benchmark's new modes, plumbed without load (no timed assertions).

One message per connection and the reply-wait probe over real SMTP, the
machine and thread CPU windows read from /proc, the TLS sink's handshake
count, ``--relay-setting`` and the ratio to each Postfix column.
"""

from __future__ import annotations

import os
import threading

import pytest
from aiosmtpd.controller import Controller

from relay.groupcommit import name_os_thread
from tests.bench.compare import relay_setting
from tests.bench.machine import MachineWindow, StateSampler, ThreadWindow
from tests.bench.postfix_baseline import BenchResult
from tests.bench.replywait import ReplyProbe
from tests.bench.report import Row, format_table
from tests.support.procs import free_port
from tests.support.wait import blocking_until


class Count:
    def __init__(self) -> None:
        self.messages = 0
        self.connections = 0

    async def handle_EHLO(self, server, session, envelope, hostname, responses):  # type: ignore[no-untyped-def]
        self.connections += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server, session, envelope) -> str:  # type: ignore[no-untyped-def]
        self.messages += 1
        return "250 2.0.0 OK"


@pytest.fixture
def counting_server():  # type: ignore[no-untyped-def]
    handler = Count()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        yield handler, controller.port
    finally:
        controller.stop()


@pytest.mark.parametrize("one_per_connection", [True, False])
def test_probe_times_every_reply_in_both_client_shapes(counting_server, one_per_connection) -> None:  # type: ignore[no-untyped-def]
    handler, port = counting_server
    probe = ReplyProbe(port, 1024, one_per_connection, max_messages=6).start()
    blocking_until(lambda: probe.messages >= 6, 20, what="6 probe messages")
    probe.stop()
    assert probe.error is None and handler.messages == probe.messages == 6
    # A new connection (greeting and EHLO) for each message, or one for all.
    assert handler.connections == (6 if one_per_connection else 1)
    summary = probe.summary()
    for command in ("mail", "rcpt", "data", "dot"):
        p50, p99 = (float(x) for x in str(summary[command]).split("/"))
        assert 0 <= p50 <= p99
    assert ("greeting" in summary) == one_per_connection


def test_machine_and_thread_windows_read_proc() -> None:
    stop = threading.Event()

    def spin() -> None:
        name_os_thread("bench-spin")
        while not stop.wait(0.001):
            sum(range(1000))

    machine, threads = MachineWindow().start(), ThreadWindow(os.getpid()).start()
    states = StateSampler(os.getpid()).start()
    spinner = threading.Thread(target=spin)
    spinner.start()
    stop.wait(0.2)
    threads.stop()  # while the spinner lives: a thread that ended is not counted
    machine.stop()
    # Every sample of this (main) thread is classified: running, gil, poll or a wchan.
    shares = states.stop()
    assert shares and abs(sum(shares.values()) - 100) < 1
    stop.set()
    spinner.join()
    assert machine.busy_pct is not None and 0 <= machine.busy_pct <= 100
    assert machine.loadavg_1m is not None
    # The OS name of the thread, and "main" for the one whose id is the pid.
    assert {"main", "bench-spin"} <= set(threads.cpu_seconds)
    assert all(pct >= 0 for pct in threads.core_pct().values())
    assert set(threads.runqueue_pct()) == set(threads.cpu_seconds)


def test_relay_setting_reads_name_section_key_and_a_toml_value() -> None:
    assert relay_setting("uv:server.event_loop=uvloop") == ("uv", "server", "event_loop", "uvloop")
    assert relay_setting('uv:server.event_loop="uvloop"')[3] == "uvloop"
    assert relay_setting("w:delivery.max_per_host=40")[3] == 40
    with pytest.raises(ValueError, match="NAME:SECTION.KEY=VALUE"):
        relay_setting("uv:event_loop=uvloop")


def result(mta: str, rate: float, one: bool = False) -> BenchResult:
    return BenchResult(
        mta, 100, 1024, 20, 1.0, rate, 1.0, rate, 30.0, 20.0, 1, 1.0, 10.0, 50.0, 95.0, 1.5, one
    )


def test_table_gives_relays_ratio_to_each_postfix_and_the_busy_figures() -> None:
    rows = [
        Row("tls 1k", "postfix", result("postfix", 200.0), extra={"sink_tls_handshakes": 201}),
        Row("tls 1k", "postfix-reuse", result("postfix-reuse", 400.0)),
        Row("tls 1k", "relay", result("relay", 600.0)),
        Row("tls 1k 1/conn", "relay", result("relay", 500.0, one=True)),
    ]
    table = format_table(rows).splitlines()
    assert table[0].split()[-2:] == ["relay/pf", "relay/pf-reuse"]
    e2e = next(line for line in table if line.startswith("tls 1k ") and "end_to_end" in line)
    assert e2e.split()[-5:] == ["200", "400", "600", "3.00", "1.50"]
    assert any(line.startswith("tls 1k 1/conn") for line in table)
    assert any("machine_busy_pct" in line and "95" in line for line in table)
    assert any("sink_tls_handshakes" in line and "201" in line for line in table)
