"""The comparison benchmark's pure parts: latency from the MTAs' logs, and the table."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.compare import Row, format_table, postfix_latencies, relay_latencies
from tests.bench.postfix_baseline import BenchResult
from tests.support.wait import blocking_until

RELAY_LOG = """\
ts=2026-11-28T13:00:00.100Z level=info event=started listen=127.0.0.1:2525 loop=asyncio
ts=2026-11-28T13:00:01.000Z level=info event=accepted id=AAA from=<a@b> to=<c@d> size=10
ts=2026-11-28T13:00:01.010Z level=info event=accepted id=BBB from=<a@b> to=<c@d> size=10
ts=2026-11-28T13:00:01.025Z level=info event=attempt id=AAA route=Sink result=delivered
ts=2026-11-28T13:00:01.025Z level=info event=delivered id=AAA to=<c@d> route=Sink
ts=2026-11-28T13:00:01.110Z level=info event=delivered id=BBB to=<c@d> route=Sink
ts=2026-11-28T13:00:01.200Z level=info event=delivered id=CCC to=<c@d> route=Sink
"""

POSTFIX_LOG = """\
Nov 28 13:00:01 bench postfix/smtp[1]: 4AB: to=<c@d>, relay=127.0.0.1[127.0.0.1]:2526, \
delay=0.02, delays=0.01/0/0/0.01, dsn=2.0.0, status=sent (250 Ok)
Nov 28 13:00:01 bench postfix/smtp[1]: 4AC: to=<c@d>, relay=none, delay=1.5, \
delays=0/0/1.5/0, dsn=4.4.1, status=deferred (connect to 127.0.0.1[127.0.0.1]:2526: refused)
Nov 28 13:00:02 bench postfix/smtp[1]: 4AD: to=<c@d>, relay=127.0.0.1[127.0.0.1]:2526, \
delay=0.11, delays=0.01/0/0/0.1, dsn=2.0.0, status=sent (250 Ok)
"""


def test_relay_latency_pairs_accepted_and_delivered_per_id(tmp_path: Path) -> None:
    log = tmp_path / "relay.log"
    log.write_text(RELAY_LOG)
    delays = relay_latencies(log, 0)
    # CCC was accepted before the offset (not in the log): not counted.
    assert [round(d, 3) for d in delays] == [0.025, 0.1]


def test_postfix_latency_is_the_delay_of_sent_lines(tmp_path: Path) -> None:
    log = tmp_path / "maillog"
    log.write_text(POSTFIX_LOG)
    assert postfix_latencies(log, 0) == [0.02, 0.11]
    first_line = len(POSTFIX_LOG.splitlines(keepends=True)[0])
    assert postfix_latencies(log, first_line) == [0.11]


def result(mta: str, rate: float) -> BenchResult:
    return BenchResult(mta, 100, 1024, 20, 1.0, rate, 1.0, rate, 30.0, 20.0, 1, 1.0, 10.0)


def test_table_has_each_mta_and_the_ratio_to_postfix() -> None:
    rows = [
        Row("plain 1k", "postfix", result("postfix", 400.0), 10.0, 20.0),
        Row("plain 1k", "relay", result("relay", 600.0), 5.0, 8.0, {"drain_seconds": 2.5}),
    ]
    table = format_table(rows).splitlines()
    assert table[0].split() == ["variant", "figure", "postfix", "relay", "relay/pf"]
    e2e = next(line for line in table if "end_to_end_rate" in line).split()
    assert e2e[-3:] == ["400", "600", "1.50"]
    assert any("drain_seconds" in line and "2.5" in line for line in table)


def test_pacer_message_is_dot_terminated_and_about_the_size() -> None:
    from tests.bench.pacer import message

    body = message(1024)
    assert body.endswith(b"\r\n.\r\n") and 900 <= len(body) <= 1100
    assert all(len(line) <= 998 for line in body.split(b"\r\n"))


def test_pacer_sends_every_message_over_real_smtp() -> None:
    # The pacer drives a real SMTP server (aiosmtpd in its own thread); it
    # offers rate x seconds messages and reports how many it sent.
    from aiosmtpd.controller import Controller

    from tests.bench.pacer import pace

    class Count:
        def __init__(self) -> None:
            self.messages = 0

        async def handle_DATA(self, server, session, envelope) -> str:
            self.messages += 1
            return "250 2.0.0 OK"

    from tests.support.procs import free_port

    handler = Count()
    port = free_port()
    controller = Controller(handler, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        sent = pace(port, rate=40, seconds=0.5, sessions=4)
    finally:
        controller.stop()
    assert sent.sent == 20 == handler.messages
    assert sent.rate > 0


# -- the hung variant's pieces ---------------------------------------------------


def test_wedged_host_counts_connections_and_never_greets() -> None:
    import socket

    from tests.bench.wedged import WedgedHost

    with WedgedHost("127.0.0.2") as wedged:
        address = (wedged.host, wedged.port)
        clients = [socket.create_connection(address, timeout=5) for _ in range(3)]
        try:
            blocking_until(lambda: wedged.accepted == 3, 5, what="3 accepted connections")
            # What a client sends is read and ignored; no greeting ever comes.
            clients[0].sendall(b"EHLO client.test\r\n")
            clients[0].settimeout(0.3)
            with pytest.raises(TimeoutError):
                clients[0].recv(1)
            assert wedged.open_connections == 3
        finally:
            for client in clients:
                client.close()
        blocking_until(lambda: wedged.open_connections == 0, 5, what="closed connections forgotten")
        assert wedged.accepted == 3


def test_wedged_host_listens_on_loopback_only() -> None:
    from tests.bench.wedged import WedgedHost

    with pytest.raises(ValueError, match="loopback"):
        WedgedHost("192.0.2.1")


def test_hung_route_is_two_primaries_at_fifty_fifty() -> None:
    import tomllib

    from tests.bench.wedged import SINK_ADDRESS, WEDGED_ADDRESS, hung_route

    (table,) = tomllib.loads(hung_route(2600, 2601))["routes"]
    assert table["primary"] == [
        {"host": WEDGED_ADDRESS, "port": 2600, "load": 50},
        {"host": SINK_ADDRESS, "port": 2601, "load": 50},
    ]
    assert "secondary" not in table and WEDGED_ADDRESS != SINK_ADDRESS


def test_hung_postfix_settings_give_both_hosts_with_relays_timeout() -> None:
    from tests.bench.compare import HUNG_TIMEOUT_S, hung_postfix_settings

    settings = hung_postfix_settings(2600, 2601)
    table = settings["sender_dependent_relayhost_maps"]
    assert table.startswith("pipemap:{randmap:{wedged_first, sink_first}, inline:")
    assert "wedged_first = [127.0.0.2]:2600, [127.0.0.1]:2601" in table
    assert "sink_first = [127.0.0.1]:2601, [127.0.0.2]:2600" in table
    # Postfix's connect timeout covers TCP only; the greeting has its own.
    assert settings["smtp_connect_timeout"] == f"{HUNG_TIMEOUT_S}s"
    assert settings["smtp_helo_timeout"] == f"{HUNG_TIMEOUT_S}s"


def test_hung_relay_config_has_the_route_and_the_timeout(tmp_path: Path) -> None:
    # The relay under test reads this config: its route and timeout are the
    # ones the Postfix settings mirror.
    import tomllib

    from tests.bench.compare import HUNG_TIMEOUT_S, hung_route
    from tests.support.procs import relay_config

    path = relay_config(
        tmp_path, hung_route(2600, 2601), delivery={"connect_timeout": f"{HUNG_TIMEOUT_S}s"}
    )
    config = tomllib.loads(path.read_text())
    assert config["delivery"]["connect_timeout"] == "8s"
    (only,) = config["routes"]
    assert [(h["host"], h["load"]) for h in only["primary"]] == [
        ("127.0.0.2", 50),
        ("127.0.0.1", 50),
    ]


def test_postfix_reads_the_table_and_draws_both_orders(tmp_path: Path) -> None:
    # This Postfix's own lookup of the table: each query one of the two orders.
    import shutil
    import subprocess

    from tests.bench.compare import hung_postfix_settings

    postmap = shutil.which("postmap") or "/usr/sbin/postmap"
    if not Path(postmap).exists():
        pytest.skip("postmap (the postfix package) is not installed")
    (tmp_path / "main.cf").write_text("")
    table = hung_postfix_settings(2600, 2601)["sender_dependent_relayhost_maps"]
    keys = "".join(f"sender{i}@source.test\n" for i in range(64))
    done = subprocess.run(
        [postmap, "-c", str(tmp_path), "-q", "-", table],
        input=keys,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    picks = {line.split("\t")[1] for line in done.stdout.splitlines()}
    # 64 fair coin flips all alike: 2 ** -63.
    assert picks == {
        "[127.0.0.2]:2600, [127.0.0.1]:2601",
        "[127.0.0.1]:2601, [127.0.0.2]:2600",
    }
