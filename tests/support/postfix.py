"""Private, throwaway Postfix instances for end-to-end tests and benchmarks.

Each instance has its own config, queue and data directories and its own
maillog file, listens on 127.0.0.1 only, and never touches the system
instance (/etc/postfix is only read, for ``postfix-files``). It needs root
(Postfix's master must start as root) and the Debian ``postfix`` package.

The working recipe (Postfix 3.7, see docs/e2e.md for the reasoning):

* write ``main.cf`` + ``master.cf`` into a private config directory; the
  ``-c DIR`` option works as root without listing DIR in the system
  ``alternate_config_directories`` (that is only checked for set-gid
  programs run by non-root users);
* ``postfix -c DIR check`` once: it creates the queue sub-directories with
  the right owners (0.2 s);
* ``master -c DIR -w`` starts the daemon and returns once it is
  initialised (milliseconds; ``postfix start`` would spend ~2 s in its
  integrity checks);
* ``postfix -c DIR stop`` stops it; we then wait for the master pid to go
  and, failing that, SIGKILL the whole process tree.

Two roles: ``DownstreamServer`` (final destination: virtual(8) delivery
into one maildir, optional STARTTLS) and ``UpstreamClient`` (a relay that
forwards everything to ``relayhost = [127.0.0.1]:PORT``; mail is injected
with ``sendmail -C DIR`` or over SMTP to its own smtpd port).
"""

from __future__ import annotations

import atexit
import email
import email.message
import email.policy
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Self

from tests.support.peers import require_postfix
from tests.support.pki import CertFiles
from tests.support.procs import free_port, kill_tree, pid_alive, port_open, wait_port
from tests.support.wait import blocking_until

POSTFIX = "/usr/sbin/postfix"
SENDMAIL = "/usr/sbin/sendmail"
POSTQUEUE = "/usr/sbin/postqueue"
MASTER = "/usr/lib/postfix/sbin/master"
SMTP_SINK = "/usr/sbin/smtp-sink"
SMTP_SOURCE = "/usr/sbin/smtp-source"

# The uid/gid virtual(8) delivers as: virtual refuses uids below
# virtual_minimum_uid (100), so not root; "nobody" owns nothing else of ours.
MAILDIR_UID = 65534
MAILDIR_GID = 65534

# Every service is unchained (chroot column "n") so nothing needs copying
# into a jail; the smtpd line with the instance's port is added per instance.
MASTER_CF_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
tlsproxy  unix  -       -       n       -       0       tlsproxy
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
virtual   unix  -       n       n       -       -       virtual
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""

QUEUE_SUBDIRS = ("maildrop", "incoming", "active", "deferred", "hold")

_LIVE: set[PostfixInstance] = set()


def postfix_missing() -> str | None:
    """Why private Postfix instances cannot run here, or None if they can."""
    for binary in (POSTFIX, MASTER, SENDMAIL):
        if not os.access(binary, os.X_OK):
            return f"{binary} is not installed"
    if os.geteuid() != 0:
        return "Postfix's master must be started as root"
    return None


def base_settings(name: str, root: Path) -> dict[str, str]:
    """main.cf settings every instance shares: isolated, loopback-only, fast retries."""
    return {
        "compatibility_level": "3.6",
        "queue_directory": str(root / "spool"),
        "data_directory": str(root / "data"),
        # Only read: postfix check needs postfix-files from the package.
        "meta_directory": "/etc/postfix",
        "myhostname": f"{name}.test",
        "mydomain": "test",
        "myorigin": "$myhostname",
        "smtpd_banner": "$myhostname ESMTP",
        "inet_interfaces": "127.0.0.1",
        "inet_protocols": "ipv4",
        "mynetworks": "127.0.0.0/8",
        # No local delivery and no alias database: nothing outside root is used.
        "mydestination": "",
        "local_recipient_maps": "",
        "local_transport": "error:5.1.1 local delivery is disabled in this test instance",
        "alias_maps": "",
        "alias_database": "",
        "biff": "no",
        # Never ask DNS: every next hop in a test is an IP literal on loopback.
        "smtp_dns_support_level": "disabled",
        "maillog_file": str(root / "maillog"),
        "maillog_file_prefixes": str(root),
        "smtp_tls_loglevel": "1",
        "smtpd_tls_loglevel": "1",
        # Retry deferred mail within seconds, not minutes.
        "queue_run_delay": "1s",
        "minimal_backoff_time": "1s",
        "maximal_backoff_time": "2s",
        "smtp_connect_timeout": "5s",
        "smtp_helo_timeout": "10s",
    }


def access_map(replies: Mapping[str, str]) -> str:
    """An ``inline:`` access table: address or domain -> SMTP reply (or OK)."""
    entries = ", ".join(f"{{ {key} = {value} }}" for key, value in replies.items())
    return f"inline:{{ {entries} }}"


@dataclass(eq=False)
class PostfixInstance:
    """One private Postfix instance under ``root`` with smtpd on 127.0.0.1:``port``.

    ``settings`` is the full main.cf; edit it before ``start()`` (or call
    ``write_config()`` and ``reload()`` while running).
    """

    name: str
    root: Path
    port: int
    settings: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.settings = {**base_settings(self.name, self.root), **self.settings}
        self._checked = False

    @property
    def config_dir(self) -> Path:
        return self.root / "etc"

    @property
    def queue_dir(self) -> Path:
        return self.root / "spool"

    @property
    def maillog_path(self) -> Path:
        return self.root / "maillog"

    def master_cf(self) -> str:
        smtpd = f"127.0.0.1:{self.port} inet n - n - - smtpd\n"
        return smtpd + MASTER_CF_SERVICES

    def write_config(self) -> None:
        for sub in ("etc", "spool", "data"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        # The daemons run as "postfix" and must traverse every parent directory.
        self.root.chmod(0o755)
        shutil.chown(self.root / "data", "postfix")
        main = "".join(f"{key} = {value}\n" for key, value in self.settings.items())
        for file, text in (("main.cf", main), ("master.cf", self.master_cf())):
            path = self.config_dir / file
            path.write_text(text)
            # Postfix sleeps until a config file is over a second old (dict_load_file:
            # "may be a file being written"); backdating saves ~1.5 s per start.
            past = time.time() - 5
            os.utime(path, (past, past))

    def _run(self, *argv: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )

    def start(self, timeout: float = 10.0) -> Self:
        """Write the config, start the master, wait until smtpd accepts connections."""
        if self.running:
            return self
        self.write_config()
        if not self._checked:
            # Creates queue sub-directories and fixes ownership; fatal errors abort.
            done = self._run(POSTFIX, "-c", str(self.config_dir), "check")
            if done.returncode != 0:
                raise RuntimeError(f"postfix check failed for {self.name}:\n{done.stderr}")
            self._checked = True
        # -w: a foreground stub exits 0 only once the real master is initialised.
        # stdout/stderr go to a file: the daemon must not hold a pipe of ours open.
        with (self.root / "master.out").open("ab") as out:
            code = subprocess.run(
                [MASTER, "-c", str(self.config_dir), "-w"],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                timeout=timeout,
            ).returncode
        if code != 0:
            raise RuntimeError(
                f"postfix master for {self.name} failed to start ({code}):\n"
                + (self.root / "master.out").read_text(errors="replace")
                + self.maillog()
            )
        _LIVE.add(self)
        wait_port("127.0.0.1", self.port, timeout)
        return self

    @property
    def master_pid(self) -> int | None:
        try:
            pid = int((self.queue_dir / "pid" / "master.pid").read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if pid_alive(pid) else None

    @property
    def running(self) -> bool:
        return self.master_pid is not None

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the instance: ``postfix stop``, then SIGKILL the tree if it lingers."""
        pid = self.master_pid
        if pid is None:
            _LIVE.discard(self)
            return
        self._run(POSTFIX, "-c", str(self.config_dir), "stop", timeout=timeout)
        try:
            blocking_until(lambda: not pid_alive(pid), timeout, what=f"postfix {self.name} to stop")
        except TimeoutError:
            kill_tree(pid)
        # Children notice the master's death through its status pipe, but make sure.
        kill_tree(pid)
        blocking_until(
            lambda: not port_open("127.0.0.1", self.port), 5.0, what=f"{self.name} port to close"
        )
        _LIVE.discard(self)

    def reload(self) -> None:
        """Rewrite main.cf/master.cf and make the running master re-read them."""
        self.write_config()
        self._run(POSTFIX, "-c", str(self.config_dir), "reload")

    def destroy(self, keep_log_in: Path | None = None) -> None:
        """Stop, optionally copy the maillog to ``keep_log_in``, delete ``root``."""
        self.stop()
        if keep_log_in is not None and self.maillog_path.exists():
            keep_log_in.mkdir(parents=True, exist_ok=True)
            shutil.copy(self.maillog_path, keep_log_in / f"{self.name}.maillog")
        shutil.rmtree(self.root, ignore_errors=True)

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_log(self, pattern: str, timeout: float = 10.0) -> re.Match[str]:
        """Wait until a maillog line matches the regex ``pattern``; return the match."""
        regex = re.compile(pattern)

        def search() -> re.Match[str] | None:
            return next(filter(None, map(regex.search, self.maillog().splitlines())), None)

        return blocking_until(
            search, timeout, what=f"{self.name} maillog line matching {pattern!r}"
        )

    def queued(self) -> list[str]:
        """Queue ids of every message still in this instance's queue."""
        ids: list[str] = []
        for sub in QUEUE_SUBDIRS:
            directory = self.queue_dir / sub
            if directory.is_dir():
                ids += [p.name for p in directory.rglob("*") if p.is_file()]
        return sorted(ids)

    def flush(self) -> None:
        """``postqueue -f``: attempt every deferred message now."""
        self._run(POSTQUEUE, "-c", str(self.config_dir), "-f")

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def downstream_settings(
    root: Path,
    domains: Iterable[str],
    tls: CertFiles | None,
    tls_level: str,
    recipient_replies: Mapping[str, str] | None,
) -> dict[str, str]:
    """main.cf for a final destination: every address of ``domains`` -> one maildir."""
    settings = {
        "virtual_mailbox_domains": ", ".join(domains),
        "virtual_mailbox_base": str(root / "mail"),
        # One shared maildir; Delivered-To tells recipients apart.
        "virtual_mailbox_maps": "static:inbox/",
        "virtual_uid_maps": f"static:{MAILDIR_UID}",
        "virtual_gid_maps": f"static:{MAILDIR_GID}",
        "virtual_minimum_uid": "100",
        "relay_domains": "",
        # Accept only our domains from anyone (the relay under test included),
        # and never send anything anywhere (bounces are dropped with a log line).
        "smtpd_relay_restrictions": "reject_unauth_destination",
        "default_transport": "error:5.7.1 this test downstream sends no mail",
        "relay_transport": "error:5.7.1 this test downstream sends no mail",
    }
    if recipient_replies:
        settings["smtpd_recipient_restrictions"] = (
            f"check_recipient_access {access_map(recipient_replies)}, permit"
        )
    if tls is not None:
        settings |= {
            "smtpd_tls_cert_file": str(tls.cert),
            "smtpd_tls_key_file": str(tls.key),
            "smtpd_tls_security_level": tls_level,
        }
    else:
        settings["smtpd_tls_security_level"] = "none"
    return settings


@dataclass(eq=False)
class DownstreamServer(PostfixInstance):
    """A final destination: mail for its domains lands in ``root/mail/inbox``."""

    @property
    def maildir(self) -> Path:
        return self.root / "mail" / "inbox"

    def write_config(self) -> None:
        super().write_config()
        base = self.root / "mail"
        base.mkdir(exist_ok=True)
        os.chown(base, MAILDIR_UID, MAILDIR_GID)

    def _files(self) -> list[Path]:
        files = [p for sub in ("new", "cur") for p in (self.maildir / sub).glob("*")]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def messages(self, recipient: str | None = None) -> list[email.message.EmailMessage]:
        """Delivered messages, oldest first; one per recipient (see ``Delivered-To``)."""
        found = []
        for path in self._files():
            msg = email.message_from_bytes(path.read_bytes(), policy=email.policy.default)
            assert isinstance(msg, email.message.EmailMessage)
            if recipient is None or str(msg["Delivered-To"]).lower() == recipient.lower():
                found.append(msg)
        return found

    def wait_messages(
        self, count: int, timeout: float = 15.0, recipient: str | None = None
    ) -> list[email.message.EmailMessage]:
        """Wait until at least ``count`` messages (for ``recipient``) are delivered."""

        def enough() -> list[email.message.EmailMessage] | None:
            found = self.messages(recipient)
            return found if len(found) >= count else None

        return blocking_until(
            enough,
            timeout,
            what=f"{count} message(s) in {self.name}'s maildir",
        )

    def clear(self) -> None:
        """Delete every delivered message."""
        for path in self._files():
            path.unlink()


@dataclass(eq=False)
class UpstreamClient(PostfixInstance):
    """A Postfix that forwards every message to ``relayhost = [127.0.0.1]:relay_port``."""

    def submit(
        self,
        message: bytes | str | email.message.Message,
        mail_from: str,
        recipients: Iterable[str],
        timeout: float = 20.0,
    ) -> None:
        """Inject ``message`` with ``sendmail -C DIR`` (pickup → cleanup → qmgr → smtp)."""
        if isinstance(message, email.message.Message):
            data = message.as_bytes()
        else:
            data = message.encode() if isinstance(message, str) else message
        done = subprocess.run(
            [SENDMAIL, "-C", str(self.config_dir), "-i", "-f", mail_from, "--", *recipients],
            input=data,
            capture_output=True,
            timeout=timeout,
        )
        if done.returncode != 0:
            raise RuntimeError(f"sendmail failed ({done.returncode}): {done.stderr!r}")


def upstream_settings(
    relay_port: int, tls_level: str, ca_file: Path | None, tls_match: str | None
) -> dict[str, str]:
    """main.cf for a smarthost client: everything goes to [127.0.0.1]:relay_port."""
    # Brackets: no MX lookup, connect to the literal next hop.
    settings = {
        "relayhost": f"[127.0.0.1]:{relay_port}",
        "relay_domains": "",
        "smtpd_relay_restrictions": "permit_mynetworks, reject",
        "smtp_tls_security_level": tls_level,
    }
    if ca_file is not None:
        settings["smtp_tls_CAfile"] = str(ca_file)
    if tls_match is not None:
        settings["smtp_tls_verify_cert_match"] = tls_match
        settings["smtp_tls_secure_cert_match"] = tls_match
    return settings


class PostfixFactory:
    """Creates instances under one private base directory and tears them all down.

    The base directory is a short path under /tmp with mode 0755, not the
    pytest ``tmp_path``: Postfix daemons run as the ``postfix`` user and
    must traverse it (pytest's base is 0700), and Unix socket paths under
    ``spool/private`` must stay below 108 bytes.
    """

    def __init__(self, keep_logs_in: Path | None = None) -> None:
        require_postfix()
        self.base = Path(tempfile.mkdtemp(prefix="relay-pf-"))
        self.base.chmod(0o755)
        self.keep_logs_in = keep_logs_in
        self.instances: list[PostfixInstance] = []

    def _root(self, name: str) -> Path:
        if any(inst.name == name for inst in self.instances):
            raise ValueError(f"instance name {name!r} already used")
        return self.base / name

    def downstream(
        self,
        name: str = "downstream",
        *,
        domains: Iterable[str] = ("example.org",),
        tls: CertFiles | None = None,
        tls_level: str = "may",
        recipient_replies: Mapping[str, str] | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> DownstreamServer:
        """A final destination for ``domains``; STARTTLS offered when ``tls`` is given.

        ``recipient_replies`` maps an address or domain to the reply its RCPT
        gets, e.g. ``{"gone@example.org": "550 5.1.1 no such user"}``.
        ``tls_level`` "encrypt" makes the server require STARTTLS.
        """
        root = self._root(name)
        merged = downstream_settings(root, domains, tls, tls_level, recipient_replies)
        merged |= dict(settings or {})
        inst = DownstreamServer(name, root, port or free_port(), merged)
        self.instances.append(inst)
        return inst.start() if start else inst

    def upstream(
        self,
        relay_port: int,
        name: str = "upstream",
        *,
        tls_level: str = "may",
        ca_file: Path | None = None,
        tls_match: str | None = None,
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        start: bool = True,
    ) -> UpstreamClient:
        """A Postfix smarthost client of 127.0.0.1:``relay_port``.

        ``tls_level`` is ``smtp_tls_security_level``: none, may, encrypt,
        verify or secure; ``ca_file`` the trust anchors for verify/secure and
        ``tls_match`` the names the certificate must match (default "nexthop",
        i.e. 127.0.0.1).
        """
        root = self._root(name)
        merged = upstream_settings(relay_port, tls_level, ca_file, tls_match)
        merged |= dict(settings or {})
        inst = UpstreamClient(name, root, port or free_port(), merged)
        self.instances.append(inst)
        return inst.start() if start else inst

    def close(self) -> None:
        """Stop every instance (even after failures) and delete the base directory."""
        for inst in self.instances:
            try:
                inst.destroy(self.keep_logs_in)
            except Exception:  # noqa: BLE001 - keep tearing the others down
                if inst.master_pid:
                    kill_tree(inst.master_pid)
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> PostfixFactory:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@atexit.register
def _kill_leftovers() -> None:
    # Last line of defence if a finalizer never ran (e.g. KeyboardInterrupt).
    for inst in list(_LIVE):
        pid = inst.master_pid
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
            kill_tree(pid)
