"""The console's JSON API under /api/ (docs/console.md lists every call).

The pages call exactly these; scripts may too, with the session cookie
and the ``X-CSRF-Token`` header from ``GET /api/session``.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import tomlkit
from aiohttp import web

import relay
from relay import config as configmod
from relay import configdiff, configvalues, control, testtls
from relay.audit import AuditLog, format_entry
from relay.config import Config, Route
from relay.configload import ConfigError
from relay.console import SERVICES, Services, configfile, health
from relay.console.auth import Session, client_of

#: A queue id (relay.spoolfiles.new_id): ids become file names, so nothing else passes.
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")

SAVE_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("save_lock", asyncio.Lock)

#: Audit entries returned at most, newest first.
AUDIT_LIMIT = 200


def _services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _session(request: web.Request) -> Session:
    session: Session = request["session"]
    return session


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except ValueError:
        raise web.HTTPBadRequest(text="the body must be JSON") from None
    if not isinstance(data, dict):
        raise web.HTTPBadRequest(text="the body must be a JSON object")
    return data


# --- reading -----------------------------------------------------------------


def _samples(services: Services) -> dict[str, list[tuple[dict[str, str], float]]]:
    """Every sample of the daemon's metrics, by sample name."""
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in services.metrics.registry.collect():
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def route_json(
    cfg: Config, route: Route, samples: dict[str, Any], healths: health.HealthIndex
) -> dict[str, Any]:
    expiry = {
        labels["host"]: value
        for labels, value in samples.get("relay_tls_certificate_expiry_timestamp_seconds", [])
        if labels.get("route") == route.name
    }

    def host(h: configmod.Host) -> dict[str, Any]:
        return {
            "host": h.name,
            "port": h.port,
            "load": h.load,
            "certificate_expires": expiry.get(h.name),
            "health": health.host_health(healths, route.name, h.name),
        }

    rules = [
        {"index": i, "recipients": list(rule.recipients)}
        for i, rule in enumerate(cfg.rules, start=1)
        if rule.route == route.name
    ]
    return {
        "name": route.name,
        "single": route.single,
        "host": route.primary[0].name if route.single else None,
        "port": route.primary[0].port if route.single else None,
        "primary": [host(h) for h in route.primary],
        "secondary": [host(h) for h in route.secondary],
        "mx_lookup": route.mx_lookup,
        "require_tls": route.tls.require_tls,
        "require_ca_signed": route.tls.require_ca_signed,
        "validate_hostname": route.tls.validate_hostname,
        "on_tls_failure": route.on_tls_failure,
        "rules": rules,
    }


def routes_view(services: Services) -> dict[str, Any]:
    cfg = services.config()
    samples = _samples(services)
    healths = health.index(services.health())
    return {
        "routes": [route_json(cfg, r, samples, healths) for r in cfg.routes],
        "read_only": configfile.read_only_reason(cfg),
        "config": cfg.shown_source,
    }


def rules_view(services: Services) -> dict[str, Any]:
    cfg = services.config()
    return {
        "rules": [
            {"index": i, "recipients": list(r.recipients), "route": r.route}
            for i, r in enumerate(cfg.rules, start=1)
        ],
        "routes": [r.name for r in cfg.routes],
        "read_only": configfile.read_only_reason(cfg),
    }


def status_view(services: Services) -> dict[str, Any]:
    samples = _samples(services)
    healths = health.index(services.health())
    # Every configured host, tried or not, then any other label the metrics have.
    per_host: dict[tuple[str, str], dict[str, float]] = {key: {} for key in healths}
    for labels, value in samples.get("relay_delivery_attempts_total", []):
        key = (labels["route"], labels["host"])
        per_host.setdefault(key, {})[labels["result"]] = value
    recipients: dict[str, dict[str, float]] = {}
    for labels, value in samples.get("relay_recipients_total", []):
        recipients.setdefault(labels["route"], {})[labels["outcome"]] = value
    received = sum(v for _, v in samples.get("relay_messages_received_total", []))
    return {
        "version": relay.version(),
        "uptime_seconds": round(time.time() - services.started),
        "config": services.config().shown_source,
        "queue": {"scheduled": len(services.scheduler), "held": len(services.spool.hold.ids())},
        "messages_received": received,
        "recipients": recipients,
        "hosts": [
            {
                "route": route,
                "host": host,
                "results": results,
                "health": health.host_health(healths, route, host),
            }
            for (route, host), results in sorted(per_host.items())
        ],  # fmt: skip
    }


def _queue_args(query: Any, ids: list[str] | None = None) -> argparse.Namespace:
    older = query.get("older_than") or None
    age = configvalues.parse_duration(older) if older else None
    return argparse.Namespace(
        held=query.get("held") in ("1", "true", True),
        deferred=query.get("deferred") in ("1", "true", True),
        domain=query.get("domain") or None,
        rcpt=query.get("rcpt") or None,
        route=query.get("route") or None,
        older_than=age,
        ids=ids,
    )


def queue_view(services: Services, query: Any) -> dict[str, Any]:
    """``relay queue list --json``'s report (blocking: reads the spool)."""
    from relay import queuecli

    cfg = services.config()
    now = time.time()
    unreadable: list[str] = []
    entries, _ = queuecli._select(_queue_args(query), cfg, services.spool, unreadable)
    return {
        "messages": [queuecli._entry_json(cfg, e, now) for e in entries],
        "total": len(entries),
        "corrupt": sorted(set(services.spool.quarantine.ids()) | set(unreadable)),
    }


def message_view(services: Services, qid: str) -> dict[str, Any] | None:
    """One message's envelope and its header section only (``relay queue show``)."""
    from relay import queuecli
    from relay.spoolbody import IN_MEMORY_MAX, BodyFile

    cfg = services.config()
    if not _QUEUE_ID.fullmatch(qid):
        return None  # ids become file names: nothing else reaches the spool
    spool = queuecli.shard_of(services.spool, qid)  # with workers, any worker's shard
    held = qid in spool.hold
    try:
        env = (spool.hold if held else spool).load(qid)
    except (KeyError, ValueError, TypeError):
        return None
    entry = queuecli._entry_json(cfg, queuecli.Entry(env, held), time.time())
    try:
        opened = (spool.hold if held else spool).open_body(env.id, IN_MEMORY_MAX)
        if isinstance(opened, BodyFile):
            with opened:
                body = opened.head(IN_MEMORY_MAX)
        else:
            body = opened
    except FileNotFoundError:
        body = b""
    headers = body.partition(b"\r\n\r\n")[0]
    entry["headers"] = headers.decode("utf-8", "replace").replace("\r\n", "\n")
    return entry


def audit_view(services: Services, limit: int = AUDIT_LIMIT) -> dict[str, Any]:
    log = AuditLog(services.config().audit.path)
    entries = list(log.entries())[-limit:][::-1]
    out = []
    for entry in entries:
        entry.pop("snapshot", None)
        out.append({"entry": entry, "lines": format_entry(entry)})
    return {"entries": out}


# --- handlers ----------------------------------------------------------------


async def get_session(request: web.Request) -> web.Response:
    session = _session(request)
    cfg = _services(request).config()
    return web.json_response(
        {"user": session.user, "csrf": session.csrf,
         "read_only": configfile.read_only_reason(cfg)}
    )  # fmt: skip


async def get_routes(request: web.Request) -> web.Response:
    return web.json_response(routes_view(_services(request)))


async def get_rules(request: web.Request) -> web.Response:
    return web.json_response(rules_view(_services(request)))


async def get_status(request: web.Request) -> web.Response:
    return web.json_response(status_view(_services(request)))


async def get_audit(request: web.Request) -> web.Response:
    return web.json_response(await asyncio.to_thread(audit_view, _services(request)))


async def get_queue(request: web.Request) -> web.Response:
    try:
        view = await asyncio.to_thread(queue_view, _services(request), request.query)
    except ValueError as exc:
        return web.json_response({"error": str(exc)}, status=400)
    return web.json_response(view)


async def get_message(request: web.Request) -> web.Response:
    found = await asyncio.to_thread(message_view, _services(request), request.match_info["qid"])
    if found is None:
        return web.json_response({"error": "no such message"}, status=404)
    return web.json_response(found)


def _candidate(cfg: Config, old: str | None, form: dict[str, Any]) -> tuple[Config, int]:
    """The whole config with the form's route in place; raises ConfigError."""
    doc = configfile.load(cfg)
    index = configfile.put_route(doc, old, configfile.route_table(form))
    return configfile.validate(doc, cfg.source), index


async def validate_route(request: web.Request) -> web.Response:
    """Check an unsaved route with the validator check-config uses; nothing is written."""
    data = await _body(request)
    cfg = _services(request).config()
    old = data.get("original") or None
    try:
        await asyncio.to_thread(_candidate, cfg, old, data)
    except ConfigError as exc:
        index = _index_after(cfg, old)
        return web.json_response({"ok": False, "problems": configfile.split_problems(
            exc.problems, index)})  # fmt: skip
    return web.json_response({"ok": True, "problems": {"fields": {}, "other": []}})


def _index_after(cfg: Config, old: str | None) -> int:
    """Where the form's route lands in the file: in place, or appended."""
    doc = configfile.load(cfg)
    index = configfile.route_index(doc, old) if old else None
    return index if index is not None else len(doc.get("routes", []))


async def _save(
    request: web.Request,
    action: str,
    change: Callable[[tomlkit.TOMLDocument], int | None],
) -> web.Response:
    """Change the file through ``change``, validate, write atomically, reload, audit."""
    services = _services(request)
    async with request.app[SAVE_LOCK]:
        cfg = services.config()
        reason = configfile.read_only_reason(cfg)
        if reason:
            return web.json_response({"error": f"read-only: {reason}"}, status=409)
        doc = await asyncio.to_thread(configfile.load, cfg)
        index = change(doc)
        try:
            new = await asyncio.to_thread(configfile.validate, doc, cfg.source)
        except ConfigError as exc:
            problems = configfile.split_problems(exc.problems, index)
            return web.json_response({"saved": False, "problems": problems}, status=422)
        await asyncio.to_thread(configfile.write_atomic, cfg.source, tomlkit.dumps(doc))
        applied = await services.reload()
        full = configdiff.diff(cfg, new)
        changes = {"routes": full["routes"], "rules": full["rules"]}
        session = _session(request)
        try:
            AuditLog(cfg.audit.path).record_console(
                action, cfg.source, user=session.user, client=client_of(request),
                changes=changes, applied=applied,
            )  # fmt: skip
        except OSError as exc:
            return web.json_response(
                {"saved": True, "applied": applied, "changes": changes,
                 "warning": f"not written to the audit log: {exc}"}
            )  # fmt: skip
    return web.json_response({"saved": True, "applied": applied, "changes": changes})


async def create_route(request: web.Request) -> web.Response:
    data = await _body(request)
    return await _save(
        request,
        "route_save",
        lambda doc: configfile.put_route(doc, None, configfile.route_table(data)),
    )


async def update_route(request: web.Request) -> web.Response:
    data = await _body(request)
    name = request.match_info["name"]

    def change(doc: tomlkit.TOMLDocument) -> int | None:
        if configfile.route_index(doc, name) is None:
            raise web.HTTPNotFound(text=f"no route named {name!r}")
        return configfile.put_route(doc, name, configfile.route_table(data))

    return await _save(request, "route_save", change)


async def delete_route(request: web.Request) -> web.Response:
    name = request.match_info["name"]

    def change(doc: tomlkit.TOMLDocument) -> int | None:
        if not configfile.delete_route(doc, name):
            raise web.HTTPNotFound(text=f"no route named {name!r}")
        return None

    return await _save(request, "route_delete", change)


async def put_rules(request: web.Request) -> web.Response:
    data = await _body(request)
    rules = data.get("rules")
    if not isinstance(rules, list) or not all(isinstance(r, dict) for r in rules):
        return web.json_response({"error": "rules must be a list of objects"}, status=400)

    def change(doc: tomlkit.TOMLDocument) -> int | None:
        configfile.set_rules(doc, rules)
        return None

    return await _save(request, "rules_save", change)


async def test_tls(request: web.Request) -> web.Response:
    """``relay test-tls`` on the unsaved form: the same probe, the same JSON per host."""
    from relay.errors import RelayError

    data = await _body(request)
    cfg = _services(request).config()
    old = data.get("original") or None
    try:
        candidate, index = await asyncio.to_thread(_candidate, cfg, old, data)
    except ConfigError as exc:
        problems = configfile.split_problems(exc.problems, _index_after(cfg, old))
        return web.json_response({"passed": False, "problems": problems}, status=422)
    route = candidate.routes[index]
    try:
        results = await testtls.probe_route(candidate, route)
    except RelayError as exc:
        return web.json_response({"passed": False, "error": exc.detail})
    hosts = [testtls.probe_json(route, r, candidate.tls.expiry_warning) for r in results]
    passed = bool(results) and all(r.passed for r in results)
    return web.json_response({"route": route.name, "passed": passed, "hosts": hosts})


async def queue_action(request: web.Request) -> web.Response:
    """flush, hold, release or delete the ``ids`` given (delete needs ``"confirm": true``)."""
    services = _services(request)
    action = request.match_info["action"]
    data = await _body(request)
    ids = data.get("ids")
    if (
        not isinstance(ids, list)
        or not ids
        or not all(isinstance(i, str) and _QUEUE_ID.fullmatch(i) for i in ids)
    ):
        return web.json_response({"error": "ids must be a non-empty list of queue ids"}, status=400)
    if action == "delete":
        if data.get("confirm") is not True:
            return web.json_response({"error": 'delete needs "confirm": true'}, status=400)
        result = await asyncio.to_thread(_delete, services, ids)
    else:
        try:
            result = await _perform(services, action, ids)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except control.ControlError as exc:
            return web.json_response({"error": str(exc)}, status=503)
    done = list(result.get("done", []))
    skipped = {k: list(v) for k, v in result.items() if k != "done" and v}
    session = _session(request)
    try:
        AuditLog(services.config().audit.path).record_queue(
            action, services.config().source, selection={"ids": ids}, ids=done,
            skipped=skipped, via="daemon", user=session.user, client=client_of(request),
        )  # fmt: skip
    except OSError as exc:
        return web.json_response({"done": done, "skipped": skipped, "warning": str(exc)})
    return web.json_response({"done": done, "skipped": skipped})


async def _perform(services: Services, action: str, ids: list[str]) -> dict[str, Any]:
    """flush, hold or release: this process's messages through its own control;
    with workers (relay.workers), another worker's through that worker's
    control files, as ``relay queue`` asks (relay.control)."""
    from relay import queuecli

    groups: dict[str, list[str]] = {}
    for qid in ids:
        groups.setdefault(str(queuecli.shard_of(services.spool, qid).path), []).append(qid)
    result: dict[str, Any] = {}
    for path, chosen in groups.items():
        if path == str(services.spool.path):
            part = await services.control.perform(action, chosen)
        else:
            submit = functools.partial(control.submit, Path(path), os.getppid(), action, chosen)
            part = await asyncio.to_thread(submit)
            if "error" in part:
                raise control.ControlError(str(part["error"]))
        for key, value in part.items():
            result.setdefault(key, []).extend(value)
    return result


def _delete(services: Services, ids: list[str]) -> dict[str, list[str]]:
    """As ``relay queue delete``: unlink; the scheduler drops what vanished under it."""
    from relay import queuecli

    done: list[str] = []
    missing: list[str] = []
    for qid in ids:
        spool = queuecli.shard_of(services.spool, qid)  # with workers, any worker's shard
        gone = spool.hold.delete(qid) if qid in spool.hold else spool.delete(qid)
        (done if gone else missing).append(qid)
    return {"done": done, "missing": missing}


def setup(app: web.Application) -> None:
    app[SAVE_LOCK] = asyncio.Lock()
    r = app.router
    r.add_get("/api/session", get_session)
    r.add_get("/api/status", get_status)
    r.add_get("/api/routes", get_routes)
    r.add_post("/api/routes", create_route)
    r.add_post("/api/routes/validate", validate_route)
    r.add_post("/api/routes/test-tls", test_tls)
    # A route name may hold any character, "/" included.
    r.add_put("/api/routes/{name:.+}", update_route)
    r.add_delete("/api/routes/{name:.+}", delete_route)
    r.add_get("/api/rules", get_rules)
    r.add_put("/api/rules", put_rules)
    r.add_get("/api/queue", get_queue)
    r.add_get("/api/queue/{qid}", get_message)
    r.add_post("/api/queue/{action:flush|hold|release|delete}", queue_action)
    r.add_get("/api/audit", get_audit)
