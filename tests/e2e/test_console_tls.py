"""The console over HTTPS (``[admin] tls_cert/tls_key``): the session cookie is Secure.

And a reload cannot move the console: ``[admin] listen`` needs a restart;
the console shows each route host's health, from the daemon's host health.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path

import aiohttp
import pytest

from relay import keeper
from relay.config import Listen
from tests.support import configs
from tests.support.console import PASSWORD, USER, console_config, login
from tests.support.hosts import closed_port
from tests.support.ops import load_text
from tests.support.opsd import send
from tests.support.pki import Pki
from tests.support.procs import RelayProcess, free_port
from tests.support.sink import Sink


async def test_over_tls_the_session_cookie_is_secure(tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    files = pki.issue("127.0.0.1", stem="admin")
    smtp, admin = free_port(), free_port()
    text = console_config(tmp_path, smtp, free_port(), admin, free_port()).replace(
        "[[admin.users]]", f'tls_cert = "{files.cert}"\ntls_key = "{files.key}"\n[[admin.users]]', 1
    )
    path = tmp_path / "relay.toml"
    path.write_text(text)
    trust = ssl.create_default_context(cafile=str(pki.ca_file))
    base = f"https://127.0.0.1:{admin}"
    proc = RelayProcess(path, cwd=tmp_path)
    proc.start(wait_for="event=started")
    try:
        assert "url=https://127.0.0.1" in proc.log
        jar = aiohttp.CookieJar(unsafe=True)
        async with aiohttp.ClientSession(
            cookie_jar=jar, connector=aiohttp.TCPConnector(ssl=trust)
        ) as client:
            async with client.get(f"{base}/login") as page:
                html = await page.text()
            token = html.split('name="login_token" value="')[1].split('"')[0]
            form = {"login_token": token, "name": USER, "password": PASSWORD}
            async with client.post(f"{base}/login", data=form, allow_redirects=False) as r:
                assert r.status == 303
                cookies = [v for k, v in r.headers.items() if k == "Set-Cookie"]
            session = next(c for c in cookies if c.startswith("relay_session="))
            assert "Secure" in session and "HttpOnly" in session
            async with client.get(f"{base}/api/routes") as r:
                assert r.status == 200
    finally:
        proc.stop()


def test_a_reload_cannot_move_the_console(tmp_path: Path) -> None:
    base = '[server]\nhostname = "relay.test"\ndomains = ["example.com"]\n'
    old = load_text(tmp_path, base, "old.toml")
    new = load_text(
        tmp_path,
        base + '[admin]\nlisten = "127.0.0.1:8025"\n[[admin.users]]\nname = "a"\n'
        f'password_hash = "{_hash()}"\n',
        "new.toml",
    )
    assert new.admin.listen == Listen("127.0.0.1", 8025)
    assert [(p.where, p.field) for p in keeper.restart_problems(old, new)] == [("admin", "listen")]


def _hash() -> str:
    from relay.passwords import hash_password

    return hash_password("long enough")


# The admin console shows each route host's health, from the daemon's host health.


async def _get(client: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with client.get(url) as response:
        assert response.status == 200
        data: dict[str, object] = await response.json()
        return data


@pytest.mark.asyncio
async def test_a_host_that_refuses_connections_shows_down_on_routes_and_status(tmp_path):
    sink = await Sink().start()
    smtp, admin = free_port(), free_port()
    path = tmp_path / "relay.toml"
    text = console_config(tmp_path, smtp, free_port(), admin, sink.port)
    dead = closed_port()
    path.write_text(text + configs.route("Dead", port=dead) + configs.rule("Dead", "@new.test"))
    proc = RelayProcess(path)
    proc.start(wait_for="event=started")
    base = f"http://127.0.0.1:{admin}"
    client, _ = await login(base)
    try:
        routes = await _get(client, f"{base}/api/routes")
        [fresh] = [r for r in routes["routes"] if r["name"] == "Dead"]  # type: ignore[index, union-attr]
        assert fresh["primary"][0]["health"]["state"] == "up"
        await send(smtp, "s@sender.test", ["x@new.test"])

        for _ in range(200):  # the first attempt fails at once: connection refused
            data = await _get(client, f"{base}/api/routes")
            [route] = [r for r in data["routes"] if r["name"] == "Dead"]  # type: ignore[index, union-attr]
            if route["primary"][0]["health"]["state"] == "down":
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the routes API never showed the refusing host down")
        status = await _get(client, f"{base}/api/status")
        [row] = [h for h in status["hosts"] if h["route"] == "Dead"]  # type: ignore[index, union-attr]
        assert row["health"]["state"] == "down"
        assert row["health"]["last_error"]
        async with client.get(f"{base}/routes") as page:
            html = await page.text()
        assert "health: down since" in html
        async with client.get(f"{base}/status") as page:
            assert "down since" in await page.text()
    finally:
        await client.close()
        proc.stop()
        await sink.stop()
