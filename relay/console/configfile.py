"""The config file as the console edits it: tomlkit documents, validated, written atomically.

Edits go through a tomlkit document so that every comment, blank line
and key order the operator wrote stays as it was; only the tables the
console changes are touched (and inside an edited route, only its keys).
A candidate is validated by :func:`relay.configload.parse`, exactly what
``relay check-config`` and a reload run, before anything is written.
"""

from __future__ import annotations

import os
import tempfile
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import AoT

from relay import config as configmod
from relay import configload
from relay.config import Config
from relay.configload import ConfigError, Problem

#: The route keys the console writes; any other key of a route is left alone.
ROUTE_OPTIONS = ("mx_lookup", *configmod.toml_keys(configmod.TlsPolicy))


def read_only_reason(cfg: Config) -> str | None:
    """Why the console cannot change the config (None: it can)."""
    if cfg.shown_source == configmod.EMBEDDED:
        return "the relay runs on its embedded default config: there is no file to save to"
    path = cfg.source
    if not os.access(path, os.W_OK):
        return f"{path} is not writable by the relay (read-only file system or ConfigMap?)"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"{path.parent} is not writable: the file cannot be replaced atomically"
    return None


def load(cfg: Config) -> tomlkit.TOMLDocument:
    """The config's file as a tomlkit document (the embedded default's text for it)."""
    if cfg.shown_source == configmod.EMBEDDED:
        return tomlkit.parse(configload.embedded_text())
    return tomlkit.parse(cfg.source.read_text(encoding="utf-8"))


def route_table(form: Mapping[str, Any]) -> dict[str, Any]:
    """A route as the TOML file spells it, from the API's JSON form.

    Values are passed on as given (after turning digit strings into
    numbers): the validator, not this function, says what is wrong.
    """

    def number(value: Any) -> Any:
        if isinstance(value, str) and value.strip().isdigit():
            return int(value)
        return value

    table: dict[str, Any] = {"name": form.get("name", "")}
    if form.get("single", True):
        table["host"] = form.get("host", "")
        table["port"] = number(form.get("port", 25))
    else:
        for which in ("primary", "secondary"):
            rows = form.get(which) or []
            if which == "primary" or rows:
                table[which] = [
                    {"host": r.get("host", ""), "port": number(r.get("port", 25)),
                     "load": number(r.get("load"))}
                    for r in rows if isinstance(r, Mapping)
                ]  # fmt: skip
    for option in ROUTE_OPTIONS:
        if option in form:
            table[option] = form[option]
    if form.get("on_tls_failure"):
        table["on_tls_failure"] = form["on_tls_failure"]
    return table


def _routes(doc: tomlkit.TOMLDocument) -> AoT:
    if "routes" not in doc:
        doc.append("routes", tomlkit.aot())
    routes = doc["routes"]
    assert isinstance(routes, AoT)
    return routes


def route_index(doc: tomlkit.TOMLDocument, name: str) -> int | None:
    """The 0-based position of route ``name`` in the file."""
    for i, table in enumerate(_routes(doc)):
        if table.get("name") == name:
            return i
    return None


def _hosts_aot(rows: Sequence[Mapping[str, Any]]) -> AoT:
    aot = tomlkit.aot()
    for row in rows:
        item = tomlkit.table()
        for key, value in row.items():
            item[key] = value
        aot.append(item)
    return aot


def put_route(doc: tomlkit.TOMLDocument, old_name: str | None, table: Mapping[str, Any]) -> int:
    """Add (``old_name`` None) or replace a route; its 0-based index.

    A renamed route keeps its rules: each rule naming the old name is
    changed to the new one, as the console's own rename does.
    """
    routes = _routes(doc)
    index = route_index(doc, old_name) if old_name is not None else None
    if index is None:
        target = tomlkit.table()
        routes.append(target)
        index = len(routes) - 1
        target = routes[index]
    else:
        target = routes[index]
        # Keys the form owns are rewritten; unknown ones (a typo the
        # validator reports) stay so the operator sees them named.
        for key in ("host", "port", "primary", "secondary", "on_tls_failure", *ROUTE_OPTIONS):
            if key in target and key not in table:
                del target[key]
    for key, value in table.items():
        if key in ("primary", "secondary"):
            target[key] = _hosts_aot(value)
        else:
            target[key] = value
    new_name = table.get("name")
    if old_name is not None and new_name != old_name and "rules" in doc:
        for rule in doc["rules"]:
            if rule.get("route") == old_name:
                rule["route"] = new_name
    return index


def delete_route(doc: tomlkit.TOMLDocument, name: str) -> bool:
    index = route_index(doc, name)
    if index is None:
        return False
    del _routes(doc)[index]
    return True


def set_rules(doc: tomlkit.TOMLDocument, rules: Sequence[Mapping[str, Any]]) -> None:
    """Replace every rule, in the given order (first match wins)."""
    aot = tomlkit.aot()
    for rule in rules:
        table = tomlkit.table()
        table["recipients"] = list(rule.get("recipients") or [])
        table["route"] = rule.get("route", "")
        aot.append(table)
    if "rules" in doc:
        doc["rules"] = aot
    else:
        doc.append("rules", aot)


def validate(doc: tomlkit.TOMLDocument, source: Path) -> Config:
    """The document as the daemon would load it; raises ConfigError listing every problem."""
    text = tomlkit.dumps(doc)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("", "", f"TOML syntax error: {exc}")]) from None
    return configload.parse(data, source)


def split_problems(problems: Sequence[Problem], index: int | None) -> dict[str, Any]:
    """Problems of route ``index`` (0-based) by field, and the others as text.

    ``{"fields": {"primary": [...], "primary[2].port": [...], "route": [...]}, "other": [...]}``
    where "route" holds what concerns the route as a whole.
    """
    fields: dict[str, list[str]] = {}
    other: list[str] = []
    where = f"routes[{index + 1}]" if index is not None else None
    for problem in problems:
        if where and (problem.where == where or problem.where.startswith(where + " ")):
            fields.setdefault(problem.field or "route", []).append(problem.message)
        else:
            other.append(str(problem))
    return {"fields": fields, "other": other}


def write_atomic(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``: a temp file beside it, fsynced, renamed over it.

    A reader (or a crash) sees the old file or the new one, never half of
    one. The file keeps its permission bits.
    """
    mode = path.stat().st_mode & 0o7777
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fchmod(handle.fileno(), mode)
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
