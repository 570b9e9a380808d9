"""The audit log: one JSON line per applied (or refused) configuration change.

The file at ``[audit] path`` is append-only. Each entry is written as one
line with a single ``write`` on a descriptor opened with ``O_APPEND`` and
then fsynced, so an entry is either wholly on disk or, after a crash in
the middle of the write, a torn last line that :meth:`AuditLog.entries`
skips and the next append starts after.

Entries (every one has ``time``, ISO 8601 UTC, ``event`` and ``path``):

- ``start``: ``sha256``, ``summary`` (route names, rule count) and
  ``changes`` (a :func:`relay.configdiff.diff` result). Against the last
  snapshot in the log when there is one, so edits made while the daemon
  was down show up; on the very first audited start, every route and rule
  counts as added (settings are the baseline, not listed).
- ``reload``: ``sha256_old``, ``sha256_new``, ``trigger``, ``unchanged``
  (true when nothing differs) and ``changes``.
- ``reload_refused``: ``trigger`` and ``problems`` (each as text); the old
  configuration keeps running, so no snapshot.

- ``console_route_save``, ``console_route_delete``, ``console_rules_save``:
  a change saved from the admin console (relay.console): ``user``,
  ``client`` (its address), ``applied`` (the reload took it) and
  ``changes`` (routes and rules as in :func:`relay.configdiff.diff`).

- ``queue_flush``, ``queue_hold``, ``queue_release``, ``queue_delete``:
  an operator's ``relay queue`` action: ``user``, ``selection`` (the ids
  or filters as given), ``count`` and ``ids`` (the messages it changed),
  ``skipped`` (asked for, not changed, and why: ``{"missing": [...]}``)
  and ``via`` (``daemon``: the running relay did it; ``spool``: no relay
  ran, the command changed the spool itself).

``start`` and ``reload`` entries also carry ``snapshot`` (the whole
effective configuration), which the next start diffs against.

Writes block (one small write and an fsync); reloads are rare, so the
daemon may call these from its event loop. They raise ``OSError`` when the
file cannot be written; the caller decides whether that is fatal.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from relay.config import Config
from relay.configdiff import diff, diff_is_empty, diff_snapshots, snapshot
from relay.configload import Problem


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _summary(config: Config) -> dict[str, Any]:
    return {"routes": [route.name for route in config.routes], "rules": len(config.rules)}


class AuditLog:
    """Appends audit entries to, and reads them back from, one file."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock

    # --- writing --------------------------------------------------------

    def record_start(self, config: Config) -> None:
        """Record that the daemon started with ``config`` and what changed since last time."""
        current = snapshot(config)
        previous = self._last_snapshot()
        if previous is None:
            # First audited start: the settings are the baseline; every
            # route and rule is "added".
            previous = dict(current, routes={}, rules=[])
        self._append(
            {
                "event": "start",
                "path": config.shown_source,
                "sha256": config.sha256,
                "summary": _summary(config),
                "changes": diff_snapshots(previous, current),
                "snapshot": current,
            }
        )

    def record_reload(self, old: Config, new: Config, trigger: str = "SIGHUP") -> None:
        """Record an applied reload from ``old`` to ``new`` (``unchanged`` if nothing differs)."""
        changes = diff(old, new)
        self._append(
            {
                "event": "reload",
                "path": new.shown_source,
                "trigger": trigger,
                "sha256_old": old.sha256,
                "sha256_new": new.sha256,
                "unchanged": diff_is_empty(changes),
                "summary": _summary(new),
                "changes": changes,
                "snapshot": snapshot(new),
            }
        )

    def record_refused(
        self, path: Path, problems: Sequence[Problem], trigger: str = "SIGHUP"
    ) -> None:
        """Record a reload refused because the new file is invalid; the old config runs on."""
        self._append(
            {
                "event": "reload_refused",
                "path": str(path),
                "trigger": trigger,
                "problems": [str(problem) for problem in problems],
            }
        )

    def record_queue(
        self,
        action: str,
        config_path: Path,
        *,
        selection: Mapping[str, Any],
        ids: Sequence[str],
        skipped: Mapping[str, Sequence[str]],
        via: str,
        user: str,
        client: str | None = None,
    ) -> None:
        """Record an operator's change to the queue (flush, hold, release, delete).

        ``client`` is the address the admin console was used from, if it was.
        """
        extra = {"client": client} if client is not None else {}
        self._append(
            {
                **extra,
                "event": f"queue_{action}",
                "path": str(config_path),
                "user": user,
                "selection": dict(selection),
                "count": len(ids),
                "ids": list(ids),
                "skipped": {why: list(which) for why, which in skipped.items() if which},
                "via": via,
            }
        )

    def record_console(
        self,
        action: str,
        config_path: Path,
        *,
        user: str,
        client: str,
        changes: Mapping[str, Any],
        applied: bool,
    ) -> None:
        """Record a change saved from the admin console: who, from where, what (route-level)."""
        self._append(
            {
                "event": f"console_{action}",
                "path": str(config_path),
                "user": user,
                "client": client,
                "applied": applied,
                "changes": dict(changes),
            }
        )

    def _append(self, entry: dict[str, Any]) -> None:
        line = json.dumps({"time": _stamp(self._clock()), **entry}, ensure_ascii=False)
        data = (line + "\n").encode("utf-8")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        try:
            size = os.fstat(fd).st_size
            # A crash mid-write may have left a torn line without its newline:
            # end it first so this entry starts on a line of its own.
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            view = memoryview(data)
            while view:  # a regular file rarely takes less, but may
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    # --- reading --------------------------------------------------------

    def entries(self) -> Iterator[dict[str, Any]]:
        """Every readable entry, oldest first; a missing file has none.

        Lines that are not a JSON object (a torn write after a crash) are
        skipped.
        """
        try:
            handle = self.path.open("rb")
        except FileNotFoundError:
            return
        with handle:
            for raw in handle:
                try:
                    entry = json.loads(raw)
                except ValueError:
                    continue
                if isinstance(entry, dict):
                    yield entry

    def _last_snapshot(self) -> dict[str, Any] | None:
        last = None
        for entry in self.entries():
            if isinstance(entry.get("snapshot"), dict):
                last = entry["snapshot"]
        return last


# --- reading for people -----------------------------------------------------


def _short(sha: Any) -> str:
    return f"{str(sha)[:8]}…" if sha else "?"


def _value(value: Any) -> str:
    if value is None:
        return "(none)"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, list):
        return "[" + ", ".join(_value(item) for item in value) + "]"
    return str(value)


def _change_lines(changes: Mapping[str, Any]) -> list[str]:
    lines = []
    for kind in ("routes", "rules"):
        table = changes.get(kind, {})
        # Route names print in double quotes, as in the TOML file; rules by position.
        label = _route_label if kind == "routes" else str
        for name in table.get("added", []):
            lines.append(f"{label(name)}: added")
        for name in table.get("removed", []):
            lines.append(f"{label(name)}: removed")
        for name, fields in table.get("changed", {}).items():
            lines.extend(
                _credentials_line(label(name), old, new)
                if field == "credentials"
                else f"{label(name)}: changed {field}: {_value(old)} → {_value(new)}"
                for field, (old, new) in fields.items()
            )
    for section, fields in changes.items():
        if section in ("routes", "rules"):
            continue
        lines.extend(
            f"{section}: changed {field}: {_value(old)} → {_value(new)}"
            for field, (old, new) in fields.items()
        )
    return lines


def _credentials_line(label: str, old: Any, new: Any) -> str:
    """A route's AUTH password changed: said without any trace of it."""
    if old is None:
        return f"{label}: credentials set"
    if new is None:
        return f"{label}: credentials removed"
    return f"{label}: credentials changed"


def _route_label(name: str) -> str:
    return f"route {json.dumps(name, ensure_ascii=False)}"


def format_entry(entry: Mapping[str, Any]) -> list[str]:
    """One entry as text lines: a head line, then indented details."""
    when, event = entry.get("time", "?"), entry.get("event", "?")
    by = f" by {entry['trigger']}" if entry.get("trigger") else ""
    if event == "start":
        head = f"{when} start sha256 {_short(entry.get('sha256'))} {entry.get('path', '')}"
    elif event == "reload":
        old, new = _short(entry.get("sha256_old")), _short(entry.get("sha256_new"))
        state = " unchanged" if entry.get("unchanged") else ""
        head = f"{when} reload sha256 {old}→{new}{by}{state}"
    elif event == "reload_refused":
        head = f"{when} reload refused{by}: {entry.get('path', '')} is invalid, old config kept"
    elif str(event).startswith("queue_"):
        return _queue_lines(entry)
    elif str(event).startswith("console_"):
        state = "" if entry.get("applied") else " (saved, NOT applied: see the log)"
        head = (
            f"{when} console {str(event).removeprefix('console_')} by {entry.get('user', '?')} "
            f"from {entry.get('client', '?')}{state}"
        )
    else:
        head = f"{when} {event}"
    lines = [head]
    summary = entry.get("summary")
    if isinstance(summary, dict):
        routes = len(summary.get("routes", []))
        lines.append(f"  {routes} route(s), {summary.get('rules', 0)} rule(s)")
    lines.extend(f"  {line}" for line in _change_lines(entry.get("changes", {})))
    lines.extend(f"  problem: {problem}" for problem in entry.get("problems", []))
    return lines


#: Queue ids printed per line of a queue action; the rest are counted.
_IDS_SHOWN = 10


def _queue_lines(entry: Mapping[str, Any]) -> list[str]:
    """A ``relay queue`` action: who did what to how many, which ids, what was skipped."""
    action = str(entry.get("event", "queue_?")).removeprefix("queue_")
    via = "by the running relay" if entry.get("via") == "daemon" else "in the spool (no relay ran)"
    frm = f" from {entry['client']}" if entry.get("client") else ""
    head = f"{entry.get('time', '?')} queue {action} by {entry.get('user', '?')}{frm}: "
    head += f"{entry.get('count', 0)} message(s), {via}"
    lines = [head]
    selection = entry.get("selection") or {}
    if selection:
        shown = ", ".join(f"{key}={_value(value)}" for key, value in selection.items())
        lines.append(f"  selection: {shown}")
    lines.append(f"  ids: {_ids(entry.get('ids', []))}")
    for why, ids in (entry.get("skipped") or {}).items():
        lines.append(f"  skipped ({why}): {_ids(ids)}")
    return lines


def _ids(ids: Sequence[str]) -> str:
    if not ids:
        return "(none)"
    more = len(ids) - _IDS_SHOWN
    return " ".join(ids[:_IDS_SHOWN]) + (f" (+{more} more; --json has all)" if more > 0 else "")
