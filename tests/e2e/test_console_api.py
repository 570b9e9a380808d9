"""The admin console's JSON API through a real HTTP client against a running ``relay run``.

One daemon for the module; the tests run in file order: security first,
then validation, a save that changes where the next message goes, the
audit entry, queue actions, and last the rate limit and the allow-list
(which lock this client out).
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from tests.support.console import PASSWORD, USER, console_config, login
from tests.support.opsd import send, wait_log
from tests.support.procs import RelayProcess, free_port
from tests.support.sink import Sink
from tests.support.wait import until

pytestmark = pytest.mark.asyncio(loop_scope="module")


@dataclass
class Console:
    proc: RelayProcess
    path: Path
    tmp: Path
    base: str
    smtp: int
    sink: Sink
    a: Sink
    b: Sink
    client: aiohttp.ClientSession
    csrf: str


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def console(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Console]:
    tmp = tmp_path_factory.mktemp("console")
    sink, a, b = await Sink().start(), await Sink().start(), await Sink().start()
    smtp, admin = free_port(), free_port()
    path = tmp / "relay.toml"
    path.write_text(console_config(tmp, smtp, free_port(), admin, sink.port))
    proc = RelayProcess(path)
    proc.start(wait_for="event=started")
    base = f"http://127.0.0.1:{admin}"
    client, csrf = await login(base)
    try:
        yield Console(proc, path, tmp, base, smtp, sink, a, b, client, csrf)
    finally:
        await client.close()
        proc.stop()
        for s in (sink, a, b):
            await s.stop()


def _route(
    c: Console, primary_loads: tuple[int, int], port2: int | None = None
) -> dict[str, object]:
    return {
        "name": "Split",
        "single": False,
        "primary": [
            {"host": "127.0.0.1", "port": c.a.port, "load": primary_loads[0]},
            {"host": "127.0.0.1", "port": port2 or c.b.port, "load": primary_loads[1]},
        ],
        "secondary": [],
        "require_tls": False,
        "require_ca_signed": False,
        "validate_hostname": False,
    }


async def test_every_page_and_api_call_needs_a_login(console: Console) -> None:
    async with aiohttp.ClientSession() as anonymous:
        for path in ("/api/routes", "/api/queue", "/api/audit", "/api/status", "/api/session"):
            async with anonymous.get(console.base + path) as response:
                assert response.status == 401, path
        for path in ("/routes", "/routes/new", "/rules", "/queue", "/audit", "/status"):
            async with anonymous.get(console.base + path, allow_redirects=False) as response:
                assert response.status == 303 and response.headers["Location"] == "/login"
        async with anonymous.post(console.base + "/api/routes", json={}) as response:
            assert response.status == 401


async def test_session_cookie_and_security_headers(console: Console) -> None:
    client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    async with client:
        async with client.get(console.base + "/login") as page:
            html = await page.text()
            csp = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'self'" in csp
        assert "frame-ancestors 'none'" in csp
        token = html.split('name="login_token" value="')[1].split('"')[0]
        form = {"login_token": token, "name": USER, "password": PASSWORD}
        async with client.post(console.base + "/login", data=form, allow_redirects=False) as r:
            cookie = next(
                v for k, v in r.headers.items() if k == "Set-Cookie" and "relay_session" in v
            )
        assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
        # Plain HTTP: a Secure cookie would never come back.
        assert "Secure" not in cookie


async def test_a_change_without_the_csrf_token_is_refused_and_changes_nothing(
    console: Console,
) -> None:
    before = console.path.read_bytes()
    for headers in ({}, {"X-CSRF-Token": "wrong"}):
        async with console.client.post(
            console.base + "/api/routes", json=_route(console, (70, 30)), headers=headers
        ) as response:
            assert response.status == 403
    async with console.client.put(console.base + "/api/rules", json={"rules": []}) as response:
        assert response.status == 403
    assert console.path.read_bytes() == before


async def test_validation_problems_come_back_per_field(console: Console) -> None:
    headers = {"X-CSRF-Token": console.csrf}
    before = console.path.read_bytes()
    async with console.client.post(
        console.base + "/api/routes", json=_route(console, (70, 20), port2=465), headers=headers
    ) as response:
        assert response.status == 422
        problems = (await response.json())["problems"]
    assert "loads must add up to 100, got 70 + 20 = 90" in problems["fields"]["primary"][0]
    assert "465" in problems["fields"]["primary[2].port"][0]
    # The same validator without saving: /api/routes/validate.
    async with console.client.post(
        console.base + "/api/routes/validate", json=_route(console, (70, 30)), headers=headers
    ) as response:
        assert (await response.json()) == {"ok": True, "problems": {"fields": {}, "other": []}}
    assert console.path.read_bytes() == before


async def test_a_saved_route_changes_where_the_next_message_goes(console: Console) -> None:
    headers = {"X-CSRF-Token": console.csrf}
    async with console.client.post(
        console.base + "/api/routes", json=_route(console, (70, 30)), headers=headers
    ) as response:
        assert response.status == 200, await response.text()
        saved = await response.json()
    assert saved["saved"] and saved["applied"]
    assert saved["changes"]["routes"]["added"] == ["Split"]
    rules = [
        {"recipients": ["@example.com"], "route": "Sink"},
        {"recipients": ["@new.test"], "route": "Split"},
    ]
    async with console.client.put(
        console.base + "/api/rules", json={"rules": rules}, headers=headers
    ) as response:
        assert response.status == 200 and (await response.json())["applied"]
    text = console.path.read_text()
    assert "This comment must survive a save." in text
    assert "# Where example.com goes (kept by the console)." in text
    await send(console.smtp, "s@sender.test", ["x@new.test"])
    await until(lambda: len(console.a.messages) + len(console.b.messages) == 1, what="delivery")
    assert console.sink.messages == []
    async with console.client.get(console.base + "/api/routes") as response:
        routes = {r["name"]: r for r in (await response.json())["routes"]}
    assert [h["load"] for h in routes["Split"]["primary"]] == [70, 30]
    assert routes["Split"]["rules"] == [{"index": 2, "recipients": ["@new.test"]}]


async def test_the_audit_entry_names_the_user_and_address(console: Console) -> None:
    entries = [json.loads(line) for line in (console.tmp / "audit.log").read_text().splitlines()]
    saves = [e for e in entries if e["event"] == "console_route_save"]
    assert saves and saves[-1]["user"] == USER and saves[-1]["client"] == "127.0.0.1"
    assert saves[-1]["changes"]["routes"]["added"] == ["Split"]
    reloads = [e for e in entries if e["event"] == "reload"]
    assert reloads and all(e["trigger"] == "console" for e in reloads)
    async with console.client.get(console.base + "/api/audit") as response:
        newest = (await response.json())["entries"][0]
    assert newest["entry"]["event"] == "console_rules_save"
    assert "by ops from 127.0.0.1" in newest["lines"][0]


async def test_queue_hold_release_and_delete_need_confirmation(console: Console) -> None:
    headers = {"X-CSRF-Token": console.csrf}
    # Nothing listens on route Sink's hosts after the sink stops: the message waits.
    await console.sink.stop()
    qid = await send(console.smtp, "s@sender.test", ["y@example.com"])
    await wait_log(console.proc, "deferred")
    async with console.client.get(console.base + "/api/queue?deferred=1") as response:
        listed = await response.json()
    assert [m["id"] for m in listed["messages"]] == [qid]
    async with console.client.post(
        console.base + "/api/queue/hold", json={"ids": [qid]}, headers=headers
    ) as response:
        assert (await response.json())["done"] == [qid]
    async with console.client.post(
        console.base + "/api/queue/delete", json={"ids": [qid]}, headers=headers
    ) as response:
        assert response.status == 400
    async with console.client.post(
        console.base + "/api/queue/delete", json={"ids": [qid], "confirm": True}, headers=headers
    ) as response:
        assert (await response.json())["done"] == [qid]
    # Ids become file names: anything but a queue id is refused.
    for bad in ("..%2F..%2Frelay.toml", "x.y"):
        async with console.client.get(f"{console.base}/api/queue/{bad}") as response:
            assert response.status == 404
    async with console.client.post(
        console.base + "/api/queue/hold", json={"ids": ["../x"]}, headers=headers
    ) as response:
        assert response.status == 400
    last = json.loads((console.tmp / "audit.log").read_text().splitlines()[-1])
    assert last["event"] == "queue_delete" and last["user"] == USER
    assert last["client"] == "127.0.0.1"


async def test_status_and_pages_render(console: Console) -> None:
    async with console.client.get(console.base + "/api/status") as response:
        status = await response.json()
    assert status["version"] and status["messages_received"] >= 1
    for path in (
        "/routes",
        "/routes/new",
        "/routes/edit/Split",
        "/rules",
        "/queue",
        "/audit",
        "/status",
    ):
        async with console.client.get(console.base + path) as response:
            assert response.status == 200, path
            assert '<script src="/static/console.js"' in await response.text()


async def test_read_only_when_the_config_file_is_not_writable(console: Console) -> None:
    """An immutable file (chattr +i) stands in for a ConfigMap: even root cannot write it."""
    made = await asyncio.to_thread(
        subprocess.run, ["chattr", "+i", str(console.path)], capture_output=True, check=False
    )
    if made.returncode != 0:
        pytest.skip(f"this file system cannot make a file immutable: {made.stderr!r}")
    try:
        async with console.client.get(console.base + "/api/session") as response:
            assert "not writable" in (await response.json())["read_only"]
        async with console.client.get(console.base + "/routes/new") as response:
            html = await response.text()
        assert 'id="read-only"' in html and "<fieldset disabled>" in html
        async with console.client.put(
            console.base + "/api/rules", json={"rules": []}, headers={"X-CSRF-Token": console.csrf}
        ) as response:
            assert response.status == 409
    finally:
        await asyncio.to_thread(subprocess.run, ["chattr", "-i", str(console.path)], check=True)
    async with console.client.get(console.base + "/api/session") as response:
        assert (await response.json())["read_only"] is None


async def test_login_attempts_are_rate_limited_per_address(console: Console) -> None:
    for _ in range(5):
        client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        async with client:
            async with client.get(console.base + "/login") as page:
                token = (await page.text()).split('name="login_token" value="')[1].split('"')[0]
            form = {"login_token": token, "name": USER, "password": "wrong"}
            async with client.post(console.base + "/login", data=form) as response:
                assert response.status == 401
    with pytest.raises(AssertionError, match="429|too many"):
        await login(console.base)


async def test_an_address_outside_allow_is_refused(console: Console) -> None:
    text = console.path.read_text().replace(
        "[[admin.users]]", 'allow = ["127.0.0.2/32"]\n[[admin.users]]', 1
    )
    console.path.write_text(text)
    assert console.proc.proc is not None
    console.proc.proc.send_signal(signal.SIGHUP)
    await wait_log(console.proc, "reason=reload", count=3)
    async with console.client.get(console.base + "/api/routes") as response:
        assert response.status == 403
    async with aiohttp.ClientSession() as anonymous, anonymous.get(console.base + "/login") as r:
        assert r.status == 403
