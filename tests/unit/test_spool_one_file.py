"""One file per message at accept time: the envelope is the body file's first line.

Writing the body and the envelope as two fsynced files was most of
the spool's work per message. A message accepted in memory is now one file,
``msg/<id>.msg``, starting with ``#relay-envelope {json}``; a ``.state``
appears when its state changes (and wins); older spools (``.eml`` and
``.json``) still load, and an older relay neither reads nor deletes the new
files (a rollback leaves them waiting).
"""

from __future__ import annotations

import dataclasses

import pytest

from relay.envelope import Envelope, RcptState, Recipient
from relay.spool import Spool
from relay.spoolbody import BodyFile
from relay.spoolfiles import ENVELOPE_LINE, new_id
from tests.support.queue import (
    BODY,
    harness,
    legacy_message,
    open_spool,
    running,
    settle,
    spool_message,
)
from tests.support.spool import body_path, read_body, update_envelope


def test_a_message_is_one_file_with_its_envelope_first(tmp_path) -> None:
    spool = open_spool(tmp_path)
    env = spool_message(spool, ["bob@example.com", "carol@example.com"])
    assert [p.name for p in spool.msg_dir.iterdir()] == [f"{env.id}.msg"]
    raw = body_path(spool, env.id).read_bytes()
    assert raw.startswith(ENVELOPE_LINE) and raw.endswith(BODY)
    assert raw.count(b"\n", 0, len(raw) - len(BODY)) == 1  # the envelope is one line
    assert spool.load(env.id) == dataclasses.replace(env, size=len(BODY))
    assert read_body(spool, env.id) == BODY
    assert spool.open_body(env.id, 1 << 20) == BODY


def test_a_large_body_read_as_a_file_starts_after_the_envelope(tmp_path) -> None:
    spool = open_spool(tmp_path)
    env = spool_message(spool, ["bob@example.com"])
    with spool.open_body(env.id, 10) as body:
        assert isinstance(body, BodyFile)
        assert body.size == len(BODY)
        assert body.read(0, len(BODY) + 100) == BODY
        assert body.read(5, 7) == BODY[5:12]


def test_a_state_change_writes_the_json_which_wins(tmp_path) -> None:
    spool = open_spool(tmp_path)
    env = spool_message(spool, ["bob@example.com", "carol@example.com"])
    env.recipients[0].state = RcptState.DELIVERED
    assert update_envelope(spool, env)
    assert sorted(p.suffix for p in spool.msg_dir.iterdir()) == [".msg", ".state"]
    assert spool.load(env.id).recipients[0].state == RcptState.DELIVERED
    assert [e.recipients[0].state for e in spool.load_all()] == [RcptState.DELIVERED]
    assert read_body(spool, env.id) == BODY
    assert spool.delete(env.id)
    assert list(spool.msg_dir.iterdir()) == []
    with pytest.raises(KeyError):
        spool.load(env.id)
    assert not spool.delete(env.id)


def test_a_restart_keeps_one_file_messages_and_drops_bodies_without_envelopes(tmp_path) -> None:
    spool = open_spool(tmp_path)
    kept = spool_message(spool, ["bob@example.com"])
    orphan = body_path(spool, "ORPHAN")
    orphan.write_bytes(BODY)  # renamed into place, envelope never followed
    Spool(spool.path, fsync=False).open()
    assert [p.name for p in spool.msg_dir.iterdir()] == [f"{kept.id}.msg"]
    assert [e.id for e in spool.load_all()] == [kept.id]


async def test_a_delete_cut_short_leaves_nothing_that_is_delivered_again(tmp_path) -> None:
    # The body goes first: a crash between the two unlinks leaves a .json
    # without a body, never a body that still carries its first envelope.
    h = harness(tmp_path)
    env = spool_message(h.spool, ["bob@example.com", "carol@example.com"])
    env.recipients[0].state = RcptState.DELIVERED
    assert update_envelope(h.spool, env)
    body_path(h.spool, env.id).unlink()  # the first half of a delete
    assert update_envelope(h.spool, env) is False
    async with running(h.scheduler):
        for stored in h.spool.load_all():
            h.scheduler.add(stored)
        await settle(h.scheduler)
    assert h.deliverer.calls == []
    Spool(h.spool.path, fsync=False).open()  # the next start removes the rest
    assert list(h.spool.msg_dir.iterdir()) == []


def test_an_unreadable_envelope_line_is_quarantined_with_the_body(tmp_path) -> None:
    spool = open_spool(tmp_path)
    good = spool_message(spool, ["bob@example.com"])
    bad = spool_message(spool, ["carol@example.com"])
    path = body_path(spool, bad.id)
    path.write_bytes(ENVELOPE_LINE + b'{"id": trunc\n' + BODY)
    unreadable: list[str] = []
    assert [e.id for e in spool.load_all(unreadable=unreadable)] == [good.id]
    assert unreadable == [bad.id]
    assert (spool.corrupt_dir / f"{bad.id}.msg").read_bytes().endswith(BODY)
    Spool(spool.path, fsync=False).open()  # a restart deletes nothing of it
    assert spool.quarantine.ids() == [bad.id]


def test_a_spool_written_by_an_older_relay_still_loads_and_reads(tmp_path) -> None:
    spool = open_spool(tmp_path)
    old = legacy_message(spool, ["bob@example.com"])
    new = spool_message(spool, ["carol@example.com"])
    Spool(spool.path, fsync=False).open()
    assert sorted(e.id for e in spool.load_all()) == sorted([old.id, new.id])
    assert read_body(spool, old.id) == BODY == read_body(spool, new.id)
    assert spool.open_body(old.id, 1 << 20) == BODY
    assert spool.delete(old.id) and spool.delete(new.id)
    assert list(spool.msg_dir.iterdir()) == []


def test_an_older_relay_neither_reads_nor_deletes_one_file_messages(tmp_path) -> None:
    # Before one-file messages, relay loaded msg/*.json and removed every
    # msg/*.eml without a .json as debris at start-up: a rollback must find
    # neither among the new files (they wait for the newer relay).
    spool = open_spool(tmp_path)
    env = spool_message(spool, ["bob@example.com", "carol@example.com"])
    env.recipients[0].state = RcptState.DELIVERED
    assert update_envelope(spool, env)
    spool_message(spool, ["dave@example.com"])
    assert not list(spool.msg_dir.glob("*.eml")) and not list(spool.msg_dir.glob("*.json"))


def test_a_state_left_by_a_delete_cut_short_is_removed_at_start_up(tmp_path) -> None:
    spool = open_spool(tmp_path)
    env = spool_message(spool, ["bob@example.com", "carol@example.com"])
    env.recipients[0].state = RcptState.DELIVERED
    assert update_envelope(spool, env)
    (spool.msg_dir / f"{env.id}.msg").unlink()  # the first half of a delete
    assert list(spool.load_all()) == []
    Spool(spool.path, fsync=False).open()
    assert list(spool.msg_dir.iterdir()) == []


# The spool read while the scheduler works on it (``relay queue list`` next to
# a running daemon, or a test polling the spool): a message delivered and deleted
# between the directory listing and the read is simply gone, never an error.


def _put(spool: Spool, address: str) -> Envelope:
    envelope = Envelope(id=new_id(), mail_from="a@sender.test", recipients=[Recipient(address)])
    spool.put(envelope, b"Subject: x\r\n\r\nhi\r\n")
    return envelope


def test_message_deleted_during_load_all_is_skipped(tmp_path):
    spool = Spool(tmp_path / "spool", fsync=False)
    spool.open()
    first, second = _put(spool, "one@corp.test"), _put(spool, "two@corp.test")
    listing = spool.load_all()
    assert next(listing).id == first.id  # the directory has been listed by now
    spool.delete(second.id)  # the scheduler finished it meanwhile
    assert list(listing) == []
    # Nothing was set aside as corrupt.
    assert list(spool.msg_dir.glob("*.corrupt")) == []
    assert [e.id for e in spool.load_all()] == [first.id]
