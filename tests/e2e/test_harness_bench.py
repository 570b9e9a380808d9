"""The benchmark driver (docs/performance.md) runs end to end at a tiny scale."""

from __future__ import annotations

from tests.bench.postfix_baseline import SmtpSink, format_table, postfix_baseline
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
