"""An aiosmtpd sink that requires SMTP AUTH (RFC 4954), offered only after STARTTLS.

aiosmtpd's own AUTH (PLAIN and LOGIN; ``auth_require_tls`` hides AUTH until
the session is encrypted, ``auth_required`` refuses MAIL before AUTH); the
``authenticator`` checks one account and records each mechanism tried.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, LoginPassword, Session

from tests.support.sink import Sink


class AuthSink(Sink):
    """A :class:`Sink` that takes mail only from ``username``/``password``."""

    def __init__(self, *, username: str, password: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.account = (username.encode(), password.encode())
        #: (mechanism, login, accepted) of every AUTH the sink saw.
        self.auths: list[tuple[str, bytes, bool]] = []

    def _smtp_options(self) -> dict[str, Any]:
        return {
            "authenticator": self._authenticate,
            "auth_required": True,
            "auth_require_tls": True,
        }

    def _authenticate(
        self, server: SMTP, session: Session, envelope: Envelope, mechanism: str, data: Any
    ) -> AuthResult:
        ok = isinstance(data, LoginPassword) and (data.login, data.password) == self.account
        login = data.login if isinstance(data, LoginPassword) else b""
        self.auths.append((mechanism, login, ok))
        return AuthResult(success=ok, handled=False)


class CramMd5Sink(AuthSink):
    """An :class:`AuthSink` that also offers CRAM-MD5 (RFC 2195), which aiosmtpd
    does not have built in: a handler ``auth_CRAM__MD5`` method adds it."""

    async def auth_CRAM__MD5(self, server: SMTP, args: list[str]) -> AuthResult:  # noqa: N802
        challenge = f"<{self.connections}.1@{self.hostname}>".encode()
        answer = await server.challenge_auth(challenge)
        if not isinstance(answer, bytes):
            return AuthResult(success=False)
        login, _, digest = answer.partition(b" ")
        expected = hmac.new(self.account[1], challenge, hashlib.md5).hexdigest().encode()
        ok = login == self.account[0] and hmac.compare_digest(digest, expected)
        self.auths.append(("CRAM-MD5", login, ok))
        return AuthResult(success=ok, handled=False, auth_data=login)
