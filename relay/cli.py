"""The ``relay`` command line: argument parsing, printing and exit codes only.

Exit codes: 0 success, 1 operational failure (a TLS test failed, no
daemon to signal, no such message), 2 invalid configuration or usage.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from relay import config as configmod
from relay.config import Config, ConfigError
from relay.envelope import Envelope, RcptState
from relay.spool import Spool

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
    from relay import app

    return app.run(_daemon_config_path(args))


def _read_pid(cfg: Config) -> int | None:
    try:
        pid = int(cfg.pid_file.read_text().strip())
        os.kill(pid, 0)
    except (OSError, ValueError):
        return None
    return pid


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
    cfg = _load(args)
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
    print(f"{'ID':<26} {'AGE':>5} {'NEXT':>6}  SENDER -> PENDING RECIPIENTS / LAST ERROR")
    for env in _spool(cfg).load_all():
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
    return EXIT_OK


def cmd_queue_show(args: argparse.Namespace) -> int:
    cfg = _load_daemon(args)
    spool = _spool(cfg)
    try:
        env = spool.load(args.id)
    except KeyError:
        print(f"no message {args.id} in the queue ({spool.path})", file=sys.stderr)
        return EXIT_FAIL
    _print_envelope(env)
    print()
    body = spool.read_body(env.id)
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
