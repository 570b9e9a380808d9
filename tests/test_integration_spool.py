"""The spool read while the scheduler works on it (``relay queue list`` next to
a running daemon, or a test polling the spool): a message delivered and deleted
between the directory listing and the read is simply gone, never an error."""

from __future__ import annotations

from relay.envelope import Envelope, Recipient
from relay.spool import Spool
from relay.spoolfiles import new_id


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
