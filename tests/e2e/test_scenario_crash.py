"""Scenario: the relay is killed with SIGKILL while 100 messages are queued.

The downstream Postfix is stopped, so every accepted message sits in the
spool with a failed attempt behind it; SIGKILL leaves no chance to flush
anything. After the downstream and then the relay are started again on the
same spool, every message must be delivered, and exactly once: with the
downstream down at kill time no 250 can have been lost between the next
hop and the spool (the only duplicate window, docs/tls.md "Duplicates").
"""

from __future__ import annotations

import smtplib
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.support import configs
from tests.support.postfix import PostfixFactory
from tests.support.procs import RelayProcess, relay_config
from tests.support.wait import blocking_until

StartRelay = Callable[[Path], RelayProcess]
COUNT = 100


def submit_many(port: int, recipient: str, count: int) -> list[str]:
    """Send ``count`` messages in one SMTP session; their Message-IDs."""
    ids = [f"<crash.{i}@up.test>" for i in range(count)]
    with smtplib.SMTP("127.0.0.1", port, local_hostname="client.test", timeout=10) as client:
        for index, message_id in enumerate(ids):
            message = (
                f"From: alice@up.test\r\nTo: {recipient}\r\nSubject: crash {index}\r\n"
                f"Message-ID: {message_id}\r\n\r\nmessage {index}\r\n"
            )
            refused = client.sendmail("alice@up.test", [recipient], message.encode())
            assert not refused, refused
    return ids


def test_sigkill_with_100_queued_then_all_delivered_once(
    tmp_path: Path, postfix: PostfixFactory, relay: StartRelay
) -> None:
    down = postfix.downstream()
    config = relay_config(tmp_path, configs.route("Downstream", "127.0.0.1", down.port))
    proc = relay(config)
    down.stop()
    recipient = "bob-crash@example.org"

    ids = submit_many(proc.port, recipient, COUNT)
    spool = tmp_path / "relay-spool"
    assert len(list(spool.rglob("*.msg"))) == COUNT
    # At least one attempt failed (connection refused) before the crash.
    proc.wait_for_stderr("event=deferred", timeout=15)
    proc.kill9()
    assert proc.returncode == -9
    assert len(list(spool.rglob("*.msg"))) == COUNT  # nothing lost with the process

    down.start()
    proc.start()
    down.wait_messages(COUNT, timeout=40, recipient=recipient)
    blocking_until(lambda: not any(spool.rglob("*.msg")), 15, what="the relay spool to drain")
    time.sleep(0.5)  # give a duplicate the chance to arrive

    seen = Counter(str(m["Message-ID"]) for m in down.messages(recipient))
    missing = set(ids) - set(seen)
    duplicates = {mid: n for mid, n in seen.items() if n > 1}
    print(f"delivered {sum(seen.values())} of {COUNT}; duplicates: {len(duplicates)}")
    assert not missing, f"missing: {sorted(missing)}"
    assert not duplicates, f"duplicates: {duplicates}"
    assert set(seen) == set(ids)
    assert not [line for line in proc.stderr_lines() if "event=bounced" in line]


def test_sigkill_during_delivery_loses_nothing(
    tmp_path: Path, postfix: PostfixFactory, relay: StartRelay
) -> None:
    """Killed while delivering: nothing missing; duplicates only from the crash window.

    A duplicate needs a 250 from the downstream that the spool had not yet
    recorded when the process died, so there can be at most one per
    transaction in flight: ``max_per_host`` (5) on this one-host route.
    """
    down = postfix.downstream()
    config = relay_config(tmp_path, configs.route("Downstream", "127.0.0.1", down.port))
    proc = relay(config)
    recipient = "bob-midway@example.org"
    # Queue all 100 first, so that they retry together once the downstream is up.
    down.stop()
    ids = submit_many(proc.port, recipient, COUNT)
    down.start()

    def delivered() -> bool:
        return any("event=delivered" in line for line in proc.stderr_lines())

    blocking_until(delivered, 20, interval=0.005, what="the first delivery")
    proc.kill9()
    # "event=delivered" is logged on the 250, just before the spool write:
    # killing right after it hits the crash window on purpose.
    before = sum("event=delivered" in line for line in proc.stderr_lines())

    proc.start()
    down.wait_messages(COUNT, timeout=40, recipient=recipient)
    spool = tmp_path / "relay-spool"
    blocking_until(lambda: not any(spool.rglob("*.msg")), 15, what="the relay spool to drain")
    time.sleep(0.5)

    seen = Counter(str(m["Message-ID"]) for m in down.messages(recipient))
    duplicates = {mid: n for mid, n in seen.items() if n > 1}
    print(f"killed after {before} of {COUNT} logged delivered; duplicates: {duplicates}")
    assert set(seen) == set(ids), f"missing: {sorted(set(ids) - set(seen))}"
    assert sum(n - 1 for n in duplicates.values()) <= 5, duplicates
