"""Who may use the console: address allow-list, login, sessions, CSRF, rate limit.

Every request passes :func:`guard` (an aiohttp middleware), in this order:

1. the client address must be in ``[admin] allow`` (else 403, nothing else
   is said or served);
2. every response carries the security headers (:data:`SECURITY_HEADERS`:
   a strict Content-Security-Policy, no framing, no caching);
3. except the login page and the static assets, a valid session is
   required: pages redirect to /login, /api/ answers 401;
4. a state-changing request (POST, PUT, PATCH, DELETE) must carry the
   session's CSRF token (header ``X-CSRF-Token`` or form field ``csrf``),
   else 403 before any handler runs, so nothing changes.

Sessions live in memory: a restart logs everyone out, and no session
secret sits on disk. The cookie is HttpOnly, SameSite=Strict, and Secure
when the console is served over TLS.
"""

from __future__ import annotations

import asyncio
import hmac
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from relay import passwords
from relay.config import Config

COOKIE = "relay_session"
#: The double-submit token that protects the login form itself.
LOGIN_COOKIE = "relay_login"
#: A session ends after this many idle seconds.
SESSION_IDLE = 3600.0
#: Failed logins allowed per client address within LOGIN_WINDOW seconds.
LOGIN_ATTEMPTS = 5
LOGIN_WINDOW = 300.0

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})

#: No inline script or style, nothing from another origin, no framing.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


@dataclass
class Session:
    user: str
    client: str
    csrf: str = field(default_factory=lambda: secrets.token_urlsafe(32))
    seen: float = field(default_factory=time.monotonic)


class Sessions:
    """Logged-in sessions by cookie token, and failed logins by client address."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._by_token: dict[str, Session] = {}
        self._failures: dict[str, deque[float]] = {}

    def start(self, user: str, client: str) -> tuple[str, Session]:
        token = secrets.token_urlsafe(32)
        session = Session(user, client, seen=self._clock())
        self._by_token[token] = session
        return token, session

    def get(self, token: str | None, config: Config) -> Session | None:
        """The live session for ``token``; None when unknown, idle too long or its user removed."""
        session = self._by_token.get(token or "")
        if session is None:
            return None
        now = self._clock()
        if now - session.seen > SESSION_IDLE or config.admin.user(session.user) is None:
            self._by_token.pop(token or "", None)
            return None
        session.seen = now
        return session

    def end(self, token: str | None) -> None:
        self._by_token.pop(token or "", None)

    def blocked(self, client: str) -> float:
        """Seconds until ``client`` may try to log in again (0: now)."""
        failures = self._failures.get(client)
        if not failures:
            return 0.0
        now = self._clock()
        while failures and now - failures[0] > LOGIN_WINDOW:
            failures.popleft()
        if len(failures) < LOGIN_ATTEMPTS:
            return 0.0
        return max(1.0, LOGIN_WINDOW - (now - failures[0]))

    def failed(self, client: str) -> None:
        self._failures.setdefault(client, deque()).append(self._clock())

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


async def check_password(config: Config, name: str, password: str) -> bool:
    """The user exists and the password matches (scrypt runs off the loop)."""
    user = config.admin.user(name)
    # An unknown name costs as much as a wrong password: no user-name oracle.
    stored = user.password_hash if user is not None else _DUMMY_HASH
    ok = await asyncio.to_thread(passwords.verify, password, stored)
    return ok and user is not None


_DUMMY_HASH = passwords.hash_password(secrets.token_urlsafe(16))


def client_of(request: web.Request) -> str:
    """The peer's address (no proxy headers are trusted: the console is not for proxies)."""
    return request.remote or ""


def token_matches(request: web.Request, session: Session, form_token: str | None) -> bool:
    given = request.headers.get("X-CSRF-Token") or form_token or ""
    return hmac.compare_digest(given.encode(), session.csrf.encode())


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Middleware = Callable[[web.Request, Handler], Awaitable[web.StreamResponse]]

#: Paths served without a session: the login page and the assets it needs.
PUBLIC_PREFIXES = ("/login", "/static/")


def guard(config: Callable[[], Config], sessions: Sessions) -> Middleware:
    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            response = await _checked(request, handler, config(), sessions)
        except web.HTTPException as exc:
            response = exc
        response.headers.update(SECURITY_HEADERS)
        return response

    return middleware


async def _checked(
    request: web.Request, handler: Handler, cfg: Config, sessions: Sessions
) -> web.StreamResponse:
    if not cfg.admin.allows(client_of(request)):
        return web.Response(status=403, text="forbidden: this address may not use the console\n")
    if request.path.startswith(PUBLIC_PREFIXES):
        return await handler(request)
    session = sessions.get(request.cookies.get(COOKIE), cfg)
    if session is None:
        if request.path.startswith("/api/"):
            return web.json_response({"error": "login required"}, status=401)
        raise web.HTTPSeeOther("/login")
    if request.method not in SAFE_METHODS:
        form_token = None
        if request.content_type == "application/x-www-form-urlencoded":
            form_token = str((await request.post()).get("csrf", ""))
        if not token_matches(request, session, form_token):
            return web.json_response({"error": "missing or wrong CSRF token"}, status=403)
    request["session"] = session
    return await handler(request)


def set_cookie(response: web.StreamResponse, name: str, value: str, secure: bool) -> None:
    response.set_cookie(
        name, value, httponly=True, samesite="Strict", secure=secure, path="/"
    )  # fmt: skip
