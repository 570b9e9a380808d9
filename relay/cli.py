"""The ``relay`` command line: argument parsing, printing and exit codes only.

Exit codes: 0 success, 1 operational failure (a TLS test failed, no
daemon to signal, no such message), 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import fcntl
import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from relay import config as configmod
from relay import errors, routing
from relay.config import Config, ConfigError, Route
from relay.dns import DnsResolver, Resolver
from relay.envelope import Envelope, RcptState
from relay.routing import Candidate
from relay.spool import IN_MEMORY_MAX, BodyFile, Spool

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_CONFIG = 2


def _load(args: argparse.Namespace) -> Config:
    return configmod.load(configmod.default_path(args.config))


def _print_problems(error: ConfigError) -> None:
    count = len(error.problems)
    print(f"{error.path}: invalid configuration, {count} problem(s):", file=sys.stderr)
    for problem in error.problems:
        print(f"  - {problem}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    cfg = _load(args)
    print(f"{cfg.source}: valid, {len(cfg.routes)} route(s), {len(cfg.rules)} rule(s)")
    for line in configmod.describe(cfg):
        print(f"  {line}")
    return EXIT_OK


def _daemon_config_path(args: argparse.Namespace) -> Path | None:
    """The config for ``run`` and ``queue``: None means the embedded default.

    That default applies only when nothing names a config (no --config, no
    $RELAY_CONFIG) and config/relay.toml does not exist.
    """
    path = configmod.default_path(args.config)
    named = args.config or os.environ.get("RELAY_CONFIG")
    return path if named or path.exists() else None


def _load_daemon(args: argparse.Namespace) -> Config:
    from relay import app

    path = _daemon_config_path(args)
    return app.default_config() if path is None else configmod.load(path)


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here so that check-config and queue commands stay light.
    from relay.app import run

    return run(_daemon_config_path(args))


def _read_pid(cfg: Config) -> int | None:
    """The pid of the relay running on this spool, or None.

    The pid is trusted only while its file is locked: the daemon holds
    LOCK_EX on it (relay.app.PidFile) for as long as it runs. A file we can
    lock is stale (a relay killed with -9), and its pid may by now belong
    to an unrelated process that our signal would terminate.
    """
    try:
        fd = os.open(cfg.pid_file, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else None
        return None  # we got the lock: no relay holds it
    finally:
        os.close(fd)  # also releases our lock


def _signal_daemon(cfg: Config, sig: signal.Signals, what: str) -> int:
    pid = _read_pid(cfg)
    if pid is None:
        print(
            f"no running relay found (pid file {cfg.pid_file}); start it with "
            f"`relay run --config {cfg.source}`",
            file=sys.stderr,
        )
        return EXIT_FAIL
    os.kill(pid, sig)
    print(f"{what}: sent {sig.name} to relay pid {pid}")
    return EXIT_OK


def cmd_reload(args: argparse.Namespace) -> int:
    """Validate here first, so the operator sees the problems at once.

    An invalid file is not sent to the daemon: it exits 2 with the list,
    and the daemon keeps its current config (a bare SIGHUP with the same
    file would be refused by the daemon, logged and audited).
    """
    try:
        cfg = _load(args)
    except ConfigError as exc:
        _print_problems(exc)
        print("not reloaded: the running relay keeps its current config", file=sys.stderr)
        return EXIT_CONFIG
    return _signal_daemon(cfg, signal.SIGHUP, "reload")


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def _spool(cfg: Config) -> Spool:
    spool = Spool(cfg.queue.path)
    spool.msg_dir.mkdir(parents=True, exist_ok=True)
    return spool


def cmd_queue_list(args: argparse.Namespace) -> int:
    cfg = _load_daemon(args)
    now = time.time()
    total = pending = 0
    spool = _spool(cfg)
    unreadable: list[str] = []
    print(f"{'ID':<26} {'AGE':>5} {'NEXT':>6}  SENDER -> PENDING RECIPIENTS / LAST ERROR")
    # Read-only: an unreadable envelope is reported, never moved (the daemon does that).
    for env in spool.load_all(quarantine=False, unreadable=unreadable):
        total += 1
        waiting = env.pending
        pending += len(waiting)
        nxt = "now" if env.next_attempt <= now else _age(env.next_attempt - now)
        sender = f"<{env.mail_from}>"
        rcpts = ", ".join(r.address for r in waiting)
        print(f"{env.id:<26} {_age(now - env.received_at):>5} {nxt:>6}  {sender} -> {rcpts}")
        errors = {str(r.last_reply) for r in waiting if r.last_reply}
        for err in sorted(errors):
            print(f"{'':<42}last error: {err}")
    print(f"-- {total} message(s), {pending} pending recipient(s)")
    corrupt = len(set(spool.quarantined()) | set(unreadable))
    if corrupt:
        print(
            f"warning: {corrupt} corrupt message(s) (unreadable envelope) not listed and "
            f"never delivered: set aside in {spool.corrupt_dir} (see docs/queue.md)"
        )
    return EXIT_OK


def cmd_queue_show(args: argparse.Namespace) -> int:
    cfg = _load_daemon(args)
    spool = _spool(cfg)
    try:
        env = spool.load(args.id)
    except KeyError:
        print(f"no message {args.id} in the queue ({spool.path})", file=sys.stderr)
        return EXIT_FAIL
    except (ValueError, TypeError) as exc:
        print(f"message {args.id}: unreadable envelope ({exc})", file=sys.stderr)
        return EXIT_FAIL
    _print_envelope(env)
    print()
    try:
        # The header section only: a large body is not read whole.
        opened = spool.open_body(env.id, IN_MEMORY_MAX)
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


def _print_envelope(env: Envelope) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(env.received_at))
    print(f"id:          {env.id}")
    print(f"from:        <{env.mail_from}>")
    print(f"received:    {stamp} from {env.client.ip or 'local'} (helo {env.client.helo or '-'})")
    print(f"size:        {env.size} bytes")
    print(f"attempts:    {env.attempts}")
    if env.next_attempt:
        nxt = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(env.next_attempt))
        print(f"next try:    {nxt}")
    for r in env.recipients:
        line = f"to:          <{r.address}> {r.state.value}"
        if r.state is not RcptState.DELIVERED and r.last_reply:
            line += f" ({r.last_reply})"
        print(line)


def cmd_queue_delete(args: argparse.Namespace) -> int:
    cfg = _load_daemon(args)
    if _spool(cfg).delete(args.id):
        print(f"deleted {args.id}")
        return EXIT_OK
    print(f"no message {args.id} in the queue", file=sys.stderr)
    return EXIT_FAIL


def cmd_queue_flush(args: argparse.Namespace) -> int:
    cfg = _load_daemon(args)
    return _signal_daemon(cfg, signal.SIGUSR1, "flush")


def cmd_audit(args: argparse.Namespace) -> int:
    from relay.audit import AuditLog, format_entry

    cfg = _load(args)
    log = AuditLog(cfg.audit.path)
    if not log.path.exists():
        print(f"no audit log yet at {log.path}: nothing recorded (the daemon writes it at start)")
        return EXIT_OK
    if args.json:
        # Pass the lines through as written (a torn last line is skipped).
        for entry in log.entries():
            print(json.dumps(entry, ensure_ascii=False))
        return EXIT_OK
    for entry in log.entries():
        for line in format_entry(entry):
            print(line)
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    """Ask the running daemon (its metrics listener) for its state and host health."""
    from relay import status

    cfg = _load_daemon(args)
    if cfg.metrics.listen is None:
        print(
            f"{cfg.source}: [metrics] listen is off; `relay status` reads the daemon there",
            file=sys.stderr,
        )
        return EXIT_FAIL
    try:
        report = status.fetch(cfg.metrics.listen)
    except status.NoDaemon as exc:
        print(exc, file=sys.stderr)
        return EXIT_FAIL
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
    else:
        print("\n".join(status.lines(report)))
    return EXIT_OK


# --- test-tls (issue #6 item 5) ---------------------------------------------


async def _candidates(route: Route, resolver: Resolver) -> list[Candidate]:
    """The route's candidate hosts, after MX lookup, exactly as delivery orders them."""
    return await routing.candidates(route, resolver, random.Random())


async def _probe(cfg: Config, route: Route) -> list[Any]:
    from relay.delivery import Deliverer
    from relay.metrics import Metrics

    resolver = DnsResolver(cfg.dns)
    deliverer = Deliverer(lambda: cfg, resolver, Metrics())
    try:
        return await deliverer.probe(route, await _candidates(route, resolver))
    finally:
        await deliverer.close()


def _probe_json(route: Route, result: Any) -> dict[str, Any]:
    cand, cert = result.candidate, result.certificate
    return {
        "route": route.name,
        "host": cand.host,
        "table": cand.table,
        "via_mx": cand.via_mx,
        "address": result.ip,
        "port": cand.port,
        "error": result.error or None,
        "starttls": result.starttls,
        "tls_version": result.tls_version,
        "cipher": result.cipher,
        "certificate": None
        if cert is None
        else {
            "subject": cert.subject,
            "issuer": cert.issuer,
            "sans": list(cert.sans),
            "not_after": cert.not_after,
            "days_left": cert.days_left,
        },
        "chain_verified": result.chain_verified,
        "chain_error": result.chain_error or None,
        "hostname_matched": result.hostname_matched,
        "hostname_checked": result.hostname_checked or None,
        "checks": {
            option: {"enabled": getattr(route.tls, option), "passed": ok, "reason": why or None}
            for option, ok, why in result.checks()
        },
        "failures": [
            {
                "reason": f.value,
                "option": errors.TLS_FAILURE_OPTION[f],
                "text": errors.TLS_FAILURE_TEXT[f],
            }
            for f in result.failures
        ],
        "passed": result.passed,
    }


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _print_probe(route: Route, result: Any) -> None:
    cand, cert = result.candidate, result.certificate
    where = f"[{result.ip}]" if result.ip else "(no address)"
    via = f", MX of {cand.via_mx}" if cand.via_mx else ""
    print(f"{cand.host} {where}:{cand.port} ({cand.table}{via})")
    if result.error:
        print(f"  error:            {result.error}")
        print("  verdict:          FAIL (host not reachable as delivery would reach it)")
        return
    print(f"  STARTTLS offered: {_yes(result.starttls)}")
    if result.tls_version:
        print(f"  TLS:              {result.tls_version}, {result.cipher}")
    if cert is not None:
        print(f"  subject:          {cert.subject or '-'}")
        print(f"  SANs:             {', '.join(cert.sans) or '-'}")
        print(f"  issuer:           {cert.issuer or '-'}")
        left = cert.days_left
        when = f"{left} days left" if left >= 0 else f"EXPIRED {-left} days ago"
        print(f"  not after:        {cert.not_after} ({when})")
    if result.tls_version:
        chain = _yes(result.chain_verified) + (
            "" if result.chain_verified else f" ({result.chain_error})"
        )
        print(f"  chain verified:   {chain}")
        print(
            f"  hostname matched: {_yes(result.hostname_matched)} "
            f"(against {result.hostname_checked})"
        )
    for option, ok, why in result.checks():
        enabled = getattr(route.tls, option)
        state = "pass" if ok else f"FAIL: {why}"
        if not enabled:
            state = f"off ({'would pass' if ok else 'would fail: ' + why})"
        print(f"  {option + ' = ' + str(enabled).lower() + ':':<28}{state}")
    if result.passed:
        print("  verdict:          PASS")
        return
    failed = ", ".join(sorted({errors.TLS_FAILURE_OPTION[f] for f in result.failures}))
    print(f"  verdict:          FAIL ({failed})")
    for fix in errors.TLS_FIXES:
        print(f"    fix: {fix}")


def cmd_test_tls(args: argparse.Namespace) -> int:
    cfg = _load(args)
    route = cfg.route(args.route)
    if route is None:
        names = ", ".join(repr(r.name) for r in cfg.routes) or "none"
        print(f"no route named {args.route!r}; routes: {names}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        results = asyncio.run(_probe(cfg, route))
    except errors.RelayError as exc:
        print(f"route {route.name!r}: {exc.detail}", file=sys.stderr)
        return EXIT_FAIL
    passed = bool(results) and all(r.passed for r in results)
    if args.json:
        report = {"route": route.name, "passed": passed}
        report["hosts"] = [_probe_json(route, r) for r in results]
        print(json.dumps(report, indent=2))
    else:
        for result in results:
            _print_probe(route, result)
        count = sum(1 for r in results if r.passed)
        print(f"-- route {route.name!r}: {count}/{len(results)} host(s) pass its TLS policy")
    return EXIT_OK if passed else EXIT_FAIL


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="An SMTP relay that routes mail.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $RELAY_CONFIG, then config/relay.toml)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    Handler = Callable[[argparse.Namespace], int]

    def add(name: str, func: Handler, text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=text, description=text)
        p.set_defaults(func=func)
        return p

    add("run", cmd_run, "run the daemon in the foreground")
    add("check-config", cmd_check_config, "validate the config; exit 2 listing every problem")
    add("reload", cmd_reload, "make the running daemon reload its config (same as SIGHUP)")
    status = add("status", cmd_status, "show the running daemon's state: queue, hosts up or down")
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    audit = add("audit", cmd_audit, "print the audit log of configuration changes, newest last")
    audit.add_argument("--json", action="store_true", help="print the raw JSON lines")
    test_tls = add(
        "test-tls",
        cmd_test_tls,
        "connect to every host of ROUTE as delivery would and check its TLS policy",
    )
    test_tls.add_argument("route", metavar="ROUTE", help="the route's name")
    test_tls.add_argument("--json", action="store_true", help="print JSON for scripts")
    queue = sub.add_parser("queue", help="inspect and act on the spool")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    for name, func, text in (
        ("list", cmd_queue_list, "list queued messages"),
        ("flush", cmd_queue_flush, "make the running daemon retry every message now (SIGUSR1)"),
    ):
        qsub.add_parser(name, parents=[common], help=text).set_defaults(func=func)
    for name, func, text in (
        ("show", cmd_queue_show, "show one message's envelope and headers"),
        ("delete", cmd_queue_delete, "delete one message from the queue"),
    ):
        p = qsub.add_parser(name, parents=[common], help=text)
        p.add_argument("id", metavar="ID")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        result: int = args.func(args)
    except ConfigError as exc:
        _print_problems(exc)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
