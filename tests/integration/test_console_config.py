"""``[admin]`` in the config (validated like every section) and ``relay admin-passwd``."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from relay import passwords
from relay.config import Listen
from relay.configload import ConfigError
from tests.support.ops import load_text

BASE = '[server]\nhostname = "relay.test"\ndomains = ["example.com"]\n\n'


def test_the_console_is_off_by_default_and_loopback_only(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, BASE)
    assert cfg.admin.listen is None
    assert cfg.admin.allows("127.0.0.1") and cfg.admin.allows("::1")
    assert not cfg.admin.allows("192.0.2.1")


def test_a_valid_admin_section(tmp_path: Path) -> None:
    stored = passwords.hash_password("long enough")
    cfg = load_text(
        tmp_path,
        BASE + '[admin]\nlisten = "127.0.0.1:8025"\nallow = ["10.0.0.0/8"]\n'
        f'[[admin.users]]\nname = "alice"\npassword_hash = "{stored}"\n',
    )
    assert cfg.admin.listen == Listen("127.0.0.1", 8025)
    assert cfg.admin.allow == (ipaddress.ip_network("10.0.0.0/8"),)
    user = cfg.admin.user("alice")
    assert user is not None and passwords.verify("long enough", user.password_hash)
    assert not passwords.verify("wrong", user.password_hash)


def test_every_admin_problem_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(
            tmp_path,
            BASE + '[admin]\nlisten = "nowhere"\nallow = ["not-a-net"]\ntls_cert = "x.pem"\n'
            'lisen = "1"\n[[admin.users]]\nname = ""\npassword_hash = "plaintext"\n'
            '[[admin.users]]\nname = "bob"\n',
        )
    shown = [str(p) for p in caught.value.problems]
    expected = [
        "admin: lisen: unknown key; did you mean 'listen'?",
        "admin: listen: 'nowhere' is not host:port (IPv6 as [::1]:2525)",
        "admin: allow: 'not-a-net' is not a network; use CIDR like 127.0.0.0/8",
        "admin: users[1].name: is required and must not be empty",
        "admin: users[1].password_hash: is not a hash from `relay admin-passwd` "
        "(scrypt$N$r$p$salt$hash)",
        "admin: users[2].password_hash: is required: run `relay admin-passwd`",
    ]
    for line in expected:
        assert line in shown
    assert any(p.startswith("admin: tls_cert: file") for p in shown)
    assert "admin: tls_key: tls_cert and tls_key go together" in shown


def test_a_console_needs_a_user(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_text(tmp_path, BASE + '[admin]\nlisten = "127.0.0.1:8025"\n')
    assert [str(p) for p in caught.value.problems] == [
        "admin: users: the console needs at least one [[admin.users]] to log in"
    ]


def test_admin_passwd_prints_a_hash_that_verifies() -> None:
    run = subprocess.run(
        [sys.executable, "-m", "relay", "admin-passwd"],
        input="a good password\n", capture_output=True, text=True, timeout=30, check=True,
    )  # fmt: skip
    stored = run.stdout.strip()
    assert stored.startswith("scrypt$32768$8$1$") and "good" not in stored
    assert passwords.verify("a good password", stored)
    short = subprocess.run(
        [sys.executable, "-m", "relay", "admin-passwd"],
        input="short\n", capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert short.returncode == 2 and short.stdout == ""
