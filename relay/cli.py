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
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import relay
from relay import config as configmod
from relay import configdiff, configload, errors, testtls
from relay.config import Config, Route
from relay.configload import ConfigError
from relay.spool import Spool

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_CONFIG = 2
EMBEDDED = configmod.EMBEDDED


def config_path(argument: str | None) -> Path | None:
    """The config file every command uses; None means the embedded default.

    ``--config``, then ``$RELAY_CONFIG``, then ``config/relay.toml`` in the
    current folder, then the embedded default (relay.configload.load_embedded).
    A named file must exist: only when nothing names one does its absence
    fall through to the default.
    """
    named = argument or os.environ.get("RELAY_CONFIG")
    if named:
        return Path(named)
    default = configmod.DEFAULT_CONFIG
    return default if default.exists() else None


def _resolve(args: argparse.Namespace, say: bool = True) -> Path | None:
    """``config_path`` for this command, said on stderr (which file it acts on).

    ``run`` does not say it here: its stderr is the log, where every line
    is an event in the configured format, and its ``started`` line names
    the config.
    """
    path = config_path(args.config)
    if say:
        shown = EMBEDDED if path is None else str(path.resolve())
        print(f"relay: using config {shown}", file=sys.stderr)
    return path


def _load(args: argparse.Namespace) -> Config:
    """The config of every command but ``run`` (which hands its path to relay.app)."""
    path = _resolve(args)
    if path is None:
        from relay import app

        return app.default_config()
    return configload.load(path)


def _print_problems(error: ConfigError) -> None:
    count = len(error.problems)
    print(f"{error.path}: invalid configuration, {count} problem(s):", file=sys.stderr)
    for problem in error.problems:
        print(f"  - {problem}", file=sys.stderr)


def cmd_check_config(args: argparse.Namespace) -> int:
    """Exit 0 for a valid config, warnings or not: the relay runs it as written."""
    from relay.lint import warnings

    cfg = _load(args)
    found = warnings(cfg)
    counts = f"{len(cfg.routes)} route(s), {len(cfg.rules)} rule(s)"
    if found:
        counts += f", {len(found)} warning(s)"
    print(f"{cfg.shown_source}: valid, {counts}")
    for line in configdiff.describe(cfg):
        print(f"  {line}")
    if found:
        print("warnings:")
        for warning in found:
            print(f"  - {warning}")
    return EXIT_OK


#: Kept for callers of the earlier names: every command resolves the same way.
_load_daemon = _load


def cmd_run(args: argparse.Namespace) -> int:
    # Imported here so that check-config and queue commands stay light.
    from relay.app import run

    return run(_resolve(args, say=False))


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
        embedded = cfg.shown_source == EMBEDDED
        start = "relay run" if embedded else f"relay run --config {cfg.source}"
        print(
            f"no running relay found (pid file {cfg.pid_file}); start it with `{start}`",
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


def _spool(cfg: Config) -> Spool:
    spool = Spool(cfg.queue.path)
    spool.msg_dir.mkdir(parents=True, exist_ok=True)
    return spool


def _queue(action: Callable[[argparse.Namespace, Config, Spool], int]) -> Handler:
    """A ``relay queue`` action (relay.queuecli) on the daemon's config and spool."""

    def run(args: argparse.Namespace) -> int:
        cfg = _load_daemon(args)
        return action(args, cfg, _spool(cfg))

    return run


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


# --- test-tls (docs/tls.md) -------------------------------------------------


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _print_probe(route: Route, result: Any, window: float) -> None:
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
        print(f"  names:            {', '.join(cert.names) or '-'}")
        print(f"  SANs:             {', '.join(cert.sans) or '-'}")
        issuer = " (self-signed)" if cert.self_signed else ""
        print(f"  issuer:           {cert.issuer or '-'}{issuer}")
        print(f"  not before:       {cert.valid_from()}")
        left = cert.days_left
        when = f"{left} days left" if left >= 0 else f"EXPIRED {-left} days ago"
        print(f"  expires:          {cert.valid_until()} ({when})")
        for warning in result.warnings(window):
            print(f"  WARN:             {warning}")
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
    if result.auth_checked:
        auth = route.auth.username if route.auth else ""
        ok = f"pass ({result.auth_mechanism} as {auth})"
        print(f"  {'auth:':<28}{f'FAIL: {result.auth_error}' if result.auth_error else ok}")
    if result.passed:
        print("  verdict:          PASS")
        return
    advice = result.advice(route.name)
    failed = ", ".join(
        sorted({a.option for a in advice} | ({"auth"} if result.auth_error else set()))
    )
    print(f"  verdict:          FAIL ({failed})")
    for item in advice:
        print(f"    {item.option}: {item.problem}")
        for fix in item.fixes:
            print(f"      fix: {fix}")


def cmd_test_tls(args: argparse.Namespace) -> int:
    cfg = _load(args)
    route = cfg.route(args.route)
    if route is None:
        names = ", ".join(repr(r.name) for r in cfg.routes) or "none"
        print(f"no route named {args.route!r}; routes: {names}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        results = asyncio.run(testtls.probe_route(cfg, route))
    except errors.RelayError as exc:
        print(f"route {route.name!r}: {exc.detail}", file=sys.stderr)
        return EXIT_FAIL
    passed = bool(results) and all(r.passed for r in results)
    if args.json:
        report = {"route": route.name, "passed": passed}
        report["hosts"] = [testtls.probe_json(route, r, cfg.tls.expiry_warning) for r in results]
        print(json.dumps(report, indent=2))
    else:
        for result in results:
            _print_probe(route, result, cfg.tls.expiry_warning)
        count = sum(1 for r in results if r.passed)
        print(f"-- route {route.name!r}: {count}/{len(results)} host(s) pass its TLS policy")
    return EXIT_OK if passed else EXIT_FAIL


Handler = Callable[[argparse.Namespace], int]


def cmd_admin_passwd(args: argparse.Namespace) -> int:
    """Print a password hash for ``[[admin.users]] password_hash`` (docs/console.md).

    Asks twice on a terminal; reads one line from stdin otherwise (scripts).
    """
    import getpass

    from relay.passwords import hash_password

    if sys.stdin.isatty():
        password = getpass.getpass("password: ")
        if getpass.getpass("again: ") != password:
            print("the two passwords differ; nothing printed", file=sys.stderr)
            return EXIT_FAIL
    else:
        password = sys.stdin.readline().rstrip("\r\n")
    if len(password) < 8:
        print("use at least 8 characters; nothing printed", file=sys.stderr)
        return EXIT_CONFIG
    print(hash_password(password))
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="An SMTP relay that routes mail.")
    parser.add_argument("--version", action="version", version=f"relay {relay.version()}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        metavar="FILE",
        help="config file (default: $RELAY_CONFIG, then config/relay.toml, "
        "then the embedded default)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

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
    admin = sub.add_parser(
        "admin-passwd", help="print a password hash for [[admin.users]] (the web console)"
    )
    admin.set_defaults(func=cmd_admin_passwd)
    _queue_parsers(sub, common)
    return parser


def _queue_parsers(sub: argparse._SubParsersAction[Any], common: argparse.ArgumentParser) -> None:
    from relay import queuecli as q

    queue = sub.add_parser("queue", help="inspect and act on the spool (see docs/queue.md)")
    qsub = queue.add_subparsers(dest="queue_command", required=True, metavar="ACTION")

    def add(name: str, func: Callable[..., int], text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = qsub.add_parser(
            name, parents=[common], help=text, description=text
        )
        p.set_defaults(func=_queue(func))
        return p

    listing = add("list", q.cmd_list, "list queued and held messages, with each last error")
    listing.add_argument("--json", action="store_true", help="print JSON for scripts")
    q.add_filters(listing)
    show = add("show", q.cmd_show, "show one message's envelope and headers")
    show.add_argument("id", metavar="ID")
    for name, func, text in (
        ("flush", q.cmd_flush, "the running relay retries now, backoff restarted (all, or IDs)"),
        ("hold", q.cmd_hold, "keep messages out of delivery until released"),
        ("release", q.cmd_release, "put held messages back in delivery, tried at once"),
        ("delete", q.cmd_delete, "delete messages (more than one needs --yes)"),
    ):
        p = add(name, func, text)
        p.add_argument("ids", metavar="ID", nargs="*", help="queue ids")
        if name != "flush":
            p.add_argument(
                "--all", action="store_true", help="every message (with filters: every match)"
            )
        if name == "delete":
            p.add_argument("--yes", action="store_true", help="confirm deleting more than one")
        q.add_filters(p)


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
