"""Metrics: labelled children looked up once, and the spool's fsync batches.

``Metrics.child`` caches ``labels()`` per label values (the per-message
path: attempts, recipients, delivery seconds); the spool's group commit
exports how many directory fsyncs ran and how many changes they covered.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from relay.envelope import ClientInfo, Envelope, Recipient
from relay.metrics import Metrics
from relay.spool import Spool
from relay.spoolfiles import new_id


def samples(metrics: Metrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_a_cached_child_counts_in_the_series_of_its_labels() -> None:
    metrics = Metrics()
    first = metrics.child(metrics.recipients, "Corp", "delivered")
    assert metrics.child(metrics.recipients, "Corp", "delivered") is first
    first.inc()
    metrics.child(metrics.recipients, "Corp", "delivered").inc()
    metrics.child(metrics.recipients, "Corp", "deferred").inc()
    metrics.child(metrics.delivery_seconds, "Corp").observe(0.2)
    got = samples(metrics)
    assert got[("relay_recipients_total", (("outcome", "delivered"), ("route", "Corp")))] == 2
    assert got[("relay_recipients_total", (("outcome", "deferred"), ("route", "Corp")))] == 1
    assert got[("relay_delivery_seconds_count", (("route", "Corp"),))] == 1


async def test_spool_fsync_batches_are_exported(tmp_path: Path) -> None:
    metrics = Metrics()
    spool = Spool(tmp_path / "spool")
    spool.open()
    metrics.watch_spool_syncs(spool.group)
    try:
        envelopes = [
            Envelope(
                id=new_id(),
                mail_from="alice@example.net",
                recipients=[Recipient("bob@example.org")],
                client=ClientInfo("127.0.0.1", "client.test"),
            )
            for _ in range(20)
        ]
        puts = (spool.put_async(e, b"x\r\n" * 10) for e in envelopes)
        await asyncio.wait_for(asyncio.gather(*puts), 30)
    finally:
        spool.close()
    got = samples(metrics)
    syncs = got[("relay_spool_dir_syncs_total", ())]
    changes = got[("relay_spool_dir_sync_changes_total", ())]
    # Every put is one change made durable; concurrent ones share fsyncs.
    assert changes == 20 and 1 <= syncs <= 20
