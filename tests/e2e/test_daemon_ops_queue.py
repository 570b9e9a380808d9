"""``relay queue`` against a running daemon: why mail waits, flush, hold, release, delete.

One ``relay run`` subprocess for the module (text logs), sinks in-process.
The tests run in file order on that daemon: two messages wait on route
Down (nothing listens there), one on route Busy (its sink says 451 once).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from relay.spool import Spool
from tests.support import configs
from tests.support.opsd import cli, send, wait_log
from tests.support.procs import RelayProcess, free_port
from tests.support.sink import Sink
from tests.support.wait import until

pytestmark = pytest.mark.asyncio(loop_scope="module")

SENDER = "s@sender.test"
HOUR = 3600.0


@dataclass
class Daemon:
    proc: RelayProcess
    path: Path
    tmp: Path
    smtp: int
    down_port: int
    busy: Sink
    ids: dict[str, str] = field(default_factory=dict)

    @property
    def spool(self) -> Spool:
        return Spool(self.tmp / "spool")

    def tries(self, qid: str) -> int:
        """Deferrals of ``qid`` in this run's log (a try of a message whose host is
        held down defers without an attempt line, so attempts undercount)."""
        return self.proc.log.count(f"event=deferred id={qid}")

    def audit(self) -> list[dict[str, object]]:
        lines = (self.tmp / "audit.log").read_text().splitlines()
        return [entry for entry in map(json.loads, lines) if entry["event"].startswith("queue_")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Daemon]:
    tmp = tmp_path_factory.mktemp("opsd-queue")
    async with Sink(replies={"RCPT": ["451 4.3.0 busy now"]}) as busy:
        path = tmp / "relay.toml"
        smtp, metrics, down = free_port(), free_port(), free_port()
        routes = configs.route("Down", port=down) + configs.route("Busy", port=busy.port)
        rules = configs.rule("Down", "@down.test") + configs.rule("Busy", "@busy.test")
        text = configs.daemon_toml(
            tmp, smtp, metrics, ["down.test", "busy.test"], routes, rules,
            queue={"min_backoff": "1h", "max_backoff": "10h"},
        )  # fmt: skip
        path.write_text(text)
        proc = RelayProcess(path, cwd=tmp)
        proc.start(wait_for="event=started")
        try:
            yield Daemon(proc, path, tmp, smtp, down, busy)
        finally:
            proc.stop()


async def test_list_says_why_each_message_waits_and_filters(daemon: Daemon) -> None:
    for name in ("q", "r"):
        qid = await send(daemon.smtp, SENDER, [f"{name}@down.test"])
        await wait_log(daemon.proc, f"event=deferred id={qid}")
        daemon.ids[name] = qid
    q = daemon.ids["q"]
    listed = await cli(daemon.proc, daemon.path, "queue", "list")
    assert listed.returncode == 0, listed.stderr
    # The reply, the host tried and the cause, which before were in the log only.
    lines = listed.stdout.splitlines()
    at = next(i for i, x in enumerate(lines) if "last error" in x)
    assert lines[at].split("last error: ")[1] == "451 4.4.1 Next hop unreachable"
    assert lines[at + 1].strip().startswith("at 127.0.0.1 [127.0.0.1]: ")
    assert "Connect call failed" in lines[at + 1] and str(daemon.down_port) in lines[at + 1]

    shown = await cli(daemon.proc, daemon.path, "queue", "list", "--json", "--rcpt", "Q@down.test")
    report = json.loads(shown.stdout)
    assert [m["id"] for m in report["messages"]] == [q]
    [rcpt] = report["messages"][0]["recipients"]
    assert rcpt["route"] == "Down" and rcpt["remote_mta"] == "127.0.0.1 [127.0.0.1]"
    assert rcpt["last_reply"] == "451 4.4.1 Next hop unreachable"
    assert "Connect call failed" in rcpt["last_cause"]
    assert report["messages"][0]["held"] is False

    async def ids(*filters: str) -> set[str]:
        done = await cli(daemon.proc, daemon.path, "queue", "list", "--json", *filters)
        assert done.returncode == 0, done.stderr
        return {m["id"] for m in json.loads(done.stdout)["messages"]}

    both = {q, daemon.ids["r"]}
    assert await ids("--route", "Down") == both
    assert await ids("--route", "Busy") == set()
    assert await ids("--domain", "down.test", "--deferred") == both
    assert await ids("--domain", "busy.test") == set()
    assert await ids("--older-than", "1h") == set()
    assert await ids("--older-than", "0s") == both


async def test_flush_of_one_id_retries_it_now_with_its_backoff_restarted(daemon: Daemon) -> None:
    q, r = daemon.ids["q"], daemon.ids["r"]
    assert daemon.tries(q) == daemon.tries(r) == 1
    done = await cli(daemon.proc, daemon.path, "queue", "flush", q)
    assert done.returncode == 0, done.stderr
    assert "flush: 1 message(s)" in done.stdout and q in done.stdout
    await wait_log(daemon.proc, f"event=deferred id={q}", count=2)
    # Only the one named: r keeps waiting for its hour.
    assert daemon.tries(r) == 1
    # Second attempt, yet the first delay again (1h +-15%), not the doubled 2h +-15%.
    envelope = daemon.spool.load(q)
    assert envelope.attempts == 2
    assert envelope.next_attempt - time.time() < 1.5 * HOUR
    [entry] = daemon.audit()
    assert entry["event"] == "queue_flush" and entry["ids"] == [q]
    assert entry["via"] == "daemon" and entry["selection"] == {"ids": [q]}


async def test_held_message_is_never_tried_survives_restart_and_goes_at_release(
    daemon: Daemon,
) -> None:
    m = await send(daemon.smtp, SENDER, ["m@busy.test"])
    await wait_log(daemon.proc, f"event=deferred id={m}")  # the sink's one 451
    daemon.ids["m"] = m
    held = await cli(daemon.proc, daemon.path, "queue", "hold", m)
    assert held.returncode == 0, held.stderr
    assert "hold: 1 message(s)" in held.stdout
    assert (daemon.spool.hold_dir / f"{m}.msg").exists()
    # Flush everything: the others are tried again, the held one is not.
    r, before = daemon.ids["r"], daemon.tries(daemon.ids["r"])
    assert (await cli(daemon.proc, daemon.path, "queue", "flush")).returncode == 0
    await wait_log(daemon.proc, f"event=deferred id={r}", count=before + 1)
    assert daemon.tries(m) == 1 and daemon.busy.messages == []

    daemon.proc.stop()
    daemon.proc.start(wait_for="event=started")
    listed = await cli(daemon.proc, daemon.path, "queue", "list")
    row = next(x for x in listed.stdout.splitlines() if x.startswith(m))
    assert row.split()[2] == "held"
    assert "1 held" in listed.stdout
    shown = await cli(daemon.proc, daemon.path, "queue", "show", m)
    assert "held:        yes" in shown.stdout and "451 4.3.0 busy now" in shown.stdout
    again = await cli(daemon.proc, daemon.path, "queue", "hold", m)
    assert f"{m}: skipped, on hold" in again.stdout

    released = await cli(daemon.proc, daemon.path, "queue", "release", m)
    assert released.returncode == 0, released.stderr
    # Tried at once, although its retry was an hour away.
    await until(lambda: len(daemon.busy.messages) == 1, what="the released message delivered")
    assert daemon.busy.messages[0].rcpt_tos == ["m@busy.test"]
    events = [(e["event"], e["ids"], e["via"]) for e in daemon.audit()]
    assert ("queue_hold", [m], "daemon") in events
    assert ("queue_release", [m], "daemon") in events
    text = await cli(daemon.proc, daemon.path, "audit")
    assert "queue hold by " in text.stdout and f"ids: {m}" in text.stdout


async def test_delete_by_filter_needs_yes_for_several_and_is_audited(daemon: Daemon) -> None:
    both = {daemon.ids["q"], daemon.ids["r"]}
    refused = await cli(daemon.proc, daemon.path, "queue", "delete", "--domain", "down.test")
    assert refused.returncode == 1
    assert "2 messages match; nothing deleted" in refused.stderr
    assert {e.id for e in daemon.spool.load_all(quarantine=False)} == both
    done = await cli(daemon.proc, daemon.path, "queue", "delete", "--domain", "down.test", "--yes")
    assert done.returncode == 0, done.stderr
    assert "deleted 2 message(s)" in done.stdout
    assert list(daemon.spool.load_all(quarantine=False)) == []
    entry = daemon.audit()[-1]
    assert entry["event"] == "queue_delete" and set(entry["ids"]) == both  # type: ignore[arg-type]
    assert entry["selection"] == {"domain": "down.test"}
