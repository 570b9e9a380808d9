"""Helpers for the admin console tests: a relay config with ``[admin]``, and a logged-in client."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from relay.passwords import hash_password
from tests.support import configs

USER = "ops"
PASSWORD = "correct horse battery"
_HASH = hash_password(PASSWORD)


def console_config(tmp: Path, smtp: int, metrics: int, admin: int, sink_port: int) -> str:
    """A relay config with the console on ``admin`` and one route Sink; comments to keep."""
    routes = "# Where example.com goes (kept by the console).\n" + configs.route(
        "Sink", port=sink_port
    )
    text = configs.daemon_toml(
        tmp, smtp, metrics, ["example.com", "new.test"],
        routes, configs.rule("Sink", "@example.com"),
        queue={"min_backoff": "1h"}, delivery={"connect_timeout": "3s"},
        admin={"listen": f"127.0.0.1:{admin}", "users": [{"name": USER, "password_hash": _HASH}]},
    )  # fmt: skip
    return "# The console test's relay. This comment must survive a save.\n" + text


async def login(base: str, password: str = PASSWORD) -> tuple[aiohttp.ClientSession, str]:
    """A client session logged in as USER, and its CSRF token."""
    # unsafe=True: keep cookies from an IP-address host (127.0.0.1).
    client = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
    try:
        async with client.get(f"{base}/login") as page:
            html = await page.text()
        token = html.split('name="login_token" value="')[1].split('"')[0]
        form = {"login_token": token, "name": USER, "password": password}
        async with client.post(f"{base}/login", data=form, allow_redirects=False) as response:
            assert response.status == 303, f"{response.status} {await response.text()}"
        async with client.get(f"{base}/api/session") as response:
            csrf = (await response.json())["csrf"]
    except BaseException:
        await client.close()
        raise
    return client, csrf
