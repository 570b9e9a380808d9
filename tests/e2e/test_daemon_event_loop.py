"""[server] event_loop: the daemon on uvloop, delivering over verified STARTTLS.

The third performance round saw "Connection lost" on every STARTTLS with
relay on uvloop. The cause was the benchmark's TLS sink (tests/bench/pysink.py),
not relay or aiosmtplib: uvloop's client sends its first EHLO together with
its TLS 1.3 Finished message, and the sink answered it on the plain
transport it was replacing. These tests run the daemon on uvloop against that
sink, with every TLS check of a route on.
"""

from __future__ import annotations

import smtplib
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay import configload, keeper, loops
from relay.config import Config
from tests.bench.pysink import PySink
from tests.support import configs
from tests.support.configs import TLS_LEVELS
from tests.support.inbound import inbound_toml
from tests.support.pki import Pki
from tests.support.procs import RelayProcess, relay_config

MESSAGE = b"From: a@source.test\r\nTo: b@example.org\r\nSubject: loop\r\n\r\nhello\r\n"


@pytest.fixture
def tls_sink(tmp_path: Path) -> Iterator[tuple[PySink, Pki]]:
    pki = Pki(tmp_path / "pki")
    leaf = pki.issue("sink.test", "127.0.0.1", stem="sink")
    with PySink(leaf.cert, leaf.key) as sink:
        yield sink, pki


@pytest.mark.parametrize("event_loop", loops.EVENT_LOOPS)
def test_daemon_delivers_over_verified_starttls_on_each_loop(
    tmp_path: Path, tls_sink: tuple[PySink, Pki], event_loop: str
) -> None:
    sink, pki = tls_sink
    route = configs.route("Sink", "127.0.0.1", sink.port, **TLS_LEVELS["full"])
    config = relay_config(
        tmp_path,
        route,
        server={"event_loop": event_loop},
        tls={"ca_file": str(pki.ca_file)},
    )
    with RelayProcess(config) as proc:
        proc.wait_log(f"loop={event_loop}")
        for _ in range(3):
            with smtplib.SMTP("127.0.0.1", proc.port, timeout=10) as client:
                client.sendmail("a@source.test", ["b@example.org"], MESSAGE)
        sink.wait(3, 20)
        proc.wait_log("event=delivered")
    assert "event=attempt" in proc.log and "tls_failed" not in proc.log
    assert sink.handshakes() >= 1


def test_an_unknown_event_loop_is_a_config_problem(tmp_path: Path) -> None:
    text = inbound_toml(tmp_path / "spool", extra_server='event_loop = "trio"')
    with pytest.raises(configload.ConfigError, match="event_loop"):
        configload.parse(tomllib.loads(text), tmp_path / "relay.toml")


def test_changing_the_event_loop_needs_a_restart(tmp_path: Path) -> None:
    def parse(extra: str) -> Config:
        text = inbound_toml(tmp_path / "spool", extra_server=extra)
        return configload.parse(tomllib.loads(text), tmp_path / "relay.toml")

    old, new = parse('event_loop = "asyncio"'), parse('event_loop = "uvloop"')
    problems = keeper.restart_problems(old, new)
    assert [(p.where, p.field) for p in problems] == [("server", "event_loop")]
    assert "keeps asyncio" in problems[0].message
