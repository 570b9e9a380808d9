"""Scenario: Postfix -> relay -> Postfix with DSN requests (RFC 3461) end to end.

The upstream Postfix is given ``sendmail -N`` and ``-V`` and sends NOTIFY,
ORCPT and ENVID to relay (the daemon, a subprocess), which passes them to
the downstream Postfix; HOLD keeps the message in the downstream queue,
whose queue file shows what it received.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import configs
from tests.support.postfix import SENDMAIL, PostfixFactory
from tests.support.procs import RelayProcess, relay_config
from tests.support.wait import blocking_until

pytestmark = pytest.mark.e2e


@pytest.fixture
def postfix(tmp_path: Path) -> Iterator[PostfixFactory]:
    factory = PostfixFactory(keep_logs_in=tmp_path / "postfix-logs")
    try:
        yield factory
    finally:
        factory.close()


def test_notify_orcpt_envid_travel_from_postfix_through_relay_to_postfix(
    tmp_path: Path, postfix: PostfixFactory
) -> None:
    down = postfix.downstream(recipient_replies={"example.org": "HOLD"})
    proc = RelayProcess(
        relay_config(tmp_path, configs.route("Downstream", "127.0.0.1", down.port))
    ).start()
    try:
        up = postfix.upstream(relay_port=proc.port)
        done = subprocess.run(
            [SENDMAIL, "-C", str(up.config_dir), "-i", "-f", "alice@up.test",
             "-N", "success,delay", "-V", "env+id=7", "--", "bob@example.org"],
            input=b"Subject: dsn\r\n\r\nbody\r\n", capture_output=True, timeout=20,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        (queue_id,) = blocking_until(lambda: down.queued() or None, 20, what="the held message")
    finally:
        proc.stop()
    records = subprocess.run(
        ["/usr/sbin/postcat", "-c", str(down.config_dir), "-e", "-q", queue_id],
        capture_output=True, text=True, timeout=30,
    ).stdout  # fmt: skip
    lines = [line.removeprefix("named_attribute: ") for line in records.splitlines()]
    assert "envelope_id=env+id=7" in lines, records
    bob = lines.index("recipient: bob@example.org")
    # Postfix's NOTIFY bit mask: SUCCESS 2 + DELAY 8; the ORCPT Postfix added upstream.
    assert lines[bob - 3] == "notify_flags=10", records
    assert lines[bob - 2] == "dsn_orig_rcpt=rfc822;bob@example.org", records
