"""Scenario: Postfix -> relay -> Postfix with DSN requests (RFC 3461) end to end.

The upstream Postfix is given ``sendmail -N`` and ``-V`` and sends NOTIFY,
ORCPT and ENVID to relay (the daemon, a subprocess), which passes them to
the downstream Postfix; HOLD keeps the message in the downstream queue,
whose queue file shows what it received. Also the in-process relay in front
of a downstream Postfix (the DSN parameters relay itself passes on).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from relay.envelope import Recipient
from tests.support import configs
from tests.support.dsn import HOSTS, MX, RULES, put, routes
from tests.support.integ import InProcessRelay, idle, integration_toml
from tests.support.postfix import SENDMAIL, PostfixFactory
from tests.support.procs import RelayProcess, relay_config
from tests.support.wait import blocking_until, until

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


# --- a next hop that offers DSN: Postfix -------------------------------------------


def queue_file_records(config_dir: Path, queue_id: str) -> str:
    """``postcat`` of one queued message: its envelope records, DSN ones included."""
    done = subprocess.run(
        ["/usr/sbin/postcat", "-c", str(config_dir), "-e", "-q", queue_id],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    return done.stdout + done.stderr


async def test_postfix_downstream_receives_notify_orcpt_envid_ret(
    tmp_path, dnsmasq, dsn_sink, postfix
):
    # HOLD keeps the message in Postfix's queue, where its queue file shows
    # the DSN parameters as Postfix took them from relay's MAIL and RCPT.
    down = postfix.downstream(domains=("corp.test",), recipient_replies={"corp.test": "HOLD"})
    server = dnsmasq(hosts=HOSTS, mx=MX)
    toml = integration_toml(tmp_path, server, routes(down.port, dsn_sink), RULES)
    async with InProcessRelay(tmp_path, toml) as relay:
        rcpts = [
            Recipient("one@corp.test", notify="SUCCESS,DELAY", orcpt="rfc822;orig+tag@corp.test"),
            Recipient("two@corp.test", notify="NEVER"),
        ]
        put(relay, rcpts, ret="HDRS", envid="id+=1")
        await until(lambda: relay.spooled() == [], what="the message delivered")
        await idle(relay)
    (queue_id,) = blocking_until(lambda: down.queued() or None, 15, what="the held message")
    records = queue_file_records(down.config_dir, queue_id)
    lines = [line.removeprefix("named_attribute: ") for line in records.splitlines()]
    assert "envelope_id=id+=1" in lines, records
    assert "ret_flags=2" in lines, records  # Postfix's DSN_RET_HDRS
    # Per recipient, before its recipient record; Postfix's NOTIFY bit mask
    # is NEVER 1, SUCCESS 2, FAILURE 4, DELAY 8.
    one = lines.index("recipient: one@corp.test")
    assert lines[one - 3 : one - 1] == [
        "notify_flags=10",
        "dsn_orig_rcpt=rfc822;orig+tag@corp.test",
    ]
    two = lines.index("recipient: two@corp.test")
    assert lines[two - 3] == "notify_flags=1", records
    # No "relayed" notice: Postfix offers DSN and tells the sender itself.
    assert dsn_sink.messages == []
