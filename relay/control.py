"""Queue actions the running daemon carries out for ``relay queue``: flush, hold, release.

While it runs, the daemon owns the spool: it rewrites a message's
envelope after every attempt, so a second process that rewrote or moved
one meanwhile would lose that write, or have it undone. So the command
line never changes a scheduled message itself while a daemon runs; it
hands the daemon a request and waits for the answer:

1. ``relay queue`` checks that the daemon wrote its pid to
   ``<spool>/control/ready`` (:data:`READY`), writes ``<spool>/control/<id>.req`` (JSON: action and
   queue ids, or none for "all"), fsynced and renamed into place, then
   sends SIGUSR2 to the pid in the locked pid file;
2. the daemon claims the request (renames it to ``<id>.work``), carries
   it out with its own scheduler and spool, writes ``<id>.progress``
   every :data:`PROGRESS_EVERY` messages and finally ``<id>.done`` (the
   result, JSON), and removes the ``.work`` file;
3. the command line prints the progress as it comes, reads the result
   and removes it.

Only who may write the spool directory can ask: no port, no password. A
request the daemon has not claimed within :data:`CLAIM_TIMEOUT` is taken
back by the command line; requests left over from a crash are discarded
at the daemon's start (their command line gave up long ago).

Without a running daemon the command line acts on the spool itself,
holding the pid file's lock so that no daemon starts meanwhile
(relay.queuecli).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Callable, Sequence
from contextlib import suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any

from relay import events
from relay.envelope import Envelope
from relay.spool import Spool
from relay.spoolfiles import new_id

if TYPE_CHECKING:
    from relay.queue import Scheduler

#: The signal that says "a request is waiting" (SIGUSR1 stays "flush everything").
SIGNAL = signal.SIGUSR2

#: Messages per step of a long action, and per progress report.
PROGRESS_EVERY = 500

#: Seconds the command line waits for the daemon to claim a request.
CLAIM_TIMEOUT = 10.0

#: Seconds it waits for the result once claimed: a hold waits for the
#: attempts under way to end, and a large queue takes a while.
RESULT_TIMEOUT = 600.0

ACTIONS = ("flush", "hold", "release")

#: What relay.spoolfiles.new_id makes (ids are checked: they become file names).
_QUEUE_ID = re.compile(r"[0-9A-Za-z]{1,64}")


class ControlError(Exception):
    """The daemon did not take or did not answer a request."""


def control_dir(spool_path: Path) -> Path:
    return spool_path / "control"


#: Holds the pid of the daemon that takes requests. A relay from before
#: this module has no handler for SIGUSR2, whose default action ends the
#: process: the command line signals only the pid written here.
READY = "ready"


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """``data`` at ``path``, whole or not at all (fsynced temp file, rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --- the command line's side ---------------------------------------------------


def submit(
    spool_path: Path,
    pid: int,
    action: str,
    ids: Sequence[str] | None,
    progress: Callable[[int, int], None] = lambda done, total: None,
    claim_timeout: float = CLAIM_TIMEOUT,
    result_timeout: float = RESULT_TIMEOUT,
) -> dict[str, Any]:
    """Ask the daemon ``pid`` to carry out ``action`` on ``ids`` (None: all); its result.

    ``progress(done, total)`` is called as the daemon reports it. Raises
    ControlError when the daemon does not claim the request in time (the
    request is then withdrawn, so it never runs later) or does not finish.
    """
    folder = control_dir(spool_path)
    try:
        ready = (folder / READY).read_text().strip()
    except OSError:
        ready = ""
    if ready.isdigit() and ready != str(pid) and _parent(int(ready)) == pid:
        # A worker of the relay (relay.workers) owns this spool shard: ask it.
        pid = int(ready)
    elif ready != str(pid):
        raise ControlError(
            f"the running relay (pid {pid}) does not take queue requests for {spool_path}: "
            "it is older than this command, or that worker is starting again; retry, or "
            "restart the relay (`kill -USR1` flushes everything meanwhile)"
        )
    rid = new_id()
    request, work = folder / f"{rid}.req", folder / f"{rid}.work"
    done, report = folder / f"{rid}.done", folder / f"{rid}.progress"
    _write_json(request, {"action": action, "ids": None if ids is None else list(ids)})
    try:
        os.kill(pid, SIGNAL)
    except ProcessLookupError:
        request.unlink(missing_ok=True)
        raise ControlError(f"the relay (pid {pid}) has just stopped") from None
    start = time.monotonic()
    seen = ""
    while not done.exists():
        if request.exists() and time.monotonic() - start > claim_timeout:
            with suppress(FileNotFoundError):
                request.unlink()
                raise ControlError(f"the relay (pid {pid}) did not take the request")
        if time.monotonic() - start > result_timeout:
            raise ControlError(f"no answer from the relay (pid {pid}) in {result_timeout:.0f}s")
        if not _alive(pid):
            raise ControlError(f"the relay (pid {pid}) stopped before it answered")
        with suppress(OSError):
            text = report.read_text()
            if text != seen and text.strip():
                seen = text
                numbers = text.split()
                progress(int(numbers[0]), int(numbers[1]))
        time.sleep(0.05)
    result: dict[str, Any] = json.loads(done.read_text(encoding="utf-8"))
    for leftover in (done, report, work):
        leftover.unlink(missing_ok=True)
    return result


def _parent(pid: int) -> int:
    """The parent of ``pid`` (0 when it is gone), from /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    # The fields after the parenthesised command name (which may hold spaces).
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# --- the daemon's side -------------------------------------------------------------


class Control:
    """Carries out requests in ``<spool>/control`` on SIGUSR2, one at a time."""

    def __init__(
        self, spool: Spool, scheduler: Scheduler, on_flush: Callable[[], None] = lambda: None
    ) -> None:
        self._spool = spool
        self._scheduler = scheduler
        #: Called before every flush (the daemon ends host hold-downs there).
        self._on_flush = on_flush
        self._folder = control_dir(spool.path)
        self._wake = asyncio.Event()

    def open(self) -> None:
        """At start: discard requests from before (their command line gave up),
        and say that this process takes requests (:data:`READY`)."""
        self._folder.mkdir(parents=True, exist_ok=True)
        for path in self._folder.iterdir():
            if path.suffix == ".req" or path.suffix == ".work":
                events.warning("control_discarded", request=path.stem)
            path.unlink(missing_ok=True)
        _write_text(self._folder / READY, f"{os.getpid()}\n")

    def close(self) -> None:
        """At stop: no more requests taken here."""
        with suppress(OSError):
            (self._folder / READY).unlink()

    def wake(self) -> None:
        """The signal handler: look for requests."""
        self._wake.set()

    async def run(self) -> None:
        while True:
            await self._wake.wait()
            # Cleared before the scan: a request renamed into place before
            # its signal is seen by this scan or by the next one.
            self._wake.clear()
            for request in sorted(self._folder.glob("*.req")):
                await self._handle(request)

    async def _handle(self, request: Path) -> None:
        work = request.with_suffix(".work")
        try:
            os.replace(request, work)  # claimed: the command line no longer withdraws it
            data = json.loads(work.read_text(encoding="utf-8"))
            action, ids = data["action"], data["ids"]
            if action not in ACTIONS or not (ids is None or isinstance(ids, list)):
                raise ValueError(f"unknown request {action!r}")
            if ids is not None and not all(_QUEUE_ID.fullmatch(str(qid)) for qid in ids):
                # Ids become file names: nothing but a queue id's characters.
                raise ValueError("a queue id may only hold letters and digits")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            events.error("control_refused", request=request.stem, error=str(exc))
            await asyncio.to_thread(self._answer, request.stem, {"error": str(exc)})
            return
        reporter = _Reporter(self._folder / f"{request.stem}.progress")
        try:
            result = await self._act(action, ids, reporter)
        except Exception as exc:  # answer, whatever happened: the command line waits
            events.error("control_failed", request=request.stem, action=action, exc_info=True)
            result = {"error": f"{type(exc).__name__}: {exc}"}
        events.log("control", request=request.stem, action=action, **_counts(result))
        await asyncio.to_thread(self._answer, request.stem, result)

    def _answer(self, rid: str, result: dict[str, Any]) -> None:
        _write_json(self._folder / f"{rid}.done", result)
        (self._folder / f"{rid}.work").unlink(missing_ok=True)

    async def perform(self, action: str, ids: list[str] | None) -> dict[str, Any]:
        """Carry out ``action`` in the daemon's own process (the admin console).

        The same work as a request from ``relay queue``, with no files or
        signal: the result has the same keys (``done``, and why others
        were skipped).
        """
        if action not in ACTIONS:
            raise ValueError(f"unknown action {action!r}")
        return await self._act(action, ids, _Reporter(None))

    async def _act(self, action: str, ids: list[str] | None, reporter: _Reporter) -> dict[str, Any]:
        if action == "flush":
            return self._flush(ids)
        if ids is None:
            ids = self._spool.hold.ids() if action == "release" else []
        if action == "hold":
            return await self._hold(ids, reporter)
        return await self._release(ids, reporter)

    def _flush(self, ids: list[str] | None) -> dict[str, Any]:
        self._on_flush()
        flushed = self._scheduler.flush(ids)
        if ids is None:
            return {"done": flushed}
        chosen = set(flushed)
        rest = [qid for qid in ids if qid not in chosen]
        return {
            "done": flushed,
            "running": [qid for qid in rest if qid in self._scheduler],
            "held": [qid for qid in rest if qid in self._spool.hold],
            "missing": [q for q in rest if q not in self._scheduler and q not in self._spool.hold],
        }

    async def _hold(self, ids: list[str], reporter: _Reporter) -> dict[str, Any]:
        done: list[str] = []
        held: list[str] = []
        missing: list[str] = []
        for start in range(0, len(ids), PROGRESS_EVERY):
            batch = ids[start : start + PROGRESS_EVERY]
            taken = []
            for qid in batch:
                if await self._scheduler.withdraw(qid):
                    taken.append(qid)
                elif qid in self._spool.hold:
                    held.append(qid)
                else:
                    missing.append(qid)
            try:
                moved = await asyncio.to_thread(self._spool.hold.add, taken)
            except OSError:
                await self._requeue(taken, held=False)
                raise
            done += moved
            gone = set(taken) - set(moved)
            missing += [qid for qid in taken if qid in gone]  # deleted meanwhile
            reporter.report(start + len(batch), len(ids))
        return {"done": done, "already": held, "missing": missing}

    async def _release(self, ids: list[str], reporter: _Reporter) -> dict[str, Any]:
        done: list[str] = []
        missing: list[str] = []
        queued: list[str] = []
        for start in range(0, len(ids), PROGRESS_EVERY):
            batch = ids[start : start + PROGRESS_EVERY]
            moved = await asyncio.to_thread(self._spool.hold.release, batch)
            await self._requeue(moved, held=True)
            done += moved
            for qid in set(batch) - set(moved):
                (queued if qid in self._scheduler else missing).append(qid)
            reporter.report(start + len(batch), len(ids))
        return {"done": done, "already": sorted(queued), "missing": sorted(missing)}

    async def _requeue(self, ids: list[str], held: bool) -> None:
        """Schedule messages back in ``msg/``; released (``held``) ones are due at once."""
        for envelope in await asyncio.to_thread(self._load, ids):
            self._scheduler.add(envelope)
        if held and ids:
            self._scheduler.flush(ids)

    def _load(self, ids: list[str]) -> list[Envelope]:
        """The envelopes of ``ids`` (blocking: one thread hop per batch)."""
        envelopes = []
        for qid in ids:
            with suppress(KeyError, ValueError, TypeError):
                # Deleted meanwhile, or unreadable: the next start sees to it.
                envelopes.append(self._spool.load(qid))
        return envelopes


class _Reporter:
    """Writes ``done total`` for the command line to show, at most every few hundred."""

    def __init__(self, path: Path | None) -> None:
        #: None: nobody watches (an in-process action).
        self._path = path

    def report(self, done: int, total: int) -> None:
        if self._path is None:
            return
        with suppress(OSError):  # progress is a courtesy; the result is what counts
            _write_text(self._path, f"{done} {total}\n")


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _counts(result: dict[str, Any]) -> dict[str, Any]:
    return {key: len(value) if isinstance(value, list) else value for key, value in result.items()}
