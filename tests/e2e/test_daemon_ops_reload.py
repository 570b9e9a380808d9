"""Operations at the daemon level: SIGHUP / ``relay reload``, the audit log, text logs.

One ``relay run`` subprocess for the module (text logs); sinks in-process.
The tests run in file order on that one daemon: first a refused reload,
then a valid one that adds a route and a rule, removes a route and
changes a port.
"""

from __future__ import annotations

import json
import re
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import pytest_asyncio

from tests.support import configs
from tests.support.inbound import RawClient
from tests.support.opsd import cli, http_get, samples, send, send_on, value, wait_log
from tests.support.procs import RelayProcess, free_port
from tests.support.sink import Sink
from tests.support.wait import until

pytestmark = pytest.mark.asyncio(loop_scope="module")

SENDER = "s@sender.test"


@dataclass
class Daemon:
    proc: RelayProcess
    path: Path
    tmp: Path
    smtp: int
    metrics: int
    sink: Sink
    new_sink: Sink
    spare_port: int
    #: Nothing listens there: mail on route Old is deferred.
    old_port: int
    #: A second SMTP port, added to ``listen`` by a reload.
    smtp2: int
    #: The SMTP ports ``write`` puts in ``listen`` (default: just ``smtp``).
    ports: list[int] = field(default_factory=list)
    #: Route Guarded (to the plain sink) requires TLS.
    guarded_tls: bool = False

    def write(self, *, new: bool = False, spare_port: int | None = None) -> None:
        """Config A (``new=False``) or B: B adds route New, routes old.test to it, removes Old."""
        domains = ["example.com", "old.test", "guarded.test"] + (["new.test"] if new else [])
        routes = (
            configs.route("Sink", port=self.sink.port)
            + configs.route("Guarded", port=self.sink.port, require_tls=self.guarded_tls)
            + configs.route("Spare", port=spare_port or self.spare_port)
            + (
                configs.route("New", port=self.new_sink.port)
                if new
                else configs.route("Old", port=self.old_port)
            )
        )
        rules = (
            configs.rule("Sink", "@example.com")
            + configs.rule("Guarded", "@guarded.test")
            + (
                configs.rule("New", "@new.test", "@old.test")
                if new
                else configs.rule("Old", "@old.test")
            )
        )
        text = configs.daemon_toml(
            self.tmp, self.ports or self.smtp, self.metrics, domains, routes, rules,
            queue={"min_backoff": "1h"}, bounces={"route": "Sink"},
        )  # fmt: skip
        self.path.write_text(text)

    async def reloads(self, result: str) -> float | None:
        _, text = await http_get(self.metrics, "/metrics")
        return value(samples(text), "relay_config_reloads_total", result=result)

    def audit_entries(self) -> list[dict[str, object]]:
        """The configuration entries (not the ``relay queue`` actions, e.g. a flush)."""
        lines = (self.tmp / "audit.log").read_text().splitlines()
        entries = [json.loads(line) for line in lines]
        return [e for e in entries if not str(e["event"]).startswith("queue_")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Daemon]:
    tmp = tmp_path_factory.mktemp("opsd-reload")
    async with Sink() as sink, Sink() as new_sink:
        path = tmp / "relay.toml"
        proc = RelayProcess(path, cwd=tmp)
        ports = [free_port() for _ in range(5)]
        d = Daemon(proc, path, tmp, ports[0], ports[1], sink, new_sink, *ports[2:])
        d.write()
        proc.start(wait_for="event=started")
        try:
            yield d
        finally:
            proc.stop()


async def test_text_log_lines_have_ts_level_event(daemon: Daemon) -> None:
    await send(daemon.smtp, SENDER, ["a@example.com"])
    await wait_log(daemon.proc, "event=delivered")
    lines = daemon.proc.log.splitlines()
    assert lines
    for line in lines:
        assert re.match(r"ts=\S+Z level=(debug|info|warning|error) event=\S+", line), line


async def test_start_is_audited_with_every_route_added(daemon: Daemon) -> None:
    [start] = daemon.audit_entries()
    assert start["event"] == "start" and start["path"] == str(daemon.path)
    assert re.fullmatch(r"[0-9a-f]{64}", str(start["sha256"]))
    assert start["changes"]["routes"]["added"] == ["Sink", "Guarded", "Spare", "Old"]  # type: ignore[index]


async def test_invalid_reload_is_refused_logged_counted_audited(daemon: Daemon) -> None:
    good = daemon.path.read_text()
    daemon.path.write_text(good.replace(f"port = {daemon.spare_port}", "port = 465"))
    # `relay reload` validates first: it lists the problem and signals nobody.
    done = await cli(daemon.proc, daemon.path, "reload")
    assert done.returncode == 2 and "465" in done.stderr, done
    assert "event=reload" not in daemon.proc.log
    # SIGHUP itself (what a config-management tool sends): refused by the daemon.
    daemon.proc.signal(signal.SIGHUP)
    await wait_log(daemon.proc, "event=reload_problem")
    problem = next(line for line in daemon.proc.log.splitlines() if "reload_problem" in line)
    assert "'Spare': port:" in problem and "465" in problem, problem
    assert "level=error event=reload_failed" in daemon.proc.log
    assert await daemon.reloads("error") == 1
    assert await daemon.reloads("success") == 0
    refused = daemon.audit_entries()[-1]
    assert refused["event"] == "reload_refused" and refused["trigger"] == "SIGHUP"
    assert any("Spare" in p and "465" in p for p in refused["problems"])  # type: ignore[union-attr]
    # Still serving on the old config: mail to an old route is delivered.
    delivered = len(daemon.sink.messages)
    await send(daemon.smtp, SENDER, ["b@example.com"])
    await until(lambda: len(daemon.sink.messages) > delivered, what="delivery after refusal")
    daemon.path.write_text(good)


async def test_reload_adds_route_and_rule_open_session_survives(daemon: Daemon) -> None:
    # Before: new.test is not served.
    client = await RawClient.connect(daemon.smtp)
    try:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        await client.cmd(f"MAIL FROM:<{SENDER}>")
        code, text = await client.cmd("RCPT TO:<x@new.test>")
        assert code == 550 and "5.7.1" in text, text
        await client.cmd("RSET")
        # Queued on route Old, whose host refuses: deferred for an hour.
        old_qid = await send_on(client, SENDER, ["y@old.test"])
        await wait_log(daemon.proc, f"event=deferred id={old_qid}")

        new_spare = free_port()
        daemon.ports = [daemon.smtp, daemon.smtp2]
        daemon.write(new=True, spare_port=new_spare)
        done = await cli(daemon.proc, daemon.path, "reload")
        assert done.returncode == 0, done.stderr
        await wait_log(daemon.proc, "reason=reload")
        assert await daemon.reloads("success") == 1
        assert await daemon.reloads("error") == 1
        # `listen` changed: the new address is bound, the old one stays.
        await wait_log(daemon.proc, f"event=listen_changed added=127.0.0.1:{daemon.smtp2}")
        async with await RawClient.connect(daemon.smtp2) as other:
            assert (await other.cmd("EHLO client.test"))[0] == 250

        # The session opened before the reload carries on, under the new rules.
        qid = await send_on(client, SENDER, ["x@new.test"])
        assert (await client.cmd("QUIT"))[0] == 221
    finally:
        await client.close()
    await until(lambda: len(daemon.new_sink.messages) == 1, what="delivery on route New")
    assert daemon.new_sink.messages[0].rcpt_tos == ["x@new.test"]
    await wait_log(daemon.proc, f"event=delivered id={qid}")
    attempt = next(line for line in daemon.proc.log.splitlines() if f"attempt id={qid}" in line)
    assert "route=New" in attempt
    # Mail queued before the reload takes the new rules at its next attempt.
    assert (await cli(daemon.proc, daemon.path, "queue", "flush")).returncode == 0
    await wait_log(daemon.proc, f"event=delivered id={old_qid}")
    assert [m.rcpt_tos for m in daemon.new_sink.messages] == [["x@new.test"], ["y@old.test"]]

    reload = daemon.audit_entries()[-1]
    assert reload["event"] == "reload"
    changes = reload["changes"]
    assert changes["routes"]["added"] == ["New"]  # type: ignore[index]
    assert changes["routes"]["removed"] == ["Old"]  # type: ignore[index]
    assert changes["routes"]["changed"] == {  # type: ignore[index]
        "Spare": {"port": [daemon.spare_port, new_spare]}
    }
    assert changes["server"]["listen"] == [  # type: ignore[index]
        [f"127.0.0.1:{daemon.smtp}"],
        [f"127.0.0.1:{daemon.smtp}", f"127.0.0.1:{daemon.smtp2}"],
    ]

    shown = await cli(daemon.proc, daemon.path, "audit")
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout
    assert 'route "New": added' in out
    assert 'route "Old": removed' in out
    assert f'route "Spare": changed port: {daemon.spare_port} → {new_spare}' in out
    assert "rules[3]: changed recipients: [@old.test] → [@new.test, @old.test]" in out
    assert "rules[3]: changed route: Old → New" in out
    assert "server: changed domains:" in out
    assert "reload refused by SIGHUP" in out and "465" in out
    assert re.search(r"reload sha256 \S+→\S+ by SIGHUP", out), out
    daemon.spare_port = new_spare


async def test_reload_removing_a_listener_keeps_its_open_sessions(daemon: Daemon) -> None:
    client = await RawClient.connect(daemon.smtp)
    try:
        assert (await client.cmd("EHLO client.test"))[0] == 250
        daemon.ports = [daemon.smtp2]
        daemon.write(new=True)
        daemon.proc.signal(signal.SIGHUP)
        await wait_log(daemon.proc, f"event=listen_changed added=- removed=127.0.0.1:{daemon.smtp}")
        with pytest.raises(ConnectionRefusedError):
            await RawClient.connect(daemon.smtp)
        # The session the removed listener accepted is still served.
        qid = await send_on(client, SENDER, ["z@new.test"])
        assert (await client.cmd("QUIT"))[0] == 221
    finally:
        await client.close()
    await wait_log(daemon.proc, f"event=delivered id={qid}")
    await send(daemon.smtp2, SENDER, ["w@new.test"])
    await until(lambda: len(daemon.new_sink.messages) == 4, what="delivery via the new listener")


async def test_reload_to_an_address_in_use_is_refused_listeners_unchanged(daemon: Daemon) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        daemon.ports = [daemon.smtp2, taken]
        daemon.write(new=True)
        daemon.proc.signal(signal.SIGHUP)
        await wait_log(daemon.proc, "server: listen: cannot listen")
    assert await daemon.reloads("error") == 2
    refused = daemon.audit_entries()[-1]
    assert refused["event"] == "reload_refused"
    assert "cannot listen" in str(refused["problems"])
    async with await RawClient.connect(daemon.smtp2) as client:
        assert (await client.cmd("EHLO client.test"))[0] == 250
    daemon.ports = [daemon.smtp2]
    daemon.write(new=True)


async def test_reload_changes_tls_policy_for_the_next_attempt(daemon: Daemon) -> None:
    before = await send(daemon.smtp2, SENDER, ["g1@guarded.test"])
    await wait_log(daemon.proc, f"event=delivered id={before}")
    daemon.guarded_tls = True
    daemon.write(new=True)
    done = await cli(daemon.proc, daemon.path, "reload")
    assert done.returncode == 0, done.stderr
    await until(
        lambda: (
            daemon.audit_entries()[-1].get("changes", {}).get("routes", {}).get("changed")
            == {"Guarded": {"require_tls": [False, True]}}
        ),
        what="the reload audited",
    )
    # The same host, plaintext only: now it fails the route's TLS policy.
    after = await send(daemon.smtp2, SENDER, ["g2@guarded.test"])
    await wait_log(daemon.proc, f"event=bounced id={after}")
    attempt = next(line for line in daemon.proc.log.splitlines() if f"attempt id={after}" in line)
    assert "route=Guarded" in attempt and "result=tls_failed" in attempt, attempt
    await until(
        lambda: any(m.rcpt_tos == [SENDER] for m in daemon.sink.messages), what="the DSN on Sink"
    )
