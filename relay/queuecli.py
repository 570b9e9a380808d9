"""``relay queue``: list, show, flush, hold, release and delete, as postqueue/postsuper do.

Reading (list, show) never changes the spool and never needs the daemon.
Changes go where they are safe:

- flush, hold, release: through the running daemon (relay.control), which
  owns every scheduled message; without a daemon, hold and release move
  the files themselves while holding the pid file's lock (no daemon can
  start meanwhile), and flush has nothing to do.
- delete: unlinks the files directly; the daemon copes with a message
  that vanishes under it (relay.queue: "no longer in the spool").

Every change is appended to the audit log (relay.audit). Actions over many
messages report progress on stderr every ``control.PROGRESS_EVERY``.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import getpass
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from relay import control, shards
from relay.audit import AuditLog
from relay.config import Config
from relay.configvalues import parse_duration
from relay.cycle import route_of
from relay.envelope import Envelope, RcptState, Recipient
from relay.spool import Spool
from relay.spoolbody import IN_MEMORY_MAX, BodyFile

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2

#: How long to wait for a starting daemon to write its pid.
_PID_WAIT = 5.0


@dataclass(frozen=True, slots=True)
class Entry:
    """One queued message as the commands see it."""

    envelope: Envelope
    held: bool
    #: The spool shard it is in (relay.shards); None: the one spool.
    spool: Spool | None = field(default=None, compare=False)

    @property
    def id(self) -> str:
        return self.envelope.id


# --- selecting messages ----------------------------------------------------------


def add_filters(parser: argparse.ArgumentParser) -> None:
    """The filters shared by list, flush, hold, release and delete."""
    parser.add_argument("--route", metavar="NAME", help="a pending recipient takes this route now")
    parser.add_argument("--domain", metavar="DOMAIN", help="a pending recipient is at DOMAIN")
    parser.add_argument("--rcpt", metavar="ADDRESS", help="a pending recipient is ADDRESS")
    parser.add_argument(
        "--deferred", action="store_true", help="tried and deferred at least once (not new mail)"
    )
    parser.add_argument(
        "--older-than", metavar="DURATION", type=_duration, help="received more than DURATION ago"
    )
    parser.add_argument("--held", action="store_true", help="on hold only")


class _Age(float):
    """Seconds, remembering the text they were given as (for the audit log)."""

    text = ""


def _duration(text: str) -> _Age:
    try:
        age = _Age(parse_duration(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    age.text = text
    return age


_FILTERS = ("route", "domain", "rcpt", "deferred", "older_than", "held")


def _filters(args: argparse.Namespace) -> dict[str, Any]:
    """The filters given, by name (for the audit log)."""
    out = {}
    for name in _FILTERS:
        value = getattr(args, name, None)
        if value not in (None, False):
            out[name.replace("_", "-")] = value.text if isinstance(value, _Age) else value
    return out


def spools(spool: Spool) -> list[Spool]:
    """``spool`` and its shards, one per worker process (relay.shards): the
    commands see every message, whichever worker holds it."""
    return [spool] + [Spool(path) for path in shards.shard_paths(spool.path)[1:]]


def _load(spool: Spool, unreadable: list[str]) -> list[Entry]:
    """Every message, waiting and held, oldest first (read-only)."""
    entries: list[Entry] = []
    for shard in spools(spool):
        waiting = shard.load_all(quarantine=False, unreadable=unreadable)
        entries += [Entry(e, False, shard) for e in waiting]
        entries += [Entry(e, True, shard) for e in shard.hold.load_all(unreadable)]
    return sorted(entries, key=lambda e: (e.envelope.received_at, e.id))


def shard_of(spool: Spool, qid: str) -> Spool:
    """The shard that holds ``qid`` (``spool`` itself when none does)."""
    return next((s for s in spools(spool) if qid in s.hold or s.has_body(qid)), spool)


def _matches(entry: Entry, args: argparse.Namespace, cfg: Config, now: float) -> bool:
    env = entry.envelope
    pending = env.pending
    if args.held and not entry.held:
        return False
    if args.older_than is not None and now - env.received_at <= args.older_than:
        return False
    if args.deferred and not any(r.last_reply for r in pending):
        return False
    if args.rcpt and not any(r.address.lower() == args.rcpt.lower() for r in pending):
        return False
    domain = (args.domain or "").lower().lstrip("@")
    if domain and not any(r.address.rpartition("@")[2].lower() == domain for r in pending):
        return False
    if args.route:
        routes = {_route_name(cfg, env, r) for r in pending}
        if args.route not in routes:
            return False
    return True


def _route_name(cfg: Config, env: Envelope, rcpt: Recipient) -> str:
    route = route_of(cfg, env, rcpt.address)
    return route.name if route is not None else ""


def _select(
    args: argparse.Namespace, cfg: Config, spool: Spool, unreadable: list[str]
) -> tuple[list[Entry], list[str]]:
    """The messages ``args`` names: (matching entries, ids asked for and not found)."""
    now = time.time()
    entries = [e for e in _load(spool, unreadable) if _matches(e, args, cfg, now)]
    ids = getattr(args, "ids", None) or []
    if not ids:
        return entries, []
    by_id = {e.id: e for e in entries}
    return [by_id[q] for q in ids if q in by_id], [q for q in ids if q not in by_id]


def _selection(args: argparse.Namespace) -> dict[str, Any]:
    selection: dict[str, Any] = _filters(args)
    if getattr(args, "ids", None):
        selection["ids"] = list(args.ids)
    if getattr(args, "all", False):
        selection["all"] = True
    return selection


# --- list and show -----------------------------------------------------------------


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _error_line(rcpt: Recipient) -> str:
    """The last error as the list and show print it: reply, host, cause."""
    text = str(rcpt.last_reply)
    if rcpt.remote_mta:
        text += f" (at {rcpt.remote_mta})"
    if rcpt.last_cause:
        text += f": {rcpt.last_cause}"
    return text


def _print_errors(tried: Sequence[Recipient]) -> None:
    """Each distinct last error once: the reply, then the host and the cause.

    With more than one, each names the recipients it is about.
    """
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in tried:
        groups.setdefault((str(r.last_reply), r.remote_mta, r.last_cause), []).append(r.address)
    indent = " " * 42
    for (reply, host, why), addresses in sorted(groups.items()):
        whom = f" ({', '.join(addresses)})" if len(groups) > 1 else ""
        print(f"{indent}last error: {reply}{whom}")
        if host or why:
            where = f"at {host}" if host else "cause"
            print(f"{indent}  {where}{': ' + why if why else ''}")


def _rcpt_json(cfg: Config, env: Envelope, rcpt: Recipient) -> dict[str, Any]:
    reply = rcpt.last_reply
    return {
        "address": rcpt.address,
        "state": rcpt.state.value,
        "route": _route_name(cfg, env, rcpt) or None if rcpt.state is RcptState.PENDING else None,
        "attempts": rcpt.attempts,
        "last_reply": str(reply) if reply else None,
        "last_cause": rcpt.last_cause or None,
        "remote_mta": rcpt.remote_mta or None,
    }


def _entry_json(cfg: Config, entry: Entry, now: float) -> dict[str, Any]:
    env = entry.envelope
    return {
        "id": env.id,
        "held": entry.held,
        "sender": env.mail_from,
        "received": _stamp(env.received_at),
        "age_seconds": round(now - env.received_at),
        "next_attempt": None if entry.held or not env.next_attempt else _stamp(env.next_attempt),
        "attempts": env.attempts,
        "size": env.size,
        "is_bounce": env.is_bounce,
        "recipients": [_rcpt_json(cfg, env, r) for r in env.recipients],
    }


def cmd_list(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    now = time.time()
    unreadable: list[str] = []
    entries, _ = _select(args, cfg, spool, unreadable)
    corrupt = sorted({q for s in spools(spool) for q in s.quarantine.ids()} | set(unreadable))
    if args.json:
        report = {
            "messages": [_entry_json(cfg, e, now) for e in entries],
            "total": len(entries),
            "pending_recipients": sum(len(e.envelope.pending) for e in entries),
            "corrupt": corrupt,
        }
        print(json.dumps(report, indent=2, ensure_ascii=False))
        return EXIT_OK
    print(f"{'ID':<26} {'AGE':>5} {'NEXT':>6}  SENDER -> PENDING RECIPIENTS / LAST ERROR")
    pending = 0
    for entry in entries:
        env = entry.envelope
        waiting = env.pending
        pending += len(waiting)
        if entry.held:
            nxt = "held"
        else:
            nxt = "now" if env.next_attempt <= now else _age(env.next_attempt - now)
        rcpts = ", ".join(r.address for r in waiting)
        print(
            f"{env.id:<26} {_age(now - env.received_at):>5} {nxt:>6}  <{env.mail_from}> -> {rcpts}"
        )
        _print_errors([r for r in waiting if r.last_reply])
    held = sum(e.held for e in entries)
    print(f"-- {len(entries)} message(s), {pending} pending recipient(s), {held} held")
    if corrupt:
        print(
            f"warning: {len(corrupt)} corrupt message(s) (unreadable envelope) not listed and "
            f"never delivered: set aside in {spool.corrupt_dir} (see docs/queue.md)"
        )
    return EXIT_OK


def cmd_show(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    spool = shard_of(spool, args.id)
    held = args.id in spool.hold
    try:
        env = (spool.hold if held else spool).load(args.id)
    except KeyError:
        print(f"no message {args.id} in the queue ({spool.path})", file=sys.stderr)
        return EXIT_FAIL
    except (ValueError, TypeError) as exc:
        print(f"message {args.id}: unreadable envelope ({exc})", file=sys.stderr)
        return EXIT_FAIL
    _print_envelope(env, held)
    print()
    try:
        # The header section only: a large body is not read whole.
        opened = (spool.hold if held else spool).open_body(env.id, IN_MEMORY_MAX)
        if isinstance(opened, BodyFile):
            with opened:
                body = opened.head(IN_MEMORY_MAX)
        else:
            body = opened
    except FileNotFoundError:
        # A delete cut short (or running now): the daemon drops the rest.
        print(f"(the message body is gone: {env.id} is being deleted)")
        return EXIT_OK
    headers, _, _ = body.partition(b"\r\n\r\n")
    print(headers.decode("utf-8", "replace").replace("\r\n", "\n"))
    return EXIT_OK


def _print_envelope(env: Envelope, held: bool) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(env.received_at))
    print(f"id:          {env.id}")
    print(f"from:        <{env.mail_from}>")
    print(f"received:    {stamp} from {env.client.ip or 'local'} (helo {env.client.helo or '-'})")
    print(f"size:        {env.size} bytes")
    print(f"attempts:    {env.attempts}")
    if held:
        print("held:        yes (never tried until `relay queue release`)")
    elif env.next_attempt:
        nxt = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(env.next_attempt))
        print(f"next try:    {nxt}")
    for r in env.recipients:
        line = f"to:          <{r.address}> {r.state.value}"
        if r.state is not RcptState.DELIVERED and r.last_reply:
            line += f" ({_error_line(r)})"
        print(line)


# --- actions -------------------------------------------------------------------------


@contextlib.contextmanager
def _spool_owner(cfg: Config) -> Iterator[int | None]:
    """The running relay's pid; or None while this process holds the spool.

    The daemon holds LOCK_EX on its pid file while it runs (relay.app.PidFile).
    When we get that lock instead, no relay runs, and none can start until
    we let go: the files are ours to change.
    """
    cfg.pid_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(cfg.pid_file, os.O_RDONLY | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + _PID_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                if text.isdigit():
                    yield int(text)
                    return
                if time.monotonic() > deadline:
                    raise control.ControlError("a relay holds the spool but wrote no pid") from None
                time.sleep(0.1)  # starting: the pid comes once its signals are set
                continue
            yield None
            return
    finally:
        os.close(fd)  # also releases our lock


class _Progress:
    """A line on stderr every PROGRESS_EVERY messages of a long action."""

    def __init__(self, action: str) -> None:
        self._action = action
        self._last = 0

    def __call__(self, done: int, total: int) -> None:
        if done >= self._last + control.PROGRESS_EVERY or (done == total and done > self._last):
            if total > control.PROGRESS_EVERY:
                print(f"{self._action}: {done}/{total} message(s)", file=sys.stderr, flush=True)
            self._last = done


def _audit(
    cfg: Config,
    action: str,
    args: argparse.Namespace,
    ids: Sequence[str],
    skipped: dict[str, list[str]],
    via: str,
) -> None:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = f"uid {os.getuid()}"
    try:
        AuditLog(cfg.audit.path).record_queue(
            action, cfg.source, selection=_selection(args), ids=ids, skipped=skipped,
            via=via, user=user,
        )  # fmt: skip
    except OSError as exc:
        print(f"warning: not written to the audit log {cfg.audit.path}: {exc}", file=sys.stderr)


def _report(action: str, done: Sequence[str], skipped: dict[str, list[str]]) -> None:
    print(f"{action}: {len(done)} message(s)")
    for qid in done:
        print(f"  {qid}")
    for why, ids in skipped.items():
        for qid in ids:
            print(f"  {qid}: skipped, {_WHY.get(why, why)}")


_WHY = {
    "missing": "no such message",
    "held": "on hold",
    "running": "an attempt of it is running now",
    "not_held": "not on hold",
}


def _needs_selection(args: argparse.Namespace, action: str) -> bool:
    if args.ids or args.all or _filters(args):
        return False
    print(f"queue {action}: name the messages: ID..., --all, or filters", file=sys.stderr)
    return True


def _daemon_result(
    cfg: Config, spool: Spool, pid: int, action: str, ids: list[str] | None
) -> tuple[list[str], dict[str, list[str]]] | None:
    """The daemon's answer; with workers, each shard's worker answers for its ids."""
    done: list[str] = []
    skipped: dict[str, list[str]] = {}
    for shard, chosen in _by_shard(spool, ids):
        try:
            result = control.submit(shard.path, pid, action, chosen, _Progress(action))
        except control.ControlError as exc:
            _failed(action, exc)
            return None
        if "error" in result:
            print(f"queue {action}: the relay failed: {result['error']}", file=sys.stderr)
            return None
        done += result["done"]
        for key, value in result.items():
            if key != "done" and value:
                skipped.setdefault(key, []).extend(value)
    return done, skipped


def _by_shard(spool: Spool, ids: list[str] | None) -> list[tuple[Spool, list[str] | None]]:
    """``ids`` grouped by the shard that holds them; None (all) goes to every shard.
    An id no shard holds goes to the first, which answers "missing"."""
    every = spools(spool)
    if ids is None:
        return [(shard, None) for shard in every]
    groups: dict[str, list[str]] = {}
    for qid in ids:
        groups.setdefault(str(shard_of(spool, qid).path), []).append(qid)
    return [(s, groups[str(s.path)]) for s in every if str(s.path) in groups] or [(spool, [])]


def cmd_flush(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    """Retry now, backoff restarted: everything (no selection) or the messages named."""
    everything = not (args.ids or _filters(args))
    skipped: dict[str, list[str]] = {}
    ids: list[str] | None = None
    if not everything:
        entries, missing = _select(args, cfg, spool, [])
        ids = [e.id for e in entries if not e.held]
        skipped = {"missing": missing, "held": [e.id for e in entries if e.held]}
    try:
        return _flush(args, cfg, spool, everything, ids, skipped)
    except control.ControlError as exc:
        return _failed("flush", exc)


def _flush(
    args: argparse.Namespace,
    cfg: Config,
    spool: Spool,
    everything: bool,
    ids: list[str] | None,
    skipped: dict[str, list[str]],
) -> int:
    with _spool_owner(cfg) as pid:
        if pid is None:
            # The embedded default has no file to name (relay.app.EMBEDDED).
            run = (
                "relay run"
                if cfg.source.name.startswith("(")
                else f"relay run --config {cfg.source}"
            )
            print(
                f"no running relay found (pid file {cfg.pid_file}); queued mail is tried "
                f"when it starts: `{run}`",
                file=sys.stderr,
            )
            return EXIT_FAIL
        outcome = _daemon_result(cfg, spool, pid, "flush", ids)
    if outcome is None:
        return EXIT_FAIL
    done, more = outcome
    for why, which in more.items():
        skipped.setdefault(why, []).extend(which)
    skipped = {k: v for k, v in skipped.items() if v}
    _audit(cfg, "flush", args, done, skipped, "daemon")
    if everything:
        print(f"flush: {len(done)} message(s) due now, backoff restarted (relay pid {pid})")
        return EXIT_OK
    _report("flush", done, skipped)
    return EXIT_FAIL if args.ids and not done else EXIT_OK


def cmd_hold(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    return _move(args, cfg, spool, "hold")


def cmd_release(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    return _move(args, cfg, spool, "release")


def _failed(action: str, exc: control.ControlError) -> int:
    print(f"queue {action}: {exc}; nothing changed by this command", file=sys.stderr)
    return EXIT_FAIL


def _move(args: argparse.Namespace, cfg: Config, spool: Spool, action: str) -> int:
    if _needs_selection(args, action):
        return EXIT_USAGE
    entries, missing = _select(args, cfg, spool, [])
    holding = action == "hold"
    ids = [e.id for e in entries if e.held != holding]
    # Named for the list: "held" (hold: already), "not_held" (release: nothing to do).
    already = "held" if holding else "not_held"
    skipped = {"missing": missing, already: [e.id for e in entries if e.held == holding]}
    try:
        with _spool_owner(cfg) as pid:
            if pid is not None:
                outcome = _daemon_result(cfg, spool, pid, action, ids)
                if outcome is None:
                    return EXIT_FAIL
                done, more = outcome
                via = "daemon"
            else:
                done, more = [], {}
                for shard, chosen in _by_shard(spool, ids):
                    done += _move_files(shard, action, chosen or [])
                via = "spool"
    except control.ControlError as exc:
        return _failed(action, exc)
    for why, which in more.items():
        skipped.setdefault(already if why == "already" else why, []).extend(which)
    if via == "spool":
        missed = set(ids) - set(done)  # deleted meanwhile
        skipped["missing"] += [q for q in ids if q in missed]
    skipped = {k: v for k, v in skipped.items() if v}
    if done or skipped:
        _audit(cfg, action, args, done, skipped, via)
    _report(action, done, skipped)
    return EXIT_FAIL if skipped.get("missing") and not done else EXIT_OK


def _move_files(spool: Spool, action: str, ids: list[str]) -> list[str]:
    """Hold or release without a daemon (the caller holds the pid file's lock)."""
    progress = _Progress(action)
    done: list[str] = []
    step = control.PROGRESS_EVERY
    for start in range(0, len(ids), step):
        batch = ids[start : start + step]
        if action == "hold":
            done += spool.hold.add(batch)
        else:
            moved = spool.hold.release(batch)
            envelopes = []
            for qid in moved:
                with contextlib.suppress(KeyError, ValueError, TypeError):
                    envelopes.append(spool.load(qid))  # unreadable: the daemon quarantines it
            for env in envelopes:
                # Tried as soon as a relay starts, backoff restarted (as a
                # running relay does on release).
                env.next_attempt, env.backoff_from = 0.0, env.attempts
            spool.update_many(envelopes)
            done += moved
        progress(start + len(batch), len(ids))
    return done


def cmd_delete(args: argparse.Namespace, cfg: Config, spool: Spool) -> int:
    if _needs_selection(args, "delete"):
        return EXIT_USAGE
    unreadable: list[str] = []
    entries, missing = _select(args, cfg, spool, unreadable)
    if len(entries) > 1 and not args.yes:
        print(
            f"queue delete: {len(entries)} messages match; nothing deleted. "
            "Add --yes to delete them all (`relay queue list` with the same filters shows them).",
            file=sys.stderr,
        )
        return EXIT_FAIL
    progress = _Progress("delete")
    done: list[str] = []
    for index, entry in enumerate(entries, 1):
        # Direct: the daemon drops a message that vanished under it.
        shard = entry.spool or spool
        gone = shard.hold.delete(entry.id) if entry.held else shard.delete(entry.id)
        if gone:
            done.append(entry.id)
        else:
            missing.append(entry.id)
        progress(index, len(entries))
    skipped = {"missing": missing} if missing else {}
    if done or skipped:
        _audit(cfg, "delete", args, done, skipped, "spool")
    print(f"deleted {len(done)} message(s)")
    for qid in done:
        print(f"  {qid}")
    for qid in missing:
        print(f"no message {qid} in the queue", file=sys.stderr)
    return EXIT_OK if done or not missing else EXIT_FAIL
