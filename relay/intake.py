"""Intake: a received message checked, made durable in the spool, then
handed to the scheduler; ``250 queued as`` is sent only after
:meth:`relay.spool.Spool.put_async` has made message and envelope durable.

No SMTP library here: inbound.py reads a :class:`Transaction` off its
session and asks :meth:`Intake.accept` for the reply to the final dot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from relay import errors, events
from relay.addresses import client_address
from relay.admission import MemoryBudget
from relay.content import MessageCheck, protocol_keyword, received_header, unstuff
from relay.envelope import ClientInfo, Envelope, Recipient
from relay.errors import Reply, SpoolError, SpoolFull
from relay.metrics import Metrics
from relay.spool import Spool
from relay.spoolbody import IN_MEMORY_MAX, BodyWriter
from relay.spoolfiles import new_id

#: Content held in memory while DATA is received, before the rest goes to
#: the spool's temp file (see relay.spoolbody.IN_MEMORY_MAX).
SPILL_THRESHOLD = IN_MEMORY_MAX


@dataclass(frozen=True, slots=True)
class Transaction:
    """What the SMTP session knows of the message it receives."""

    #: The client's address as the socket reports it.
    peer: str
    #: The EHLO/HELO argument (checked by relay.addresses.valid_helo).
    helo: str
    #: The client said EHLO (not HELO).
    esmtp: bool
    #: (cipher, TLS version, bits) under STARTTLS, else None.
    cipher: tuple[str, str, int] | None
    #: Our host name, for the Received header.
    hostname: str
    #: The client's forward-confirmed reverse DNS name, if known.
    client_name: str | None
    #: The reverse-path as written, "<>" for the null one.
    mail_from: str
    recipients: tuple[str, ...]
    smtputf8: bool
    body_8bit: bool
    #: The MAIL parameters relay.params checked (keyword -> value as stored).
    mail_parameters: Mapping[str, str] = field(default_factory=dict)
    #: Per recipient (by address), the RCPT parameters relay.params checked.
    rcpt_parameters: Mapping[str, Mapping[str, str]] = field(default_factory=dict)


class Reject(Protocol):
    """Counts and logs one refusal of the DATA (``reason`` from metrics.REJECT_REASONS)."""

    def __call__(self, reason: str, **fields: Any) -> None: ...


class SpoolSpill:
    """A large message's content on its way into the spool (a
    :class:`relay.datareader.Spill`).

    The first piece decides the queue id and writes our Received header,
    then each piece is unstuffed, checked (:class:`MessageCheck`) and
    appended to a :class:`relay.spoolbody.BodyWriter`. A spool error is kept
    for the reply after the final dot (the client must send the rest
    first); later pieces are then only checked. ``budget`` is shared by
    every session: while it is exhausted, everything spills at once.
    """

    def __init__(
        self,
        start: Callable[[], tuple[Envelope, bytes]],
        spool: Spool,
        budget: MemoryBudget,
    ) -> None:
        self._budget = budget
        #: The bytes this session counts in the budget now.
        self._held = 0
        self._start = start
        self._spool = spool
        self.check = MessageCheck()
        #: The provisional envelope (queue id, client) the header was made for.
        self.envelope: Envelope | None = None
        self.writer: BodyWriter | None = None
        self.failure: SpoolError | None = None

    @property
    def threshold(self) -> int:
        # Over the memory budget every session spills at once (whole lines:
        # what stays is a partial line and the block just read).
        return 0 if self._budget.exhausted else SPILL_THRESHOLD

    def holding(self, size: int) -> None:
        self._budget.held += size - self._held
        self._held = size

    def release(self) -> None:
        """The DATA is over: its content no longer counts."""
        self.holding(0)

    @property
    def started(self) -> bool:
        return self.envelope is not None

    async def write(self, raw: bytes) -> None:
        content = unstuff(raw)
        del raw
        self.check.feed(content)
        prefix = b""
        if self.envelope is None:
            self.envelope, prefix = self._start()
            self.writer = self._spool.body_writer(self.envelope.id)
        if self.failure is not None or self.writer is None:
            return
        try:
            await self.writer.write(content, prefix)
        except SpoolError as exc:
            self.failure = exc

    def abandon(self) -> None:
        self.discard()
        self.envelope = None

    def discard(self) -> None:
        """Remove the temp file unless the spool took it (put_async)."""
        if self.writer is not None:
            self.writer.discard()


class Intake:
    """Checks, spools and schedules each received message.

    ``on_accept`` is called with each envelope after its spool write, and
    the stored body's parts (the scheduler's ``add``); intake never
    delivers. ``writes_done`` is set while no spool write is under way
    (shutdown waits for it, so the 250 of a write in progress goes out).
    """

    def __init__(
        self,
        spool: Spool,
        metrics: Metrics,
        on_accept: Callable[[Envelope, Sequence[bytes]], None],
        clock: Callable[[], float],
    ) -> None:
        self.spool = spool
        self.metrics = metrics
        self.on_accept = on_accept
        self.clock = clock
        #: Spool writes under way.
        self.writes = 0
        self.writes_done = asyncio.Event()
        self.writes_done.set()

    async def accept(
        self, tx: Transaction, content: bytes, spill: SpoolSpill | None, reject: Reject
    ) -> Reply:
        """Check the message, spool it durably, then hand it to ``on_accept``.

        The content is ``content``, or, for a large message, already in
        ``spill``'s temp file (checked piece by piece, with the Received
        header :meth:`begin` made).
        """
        check = spill.check if spill is not None else MessageCheck()
        if spill is None:
            check.feed(content)
        problem = check.result()
        if problem is not None:
            reject(problem[1], reply=problem[0])
            return problem[0]
        if spill is None:
            env = self._envelope(tx)
            header = self._received(tx, env)
        else:
            assert spill.envelope is not None
            env = self._envelope(tx, spill.envelope.id)
            header = b""
            if spill.failure is not None:
                # The disk filled (or failed) during the DATA.
                return self._not_spooled(env, spill.failure, reject)
        # RFC 8689 section 4.1: REQUIRETLS outranks a TLS-Required: No header.
        env.tls_optional = check.tls_optional and not env.requiretls
        write = self._spool(env, header, content, spill.writer if spill is not None else None)
        try:
            await asyncio.shield(write)
        except asyncio.CancelledError:
            # The session was cancelled (client gone, shutdown) while the
            # write went on. If it lands, the message is durable and must be
            # scheduled now, not at the next start, although no 250 reached
            # the client (which will likely send it again).
            write.add_done_callback(lambda task: self._landed_unanswered(task, env))
            raise
        except SpoolError as exc:
            return self._not_spooled(env, exc, reject)
        self.metrics.messages_received.inc()
        events.log(
            "accepted",
            id=env.id,
            from_=f"<{env.mail_from}>",
            to=",".join(f"<{r.address}>" for r in env.recipients),
            size=env.size,
            client=env.client.ip,
            helo=env.client.helo,
            tls=env.client.tls or "no",
        )
        try:
            # A spilled message has no body in memory: the scheduler reads it.
            self.on_accept(env, (header, content) if spill is None else ())
        except Exception:
            # The message is durable; the scheduler finds it at the next start.
            events.error("schedule_failed", exc_info=True, id=env.id)
        return errors.queued(env.id)

    def _not_spooled(self, env: Envelope, exc: SpoolError, reject: Reject) -> Reply:
        """Log and count a failed spool write; the reply (452 when the disk is full)."""
        events.error("spool_failed", id=env.id, error=exc.detail)
        if isinstance(exc, SpoolFull):
            reject("disk_full")
            return errors.DISK_FULL
        reject("spool_error")
        return errors.SPOOL_FAILED

    def begin(self, tx: Transaction) -> tuple[Envelope, bytes]:
        """A large message starts going to disk: its queue id and Received header.

        Its header is made now, not after the final dot, since it is the
        first thing in the file: the time stamp says when the message
        passed :data:`SPILL_THRESHOLD` (sendmail also stamps the start). The
        envelope's ``received_at`` is still the time of acceptance.
        """
        env = self._envelope(tx)
        return env, self._received(tx, env)

    @staticmethod
    def _received(tx: Transaction, env: Envelope) -> bytes:
        return received_header(
            client_name=tx.client_name,
            helo=env.client.helo,
            client_ip=env.client.ip,
            hostname=tx.hostname,
            protocol=protocol_keyword(tx.esmtp, bool(tx.cipher), env.smtputf8),
            queue_id=env.id,
            recipients=[r.address for r in env.recipients],
            when=env.received_at,
            cipher=tx.cipher,
        )

    def _landed_unanswered(self, write: asyncio.Future[list[str]], env: Envelope) -> None:
        if write.cancelled() or write.exception() is not None:
            return
        events.warning("accepted_unanswered", id=env.id, client=env.client.ip, size=env.size)
        self.metrics.messages_received.inc()
        try:
            self.on_accept(env, ())
        except Exception:
            events.error("schedule_failed", exc_info=True, id=env.id)

    def _spool(
        self, env: Envelope, header: bytes, content: bytes, body: BodyWriter | None
    ) -> asyncio.Future[list[str]]:
        """Start the durable write: fsynced, renamed, directory fsynced (that
        fsync shared with concurrent sessions). Shutdown waits for it."""
        self.writes += 1
        self.writes_done.clear()
        try:
            if body is None:
                # header and content written one after the other: no joined copy.
                write = self.spool.put_async(env, content, prefix=header)
            else:
                write = self.spool.put_async(env, content, body=body)
        except BaseException:
            self._written(None)
            raise
        write.add_done_callback(self._written)
        return write

    def _written(self, write: asyncio.Future[list[str]] | None) -> None:
        self.writes -= 1
        if not self.writes:
            self.writes_done.set()

    def _envelope(self, tx: Transaction, queue_id: str | None = None) -> Envelope:
        now = self.clock()
        return Envelope(
            id=queue_id or new_id(),
            mail_from="" if tx.mail_from == "<>" else tx.mail_from,
            recipients=[_recipient(address, tx) for address in tx.recipients],
            client=ClientInfo(
                ip=str(client_address(tx.peer) or tx.peer),
                helo=tx.helo,
                tls=str(tx.cipher[1]) if tx.cipher else "",
            ),
            received_at=now,
            next_attempt=now,
            smtputf8=tx.smtputf8,
            body_8bit=tx.body_8bit,
            requiretls="REQUIRETLS" in tx.mail_parameters,
            ret=tx.mail_parameters.get("RET", ""),
            envid=tx.mail_parameters.get("ENVID", ""),
        )


def _recipient(address: str, tx: Transaction) -> Recipient:
    """A recipient with the DSN parameters its RCPT gave (RFC 3461)."""
    params = tx.rcpt_parameters.get(address, {})
    return Recipient(address, notify=params.get("NOTIFY", ""), orcpt=params.get("ORCPT", ""))
