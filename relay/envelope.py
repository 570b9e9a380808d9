"""The message envelope and its per-recipient delivery state, as spooled.

The envelope is what the spool persists next to the message bytes: who
sent it, to whom, from where, and where each recipient stands. It is
serialised as JSON so an operator can read it with ``relay queue show``.
"""

from __future__ import annotations

import enum
import json
import time
from dataclasses import dataclass, field
from typing import Any

from relay.errors import Reply


class RcptState(enum.Enum):
    PENDING = "pending"
    DELIVERED = "delivered"
    BOUNCED = "bounced"


@dataclass(slots=True)
class Recipient:
    address: str
    state: RcptState = RcptState.PENDING
    #: Delivery attempts that included this recipient.
    attempts: int = 0
    #: The last reply or failure seen for this recipient (for the DSN and `queue list`).
    last_reply: Reply | None = None
    #: The host that gave ``last_reply``, e.g. "mx1.example.com [192.0.2.1]".
    remote_mta: str = ""
    #: True when ``last_reply`` came from that host over the wire (its
    #: 4xx/5xx), False when the relay wrote it (for the DSN's Diagnostic-Code).
    last_remote: bool = False
    #: Why ``last_reply`` happened when the reply itself does not say, e.g.
    #: "Connect call failed ('192.0.2.1', 25)" behind "451 4.4.1 Next hop
    #: unreachable" (for ``relay queue list``); "" when the reply says it all.
    last_cause: str = ""
    #: The client's RCPT NOTIFY (RFC 3461 section 4.1): "" when it gave
    #: none, "NEVER", or a list such as "SUCCESS,FAILURE" (relay.params).
    notify: str = ""
    #: The client's RCPT ORCPT, decoded: "rfc822;user@example.com"; "" if none.
    orcpt: str = ""
    #: Delivered to a next hop without DSN and the client asked NOTIFY=SUCCESS:
    #: a "relayed" notice is owed to the sender (RFC 3461 section 4.2).
    relayed_notice: bool = False

    def notifies(self, when: str) -> bool:
        """The sender asked to hear of ``when`` ("SUCCESS", "FAILURE", "DELAY").

        Without NOTIFY, RFC 3461 section 4.1 leaves it to the relay:
        failures and delays, never successes (as Postfix).
        """
        if not self.notify:
            return when != "SUCCESS"
        return when in self.notify.split(",")

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"address": self.address, "state": self.state.value}
        if self.attempts:
            data["attempts"] = self.attempts
        if self.last_reply is not None:
            r = self.last_reply
            data["last_reply"] = [r.code, r.status_text, r.text]
        if self.remote_mta:
            data["remote_mta"] = self.remote_mta
        if self.last_remote:
            data["last_remote"] = True
        if self.last_cause:
            # Written only when set: an envelope without it reads the same
            # in an older relay (which ignores keys it does not know).
            data["last_cause"] = self.last_cause
        if self.notify:
            data["notify"] = self.notify
        if self.orcpt:
            data["orcpt"] = self.orcpt
        if self.relayed_notice:
            data["relayed_notice"] = True
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipient:
        reply = None
        if data.get("last_reply"):
            code, status, text = data["last_reply"]
            parts = tuple(int(p) for p in status.split("."))
            reply = Reply(int(code), (parts[0], parts[1], parts[2]), text)
        return cls(
            address=data["address"],
            state=RcptState(data.get("state", "pending")),
            attempts=int(data.get("attempts", 0)),
            last_reply=reply,
            remote_mta=data.get("remote_mta", ""),
            last_remote=bool(data.get("last_remote", False)),
            last_cause=str(data.get("last_cause", "")),
            notify=str(data.get("notify", "")),
            orcpt=str(data.get("orcpt", "")),
            relayed_notice=bool(data.get("relayed_notice", False)),
        )


@dataclass(frozen=True, slots=True)
class ClientInfo:
    #: Peer IP address ("" for locally generated mail such as bounces).
    ip: str = ""
    #: The EHLO/HELO argument the client gave.
    helo: str = ""
    #: Reverse DNS name, if known.
    name: str = ""
    #: TLS version of the inbound session, e.g. "TLSv1.3"; "" for plaintext.
    tls: str = ""

    def to_json(self) -> dict[str, str]:
        return {"ip": self.ip, "helo": self.helo, "name": self.name, "tls": self.tls}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ClientInfo:
        return cls(*(str(data.get(key, "")) for key in ("ip", "helo", "name", "tls")))


@dataclass(slots=True)
class Envelope:
    """One spooled message: envelope, client and delivery state (bytes stay on disk)."""

    #: Queue id: in every log line and the 250 reply.
    id: str
    #: Envelope sender; "" is the null reverse-path (bounces): never bounced.
    mail_from: str
    recipients: list[Recipient]
    client: ClientInfo = ClientInfo()
    #: Arrival time, seconds since the epoch.
    received_at: float = field(default_factory=time.time)
    #: When the next attempt is due, seconds since the epoch.
    next_attempt: float = 0.0
    #: Attempts so far (of the message, over all routes).
    attempts: int = 0
    #: Size of the spooled message in bytes.
    size: int = 0
    #: SMTPUTF8 was requested by the client (RFC 6531).
    smtputf8: bool = False
    #: BODY=8BITMIME was requested (RFC 6152).
    body_8bit: bool = False
    #: True for delivery status notifications this relay generated.
    is_bounce: bool = False
    #: ``attempts`` when an operator last flushed the message (``relay queue
    #: flush``): the retry delay grows with the attempts since then only.
    backoff_from: int = 0
    #: The sender was sent its one delay warning (``[bounces] delay_warning``);
    #: kept so a restart does not send it again.
    delay_warned: bool = False
    #: MAIL FROM carried REQUIRETLS (RFC 8689): every next hop must take it
    #: over verified TLS and offer REQUIRETLS itself, or it bounces.
    requiretls: bool = False
    #: The message has ``TLS-Required: No`` (RFC 8689 section 5) and no
    #: REQUIRETLS: it goes out even where the route's TLS policy fails.
    tls_optional: bool = False
    #: The client's MAIL RET (RFC 3461 section 4.3): "FULL", "HDRS" or "" (none).
    ret: str = ""
    #: The client's MAIL ENVID, decoded (RFC 3461 section 4.4); "" if none.
    envid: str = ""

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if r.state is RcptState.PENDING]

    @property
    def done(self) -> bool:
        return not self.pending

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": self.id,
            "mail_from": self.mail_from,
            "recipients": [r.to_json() for r in self.recipients],
            "client": self.client.to_json(),
            "received_at": self.received_at,
            "next_attempt": self.next_attempt,
            "attempts": self.attempts,
            "size": self.size,
            "smtputf8": self.smtputf8,
            "body_8bit": self.body_8bit,
            "is_bounce": self.is_bounce,
        }
        if self.backoff_from:
            data["backoff_from"] = self.backoff_from  # only when set, as last_cause
        if self.delay_warned:
            data["delay_warned"] = True
        if self.requiretls:
            data["requiretls"] = True  # only when set, as last_cause
        if self.tls_optional:
            data["tls_optional"] = True
        if self.ret:
            data["ret"] = self.ret
        if self.envid:
            data["envid"] = self.envid
        return data

    def dumps(self) -> bytes:
        return json.dumps(self.to_json(), ensure_ascii=False, indent=1).encode("utf-8")

    def dumps_line(self) -> bytes:
        """The same JSON on one line (JSON escapes every line break in strings)."""
        return json.dumps(self.to_json(), ensure_ascii=False, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        return cls(
            id=data["id"],
            mail_from=data["mail_from"],
            recipients=[Recipient.from_json(r) for r in data["recipients"]],
            client=ClientInfo.from_json(data.get("client", {})),
            received_at=float(data.get("received_at", 0.0)),
            next_attempt=float(data.get("next_attempt", 0.0)),
            attempts=int(data.get("attempts", 0)),
            size=int(data.get("size", 0)),
            smtputf8=bool(data.get("smtputf8", False)),
            body_8bit=bool(data.get("body_8bit", False)),
            is_bounce=bool(data.get("is_bounce", False)),
            backoff_from=int(data.get("backoff_from", 0)),
            delay_warned=bool(data.get("delay_warned", False)),
            requiretls=bool(data.get("requiretls", False)),
            tls_optional=bool(data.get("tls_optional", False)),
            ret=str(data.get("ret", "")),
            envid=str(data.get("envid", "")),
        )

    @classmethod
    def loads(cls, raw: bytes) -> Envelope:
        return cls.from_json(json.loads(raw.decode("utf-8")))
