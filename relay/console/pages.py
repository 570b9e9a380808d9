"""The console's HTML pages (jinja2, autoescaped), login and logout.

Pages are rendered on the server from the same views the JSON API
returns, so everything reads with JavaScript off; static/console.js adds
the dialog's live checks and sends changes to the API.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path
from typing import Any

import jinja2
from aiohttp import web

import relay
from relay.config import ON_TLS_FAILURE, Host, Route, TlsPolicy, field_default
from relay.configvalues import ALLOWED_PORTS, check_port
from relay.console import SERVICES, api, auth, configfile

HERE = Path(__file__).parent
SESSIONS: web.AppKey[auth.Sessions] = web.AppKey("sessions", auth.Sessions)
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(HERE / "templates"),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
)
_ENV.filters["stamp"] = lambda t: time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(t)) if t else "-"

#: The message the dialog shows for port 465 (the validator's own words).
PORT_465 = check_port(465)


def render(request: web.Request, template: str, **context: Any) -> web.Response:
    session = request.get("session")
    cfg = request.app[SERVICES].config()
    values: dict[str, Any] = {
        "user": session.user if session else None,
        "csrf": session.csrf if session else "",
        "read_only": configfile.read_only_reason(cfg) if session else None,
        "version": relay.version(),
        "path": request.path,
    }
    html = _ENV.get_template(template).render({**values, **context})
    return web.Response(text=html, content_type="text/html")


def _secure(request: web.Request) -> bool:
    return request.secure


async def login_page(request: web.Request) -> web.Response:
    # The token already given is kept: a second GET (a browser's favicon
    # request redirected here) must not invalidate the form on screen.
    token = request.cookies.get(auth.LOGIN_COOKIE, "")
    if not (20 <= len(token) <= 64 and token.replace("-", "").replace("_", "").isalnum()):
        token = secrets.token_urlsafe(24)
    response = render(request, "login.html", login_token=token, error=None)
    auth.set_cookie(response, auth.LOGIN_COOKIE, token, _secure(request))
    return response


async def login(request: web.Request) -> web.StreamResponse:
    sessions = request.app[SESSIONS]
    client = auth.client_of(request)
    form = await request.post()
    token = request.cookies.get(auth.LOGIN_COOKIE, "")
    if not token or not secrets.compare_digest(token, str(form.get("login_token", ""))):
        raise web.HTTPForbidden(text="login form expired: reload the login page\n")
    wait = sessions.blocked(client)
    if wait:
        return web.Response(
            status=429,
            text=f"too many failed logins from {client}: try again in {int(wait)} s\n",
            headers={"Retry-After": str(int(wait))},
        )
    name, password = str(form.get("name", "")), str(form.get("password", ""))
    cfg = request.app[SERVICES].config()
    if not await auth.check_password(cfg, name, password):
        sessions.failed(client)
        new = secrets.token_urlsafe(24)
        response = render(
            request, "login.html", login_token=new, error="wrong user name or password"
        )
        response.set_status(401)
        auth.set_cookie(response, auth.LOGIN_COOKIE, new, _secure(request))
        return response
    sessions.succeeded(client)
    cookie, _ = sessions.start(name, client)
    response = web.HTTPSeeOther("/routes")
    auth.set_cookie(response, auth.COOKIE, cookie, _secure(request))
    response.del_cookie(auth.LOGIN_COOKIE, path="/")
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    request.app[SESSIONS].end(request.cookies.get(auth.COOKIE))
    response = web.HTTPSeeOther("/login")
    response.del_cookie(auth.COOKIE, path="/")
    return response


async def index(request: web.Request) -> web.StreamResponse:
    raise web.HTTPSeeOther("/routes")


async def routes_page(request: web.Request) -> web.Response:
    return render(request, "routes.html", **api.routes_view(request.app[SERVICES]))


def _blank_route() -> dict[str, Any]:
    """The new-route form: every option at the default relay.config gives it."""
    port, load = field_default(Host, "port"), field_default(Host, "load")
    row = {"host": "", "port": port, "load": load}
    tls = TlsPolicy()
    return {
        "name": "", "single": True, "host": "", "port": port, "primary": [row],
        "secondary": [], "mx_lookup": field_default(Route, "mx_lookup"),
        "require_tls": tls.require_tls, "require_ca_signed": tls.require_ca_signed,
        "validate_hostname": tls.validate_hostname,
        "on_tls_failure": field_default(Route, "on_tls_failure"),
    }  # fmt: skip


async def route_form(request: web.Request) -> web.Response:
    services = request.app[SERVICES]
    name = request.match_info.get("name")
    if name is None:
        route = _blank_route()
    else:
        found = next((r for r in api.routes_view(services)["routes"] if r["name"] == name), None)
        if found is None:
            raise web.HTTPNotFound(text=f"no route named {name!r}\n")
        route = found
        if route["single"]:
            route["primary"] = [{"host": route["host"], "port": route["port"], "load": 100}]
        else:
            route["host"], route["port"] = "", 25
    return render(
        request, "route_form.html", route=route, original=name or "",
        choices=ON_TLS_FAILURE, allowed_ports=ALLOWED_PORTS, port_465=PORT_465,
    )  # fmt: skip


async def rules_page(request: web.Request) -> web.Response:
    return render(request, "rules.html", **api.rules_view(request.app[SERVICES]))


async def queue_page(request: web.Request) -> web.Response:
    try:
        view = await asyncio.to_thread(api.queue_view, request.app[SERVICES], request.query)
        error = None
    except ValueError as exc:
        view, error = {"messages": [], "total": 0, "corrupt": []}, str(exc)
    return render(request, "queue.html", query=request.query, error=error, **view)


async def message_page(request: web.Request) -> web.Response:
    qid = request.match_info["qid"]
    found = await asyncio.to_thread(api.message_view, request.app[SERVICES], qid)
    if found is None:
        raise web.HTTPNotFound(text=f"no message {qid} in the queue\n")
    return render(request, "message.html", message=found)


async def audit_page(request: web.Request) -> web.Response:
    view = await asyncio.to_thread(api.audit_view, request.app[SERVICES])
    return render(request, "audit.html", **view)


async def status_page(request: web.Request) -> web.Response:
    return render(request, "status.html", status=api.status_view(request.app[SERVICES]))


def setup(app: web.Application) -> None:
    r = app.router
    r.add_get("/", index)
    r.add_get("/login", login_page)
    r.add_post("/login", login)
    r.add_post("/logout", logout)
    r.add_get("/routes", routes_page)
    r.add_get("/routes/new", route_form)
    r.add_get("/routes/edit/{name:.+}", route_form)
    r.add_get("/rules", rules_page)
    r.add_get("/queue", queue_page)
    r.add_get("/queue/{qid}", message_page)
    r.add_get("/audit", audit_page)
    r.add_get("/status", status_page)
    r.add_static("/static/", HERE / "static", follow_symlinks=False)
