"""The benchmark driver (docs/performance.md) runs end to end at a tiny scale."""

from __future__ import annotations

import re

import pytest

from tests.bench.postfix_baseline import (
    SmtpSink,
    format_table,
    postfix_baseline,
    run_mta_benchmark,
)
from tests.support.peers import require_postfix


def test_postfix_baseline_counts_every_message() -> None:
    require_postfix()
    result = postfix_baseline(count=40, size=512, sessions=4, timeout=60)
    assert result.count == 40
    assert result.end_to_end_seconds >= result.accept_seconds > 0
    assert result.peak_pss_mib > 0 and result.peak_processes >= 4
    # Kernel CPU accounting is tick-sampled: 40 messages may round to 0.
    assert result.cpu_seconds >= 0
    assert "end_to_end_rate" in format_table([result])


def test_sink_counts_start_at_zero() -> None:
    require_postfix()
    with SmtpSink() as sink:
        assert sink.received() == 0


@pytest.mark.parametrize("one_per_connection", [False, True])
def test_smtp_source_opens_a_connection_per_message_only_when_asked(
    one_per_connection: bool,
) -> None:
    # smtp-source straight into smtp-sink (no MTA in between): the sink's
    # session count tells the two client shapes apart.
    require_postfix()
    with SmtpSink() as sink:
        result = run_mta_benchmark(
            sink.port, sink, 6, 200, 2, mta_pids=list, one_per_connection=one_per_connection
        )
        sessions = int(re.findall(rb"sess=(\d+)", sink.out_path.read_bytes())[-1])
        assert sink.received() == 6
    assert result.one_per_connection is one_per_connection
    assert (sessions >= 6) is one_per_connection
    assert result.loadavg_1m is not None
