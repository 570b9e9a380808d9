"""The running configuration: loaded, checked, swapped in on SIGHUP, audited.

:class:`ConfigKeeper` is what a daemon and a worker supervisor
(relay.workers) share: each keeps one current Config behind a callable,
reloads it one reload at a time, refuses an invalid one (the old one keeps
running), counts every reload in ``relay_config_reloads_total``, and
writes the audit log. What a reload changes in the running process is the
subclass's (``_relisten`` before the swap, ``_swapped`` after it).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path

from relay import configdiff, configload, events, tls
from relay.audit import AuditLog
from relay.config import Config
from relay.configload import ConfigError


def server_tls_context(cfg: Config) -> ssl.SSLContext | None:
    """Inbound STARTTLS is offered only when a certificate is configured."""
    if cfg.server.tls_cert is None or cfg.server.tls_key is None:
        return None
    return tls.server_context(cfg.server.tls_cert, cfg.server.tls_key)


class ConfigKeeper:
    """One current config; ``load`` reads it (again, on SIGHUP)."""

    def __init__(self, load: Callable[[], Config], *, audit: bool = True) -> None:
        self._load = load
        self._config = load()
        self._tls = server_tls_context(self._config)
        #: False in a worker process: its supervisor writes the audit log, once.
        self._audits = audit
        self._reloading = asyncio.Lock()

    def config(self) -> Config:
        """The current config: every component reads it through this callable."""
        return self._config

    def tls_context(self) -> ssl.SSLContext | None:
        return self._tls

    async def reload(self, trigger: str = "SIGHUP") -> bool:
        """SIGHUP: load the config again; swap it in only if it is valid.

        Reloads run one at a time: each one compares with (and audits
        against) the config the previous one left, never a stale one.
        ``trigger`` is what the audit log says asked for it ("console" for
        a save in the admin console).
        """
        async with self._reloading:
            return await self._reload(trigger)

    async def _reload(self, trigger: str = "SIGHUP") -> bool:
        old = self._config
        try:
            new = await asyncio.to_thread(self._load)
            server_tls = server_tls_context(new)
        except ConfigError as exc:
            self._refuse(old, exc.path, list(exc.problems), trigger)
            return False
        except (OSError, ssl.SSLError) as exc:
            self._count("error")
            events.error("reload_failed", config=old.shown_source, error=str(exc))
            return False
        needs_restart = restart_problems(old, new)
        if needs_restart:
            self._refuse(old, new.source, needs_restart, trigger)
            return False
        if not await self._relisten(old, new, trigger):
            return False
        # One reference swap: inbound and the scheduler read it per command.
        self._config, self._tls = new, server_tls
        # A CA file may have changed on disk under the same path.
        tls.client_context.cache_clear()
        self._swapped(old, new)
        self._count("success")
        if new.log != old.log:
            events.setup(new.log.format, new.log.level)
        self._applied(new, "reload", old, trigger)
        return True

    def _count(self, result: str) -> None:
        """One more reload in ``relay_config_reloads_total{result=...}``."""
        raise NotImplementedError

    async def _relisten(self, old: Config, new: Config, trigger: str) -> bool:
        """Before the swap: bind what the new config listens on; False refuses the reload."""
        return True

    def _swapped(self, old: Config, new: Config) -> None:
        """After the swap: apply what components do not read per use."""

    def _refuse(
        self,
        old: Config,
        source: Path,
        problems: list[configload.Problem],
        trigger: str = "SIGHUP",
    ) -> None:
        """A loaded config cannot be applied: count, log and audit it; ``old`` keeps running."""
        self._count("error")
        events.error("reload_failed", config=str(source), problems=len(problems))
        for problem in problems:
            events.error("reload_problem", problem=str(problem))
        self._audit(old, lambda log: log.record_refused(source, problems, trigger))

    def _applied(
        self, new: Config, reason: str, old: Config | None = None, trigger: str = "SIGHUP"
    ) -> None:
        """A config took effect (start or reload): log it, and audit it."""
        events.log(
            "config_applied",
            reason=reason,
            config=new.shown_source,
            sha256=new.sha256,
            routes=len(new.routes),
            rules=len(new.rules),
        )
        if not self._audits:
            return  # a worker: its supervisor said all of this already
        for line in configdiff.describe(new):
            events.log("config", line=line)
        for route in new.routes:
            # Only where it can happen: require_tls encrypts before any AUTH.
            if route.auth is not None and route.auth.over_plaintext and not route.tls.require_tls:
                events.warning(
                    "auth_over_plaintext", route=route.name,
                    risk="the password may cross the network unencrypted",
                )  # fmt: skip
        if old is None:
            self._audit(new, lambda log: log.record_start(new))
        else:
            self._audit(new, lambda log: log.record_reload(old, new, trigger))

    def _audit(self, cfg: Config, write: Callable[[AuditLog], None]) -> None:
        """Append to the audit log; a failed write is logged, never fatal to a reload."""
        if not self._audits:
            return
        try:
            write(AuditLog(cfg.audit.path))
        except OSError as exc:
            events.error("audit_failed", path=str(cfg.audit.path), error=str(exc))


def restart_problems(old: Config, new: Config) -> list[configload.Problem]:
    """The changes from ``old`` to ``new`` a reload cannot apply, as Problems.

    ``queue.path`` (the spool, and the pid file ``relay reload`` and
    ``relay queue`` find the daemon by), ``metrics.listen`` and
    ``server.workers`` (the processes and spool shards) are bound at
    start. A reload changing either is refused as a whole, so the audit
    log never says a config applied that did not. The ``[queue]``
    durations apply live: the scheduler reads them at every use.
    """
    problems = []
    if new.server.event_loop != old.server.event_loop:
        problems.append(
            configload.Problem(
                "server",
                "event_loop",
                f"changing it needs a restart; the running relay keeps {old.server.event_loop}",
            )
        )
    if new.queue.path != old.queue.path:
        problems.append(
            configload.Problem(
                "queue",
                "path",
                f"changing it needs a restart; the running relay keeps {old.queue.path}",
            )
        )
    if new.metrics.listen != old.metrics.listen:
        keeps = str(old.metrics.listen) if old.metrics.listen else "the endpoint off"
        problems.append(
            configload.Problem(
                "metrics",
                "listen",
                f"changing it needs a restart; the running relay keeps {keeps}",
            )
        )
    if new.server.workers != old.server.workers:
        problems.append(
            configload.Problem(
                "server",
                "workers",
                f"changing it needs a restart; the running relay keeps {old.server.workers}",
            )
        )
    if new.admin.listen != old.admin.listen or (new.admin.tls_cert, new.admin.tls_key) != (
        old.admin.tls_cert,
        old.admin.tls_key,
    ):
        problems.append(
            configload.Problem(
                "admin",
                "listen",
                "changing listen, tls_cert or tls_key needs a restart; "
                "the running console keeps its address and certificate",
            )
        )
    return problems
