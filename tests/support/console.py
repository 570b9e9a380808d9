"""Helpers for the admin console tests: a relay config with ``[admin]``, and a logged-in client."""

from __future__ import annotations

from pathlib import Path

import aiohttp

from relay.passwords import hash_password
from tests.support import configs

USER = "ops"
PASSWORD = "correct horse battery"
_HASH = hash_password(PASSWORD)


def console_config(
    tmp: Path, smtp: int, metrics: int, admin: int, sink_port: int, *, allow: str = ""
) -> str:
    """A relay config with the console on ``admin`` and one route Sink; comments to keep."""
    allow_line = f"allow = [{allow}]\n" if allow else ""
    return (
        "# The console test's relay. This comment must survive a save.\n"
        f'[server]\nhostname = "relay.test"\nlisten = ["127.0.0.1:{smtp}"]\n'
        'domains = ["example.com", "new.test"]\n\n'
        f'[queue]\npath = "{tmp / "spool"}"\nmin_backoff = "1h"\n\n'
        f'[metrics]\nlisten = "127.0.0.1:{metrics}"\n\n'
        f'[audit]\npath = "{tmp / "audit.log"}"\n\n'
        f'[delivery]\nconnect_timeout = "3s"\n\n'
        f'[admin]\nlisten = "127.0.0.1:{admin}"\n{allow_line}'
        f'[[admin.users]]\nname = "{USER}"\npassword_hash = "{_HASH}"\n\n'
        "# Where example.com goes (kept by the console).\n"
        + configs.route("Sink", port=sink_port)
        + configs.rule("Sink", "@example.com")
    )


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
