"""The spool keeps what it cannot read, body and all, and updates only live messages."""

from __future__ import annotations

from relay.spool import Spool
from tests.support.queue import legacy_message, open_spool, spool_message
from tests.support.spool import body_path, update_envelope


def test_unreadable_envelope_is_set_aside_with_its_body_and_survives_a_restart(tmp_path) -> None:
    spool = open_spool(tmp_path)
    good = spool_message(spool, ["bob@example.com"])
    bad = spool_message(spool, ["carol@example.com"])
    (spool.msg_dir / f"{bad.id}.state").write_bytes(b"{written by a newer relay")
    assert [e.id for e in spool.load_all()] == [good.id]
    assert sorted(p.name for p in spool.corrupt_dir.iterdir()) == [
        f"{bad.id}.msg",
        f"{bad.id}.state",
    ]
    assert spool.quarantine.ids() == [bad.id]
    Spool(spool.path, fsync=False).open()  # the next start
    assert b"\nFrom: Alice" in (spool.corrupt_dir / f"{bad.id}.msg").read_bytes()
    assert sorted(p.name for p in spool.msg_dir.iterdir()) == [f"{good.id}.msg"]


def test_start_keeps_the_body_of_an_envelope_set_aside_by_an_older_relay(tmp_path) -> None:
    spool = open_spool(tmp_path)
    bad = legacy_message(spool, ["carol@example.com"])
    meta = spool.msg_dir / f"{bad.id}.json"
    meta.rename(meta.with_suffix(".corrupt"))  # what relay did before corrupt/
    Spool(spool.path, fsync=False).open()
    assert spool.quarantine.ids() == [bad.id]
    assert (spool.corrupt_dir / f"{bad.id}.eml").exists()
    assert (spool.corrupt_dir / f"{bad.id}.json").exists()


def test_read_only_listing_moves_nothing(tmp_path) -> None:
    spool = open_spool(tmp_path)
    bad = spool_message(spool, ["carol@example.com"])
    (spool.msg_dir / f"{bad.id}.state").write_bytes(b"garbage")
    unreadable: list[str] = []
    assert list(spool.load_all(quarantine=False, unreadable=unreadable)) == []
    assert unreadable == [bad.id]
    assert (spool.msg_dir / f"{bad.id}.state").exists()
    assert not spool.corrupt_dir.exists()


def test_update_of_a_deleted_message_writes_nothing(tmp_path) -> None:
    spool = open_spool(tmp_path)
    env = spool_message(spool, ["bob@example.com"])
    assert update_envelope(spool, env) is True
    assert spool.delete(env.id)
    assert update_envelope(spool, env) is False
    assert list(spool.msg_dir.iterdir()) == []
    # Nor when only the body went (a delete interrupted half-way).
    env2 = spool_message(spool, ["bob@example.com"])
    body_path(spool, env2.id).unlink()
    assert update_envelope(spool, env2) is False
