"""The console over HTTPS (``[admin] tls_cert/tls_key``): the session cookie is Secure.

And a reload cannot move the console: ``[admin] listen`` needs a restart.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import aiohttp

from relay import app
from relay.config import Listen
from tests.support.console import PASSWORD, USER, console_config
from tests.support.ops import load_text
from tests.support.pki import Pki
from tests.support.procs import RelayProcess, free_port


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
    assert [(p.where, p.field) for p in app.restart_problems(old, new)] == [("admin", "listen")]


def _hash() -> str:
    from relay.passwords import hash_password

    return hash_password("long enough")
