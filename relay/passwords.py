"""Password hashes for the admin console's users (``relay admin-passwd``).

scrypt (RFC 7914) from the standard library: memory-hard like argon2,
with no extra dependency to vet and keep patched. The stored form is
``scrypt$N$r$p$salt$hash`` (salt and hash in unpadded base64), so the
cost can be raised later and old hashes still verify.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os

#: Cost: N=2**15, r=8 takes 32 MiB and about 0.1 s per check, which is what
#: makes an offline guess at a leaked hash expensive.
N, R, P = 2**15, 8, 1
_SALT_BYTES = 16
_KEY_BYTES = 32
PREFIX = "scrypt$"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _derive(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(
        password.encode("utf-8"), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024,
        dklen=_KEY_BYTES,
    )  # fmt: skip


def hash_password(password: str) -> str:
    """A new salted hash of ``password`` in the stored form."""
    salt = os.urandom(_SALT_BYTES)
    return f"{PREFIX}{N}${R}${P}${_b64(salt)}${_b64(_derive(password, salt, N, R, P))}"


def _parts(stored: str) -> tuple[int, int, int, bytes, bytes]:
    scheme, n, r, p, salt, key = stored.split("$")
    if scheme != "scrypt":
        raise ValueError("not scrypt")
    cost = int(n), int(r), int(p)
    if cost[0] < 2 or cost[0] & (cost[0] - 1) or cost[1] < 1 or cost[2] < 1:
        raise ValueError("bad cost")
    return (*cost, _unb64(salt), _unb64(key))


def check_hash(stored: str) -> str | None:
    """The problem with a stored hash's form, or None when it is one."""
    try:
        _parts(stored)
    except (ValueError, TypeError):
        return "is not a hash from `relay admin-passwd` (scrypt$N$r$p$salt$hash)"
    return None


def verify(password: str, stored: str) -> bool:
    """``password`` matches ``stored`` (compared in constant time). Blocking: ~0.1 s."""
    try:
        n, r, p, salt, key = _parts(stored)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(_derive(password, salt, n, r, p), key)
