"""The DSN scenario's world: a corp domain behind a sink, a sender domain whose MX
is another sink, and messages spooled with RFC 3461 parameters as inbound would."""

from __future__ import annotations

from relay.envelope import ClientInfo, Envelope, Recipient
from relay.spoolfiles import new_id
from tests.support import configs
from tests.support.integ import SENDER, InProcessRelay
from tests.support.sink import Sink

RULES = configs.rule("Corp", "@corp.test") + configs.rule("Senders", "@sender.test")
HOSTS = {"mx1.corp.test": ["127.0.0.1"], "mx.sender.test": ["127.0.0.1"]}
MX = {"sender.test": [(10, "mx.sender.test")]}
MESSAGE = b"From: alice@sender.test\r\nSubject: dsn test\r\nMessage-ID: <m1@sender.test>\r\n\r\n"
MESSAGE += b"the secret body line\r\n"


def routes(corp_port: int, dsn_sink: Sink) -> str:
    return configs.route("Corp", "mx1.corp.test", corp_port) + configs.route(
        "Senders", "sender.test", dsn_sink.port, mx_lookup=True
    )


def put(
    relay: InProcessRelay, recipients: list[Recipient], ret: str = "", envid: str = ""
) -> Envelope:
    """Spool a message with DSN parameters as inbound would, and queue it."""
    now = relay.clock()
    envelope = Envelope(
        id=new_id(), mail_from=SENDER, recipients=recipients,
        client=ClientInfo(ip="192.0.2.10", helo="client.test"),
        received_at=now, next_attempt=now, ret=ret, envid=envid,
    )  # fmt: skip
    relay.spool.put(envelope, MESSAGE)
    relay.scheduler.add(envelope)
    return envelope
