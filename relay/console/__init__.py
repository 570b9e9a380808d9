"""The admin web console, served by the daemon on its own loop (docs/console.md).

aiohttp serves it (asyncio-native, so it shares the daemon's event loop
and objects: no second process, no IPC); jinja2 renders the pages with
autoescaping; tomlkit edits the config file keeping its comments.

Modules: :mod:`auth` (who may do what), :mod:`configfile` (reading,
validating and atomically writing the TOML file), :mod:`api` (the JSON
API under /api/), :mod:`pages` (HTML), :mod:`health` (per-host health).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from aiohttp import web

from relay import events, tls
from relay.config import Config

if TYPE_CHECKING:
    from relay.control import Control
    from relay.metrics import Metrics
    from relay.queue import Scheduler
    from relay.spool import Spool


@dataclass(frozen=True)
class Services:
    """What the console uses of the running daemon (built by relay.app)."""

    config: Callable[[], Config]
    #: Reload the config file as SIGHUP does; True when the new one applied.
    reload: Callable[[], Awaitable[bool]]
    spool: Spool
    scheduler: Scheduler
    control: Control
    metrics: Metrics
    #: time.time() at start, for the uptime.
    started: float
    #: Per route, each configured host's health (relay.health.Health.snapshot).
    health: Callable[[], list[dict[str, Any]]] = list


SERVICES: web.AppKey[Services] = web.AppKey("services", Services)


def build(services: Services) -> web.Application:
    """The console's aiohttp application (also what tests may serve)."""
    from relay.console import api, auth, pages

    sessions = auth.Sessions()
    guard: Any = auth.guard(services.config, sessions)
    app = web.Application(middlewares=[guard], client_max_size=1024 * 1024)
    app[SERVICES] = services
    app[pages.SESSIONS] = sessions
    pages.setup(app)
    api.setup(app)
    return app


async def serve(services: Services) -> web.AppRunner:
    """Start the console on ``[admin] listen``; the runner, to ``cleanup()`` at shutdown."""
    cfg = services.config()
    listen = cfg.admin.listen
    assert listen is not None
    context: ssl.SSLContext | None = None
    if cfg.admin.tls_cert is not None and cfg.admin.tls_key is not None:
        context = tls.server_context(cfg.admin.tls_cert, cfg.admin.tls_key)
    runner = web.AppRunner(build(services), access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, listen.host, listen.port, ssl_context=context)
    try:
        await site.start()
    except OSError:
        await runner.cleanup()
        raise
    scheme = "https" if context else "http"
    events.log("console_started", url=f"{scheme}://{listen}/")
    return runner
