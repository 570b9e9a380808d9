"""Test helpers that look into a spool as only tests need to (the daemon never does)."""

from __future__ import annotations

import sys
from pathlib import Path

from relay.envelope import Envelope
from relay.spool import Spool
from relay.spoolfiles import message_paths


def body_path(spool: Spool, queue_id: str) -> Path:
    """The file holding a message's bytes (after the envelope line in a ``.msg``)."""
    return message_paths(spool.msg_dir, queue_id)[0]


def read_body(spool: Spool, queue_id: str) -> bytes:
    """A message's whole body as bytes (after a ``.msg``'s envelope line)."""
    body = spool.open_body(queue_id, sys.maxsize)
    assert isinstance(body, bytes)  # no file is over sys.maxsize bytes
    return body


def update_envelope(spool: Spool, envelope: Envelope) -> bool:
    """Write a changed envelope durably, blocking; False when the message is gone."""
    return spool.update_many([envelope]) == [envelope.id]
