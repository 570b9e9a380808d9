"""Reading a TOML file into a :class:`~relay.config.Config`, validated all at once.

``load`` either returns a complete, valid Config or raises
:class:`ConfigError` listing every :class:`Problem` found, each naming
where (table or route) and which field. Which keys a table may hold and
what an absent key means come from the dataclasses in relay.config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import ipaddress
import os
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from relay import loops
from relay.addresses import domain_key, ip_literal, is_ip_literal
from relay.config import (
    ADMIN_ALLOW_DEFAULT,
    DEFAULT_CONFIG,
    EMBEDDED,
    ON_TLS_FAILURE,
    AdminConfig,
    AdminUser,
    AuditConfig,
    BouncesConfig,
    Config,
    DeliveryConfig,
    DnsConfig,
    Host,
    Listen,
    LogConfig,
    MetricsConfig,
    QueueConfig,
    Route,
    RouteAuth,
    Rule,
    ServerConfig,
    TlsConfig,
    TlsPolicy,
    field_default,
    toml_keys,
)
from relay.configvalues import (
    check_port,
    is_hostname,
    is_mail_address,
    parse_duration,
    parse_listen,
    parse_nameserver,
    suggest,
)
from relay.passwords import check_hash

# --- problems ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Problem:
    #: Where: "server", "routes[2] \"Split delivery\"", "rules[1]", or "" for the file.
    where: str
    #: The field, e.g. "port" or "primary[1].load".
    field: str
    message: str

    def __str__(self) -> str:
        prefix = ": ".join(part for part in (self.where, self.field) if part)
        return f"{prefix}: {self.message}" if prefix else self.message


class ConfigError(Exception):
    """The configuration is invalid; ``problems`` lists every reason."""

    def __init__(self, path: Path | str, problems: Sequence[Problem]) -> None:
        self.path = Path(path)
        self.problems = tuple(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{self.path}: {len(self.problems)} problem(s):\n{lines}")


# --- reading a table ------------------------------------------------------


class _Reader:
    """Reads one TOML table, recording problems instead of raising."""

    def __init__(
        self,
        problems: list[Problem],
        where: str,
        table: Any,
        known: Sequence[str],
        prefix: str = "",
    ) -> None:
        self.problems = problems
        self.where = where
        #: Prepended to field names, e.g. "primary[2]." for a host table.
        self.prefix = prefix
        self.table: Mapping[str, Any] = table if isinstance(table, Mapping) else {}
        if not isinstance(table, Mapping):
            self.problem("", f"must be a table, got {type(table).__name__}")
        for key in self.table:
            if key not in known:
                hint = suggest(key, known)
                tip = f"; did you mean {hint!r}?" if hint else f"; known: {', '.join(known)}"
                self.problem(key, f"unknown key{tip}")

    def problem(self, name: str, message: str) -> None:
        self.problems.append(Problem(self.where, f"{self.prefix}{name}".rstrip("."), message))

    def get(self, name: str, kind: type | tuple[type, ...], default: Any) -> Any:
        if name not in self.table:
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # bool is an int in Python, but `port = true` is a mistake, not port 1.
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            wanted = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            self.problem(name, f"must be {wanted}, got {value!r}")
            return default
        return value

    def strings(self, name: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self.get(name, list, None)
        if value is None:
            return default
        if not all(isinstance(item, str) for item in value):
            self.problem(name, f"must be a list of strings, got {value!r}")
            return default
        return tuple(value)

    def duration(self, name: str, default: float) -> float:
        value = self.get(name, str, None)
        if value is None:
            return default
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            self.problem(name, str(exc))
            return default
        if seconds <= 0:
            self.problem(name, "must be longer than zero")
            return default
        return seconds

    def positive(self, name: str, default: int) -> int:
        value: int = self.get(name, int, default)
        if value < 1:
            self.problem(name, f"must be at least 1, got {value}")
            return default
        return value

    def path(self, name: str, base: Path, must_exist: bool) -> Path | None:
        value = self.get(name, str, None)
        if not value:
            return None
        path = (base / value).resolve() if not Path(value).is_absolute() else Path(value)
        if must_exist and not path.is_file():
            self.problem(name, f"file {str(path)!r} does not exist or is not a file")
        return path

    def settings(self, defaults: Any, read: Mapping[str, Any]) -> dict[str, Any]:
        """The fields of dataclass instance ``defaults`` as this table sets them.

        ``read`` holds the fields the caller read itself (first, so problems
        come in that order); every other field is read by its type, in field
        order: an int is a whole number of at least 1, a float a duration, a
        bool true or false. An absent key keeps the field's default.
        """
        values = dict(read)
        for f in dataclasses.fields(defaults):
            if f.name in values:
                continue
            value = getattr(defaults, f.name)
            # A string under relay.config's postponed annotations (PEP 563).
            kind = f.type if isinstance(f.type, str) else f.type.__name__
            if kind == "int":
                values[f.name] = self.positive(f.name, value)
            elif kind == "float":
                values[f.name] = self.duration(f.name, value)
            elif kind == "bool":
                values[f.name] = self.get(f.name, bool, value)
            else:
                name = f"{type(defaults).__name__}.{f.name}"
                raise TypeError(f"{name}: a {kind} needs its own reader")
        return values


_TYPE_NAMES = {
    str: "a string",
    int: "a whole number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}


# --- sections ---------------------------------------------------------------


def _server(problems: list[Problem], raw: Any, base: Path) -> ServerConfig:
    r = _Reader(problems, "server", raw, toml_keys(ServerConfig))
    defaults = ServerConfig(hostname="")
    hostname = r.get("hostname", str, "") or field_default(ServerConfig, "hostname")
    if not is_hostname(hostname):
        r.problem("hostname", f"{hostname!r} is not a valid host name")
    listen: list[Listen] = []
    listen_texts = r.strings("listen", tuple(str(item) for item in defaults.listen))
    if not listen_texts:
        r.problem("listen", 'needs at least one host:port, e.g. "127.0.0.1:2525"')
    for text in listen_texts:
        try:
            listen.append(parse_listen(text))
        except ValueError as exc:
            r.problem("listen", str(exc))
    # U-labels are allowed (RFC 6531 section 3.3) and kept as A-labels.
    domains = tuple(domain_key(d) for d in r.strings("domains", defaults.domains))
    if not domains:
        r.problem("domains", "must list at least one domain accepted for relaying")
    for domain in domains:
        if not is_hostname(domain):
            r.problem("domains", f"{domain!r} is not a valid domain")
    networks = []
    for text in r.strings("relay_networks", ()):
        try:
            networks.append(ipaddress.ip_network(text, strict=False))
        except ValueError:
            r.problem("relay_networks", f"{text!r} is not a network; use CIDR like 127.0.0.0/8")
    cert = r.path("tls_cert", base, must_exist=True)
    key = r.path("tls_key", base, must_exist=True)
    if (cert is None) != (key is None):
        r.problem("tls_cert" if cert is None else "tls_key", "tls_cert and tls_key go together")
    event_loop = r.get("event_loop", str, defaults.event_loop)
    if (why := loops.missing(event_loop)) is not None:
        r.problem("event_loop", why)
    soft = r.positive("soft_error_limit", defaults.soft_error_limit)
    hard = r.positive("hard_error_limit", defaults.hard_error_limit)
    if soft > hard:
        r.problem("soft_error_limit", f"must not exceed hard_error_limit ({soft} > {hard})")
    read = {
        "workers": _workers(r),
        "hostname": hostname,
        "listen": tuple(listen) or defaults.listen,
        "domains": domains,
        "relay_networks": tuple(networks),
        "tls_cert": cert,
        "tls_key": key,
        "soft_error_limit": soft,
        "hard_error_limit": hard,
        "event_loop": event_loop,
    }
    return ServerConfig(**r.settings(defaults, read))


#: More workers than this is a typo, not a machine (each is a process with threads).
MAX_WORKERS = 64


def _workers(r: _Reader) -> int:
    """``workers``: a count, or "auto" for the cores this process may run on."""
    value = r.get("workers", (int, str), 1)
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if isinstance(value, str) or not 1 <= value <= MAX_WORKERS:
        wanted = f'"auto" or a whole number from 1 to {MAX_WORKERS}'
        r.problem("workers", f"must be {wanted}, got {value!r}")
        return 1
    return int(value)


def _queue(problems: list[Problem], raw: Any, base: Path) -> QueueConfig:
    r = _Reader(problems, "queue", raw, toml_keys(QueueConfig))
    d = QueueConfig()
    path = r.path("path", base, must_exist=False) or (base / d.path).resolve()
    cfg = QueueConfig(**r.settings(d, {"path": path}))
    if cfg.min_backoff > cfg.max_backoff:
        r.problem("min_backoff", "must not be longer than max_backoff")
    return cfg


def _delivery(problems: list[Problem], raw: Any) -> DeliveryConfig:
    r = _Reader(problems, "delivery", raw, toml_keys(DeliveryConfig))
    cfg = DeliveryConfig(**r.settings(DeliveryConfig(), {}))
    if cfg.hold_down > cfg.max_hold_down:
        r.problem("hold_down", "must not be longer than max_hold_down")
    return cfg


def _dns(problems: list[Problem], raw: Any) -> DnsConfig:
    r = _Reader(problems, "dns", raw, toml_keys(DnsConfig))
    servers = []
    for text in r.strings("nameservers", ()):
        try:
            servers.append(parse_nameserver(text))
        except ValueError as exc:
            r.problem("nameservers", str(exc))
    return DnsConfig(**r.settings(DnsConfig(), {"nameservers": tuple(servers)}))


def _metrics(problems: list[Problem], raw: Any) -> MetricsConfig:
    r = _Reader(problems, "metrics", raw, toml_keys(MetricsConfig))
    text = r.get("listen", str, None)
    if text is None:
        return MetricsConfig()
    if text == "":
        return MetricsConfig(listen=None)
    try:
        return MetricsConfig(parse_listen(text))
    except ValueError as exc:
        r.problem("listen", str(exc))
        return MetricsConfig()


def _log(problems: list[Problem], raw: Any) -> LogConfig:
    r = _Reader(problems, "log", raw, toml_keys(LogConfig))
    d = LogConfig()
    fmt = r.get("format", str, d.format)
    if fmt not in ("text", "json"):
        r.problem("format", f'{fmt!r} is not a log format; use "text" or "json"')
    level = r.get("level", str, d.level).lower()
    if level not in ("debug", "info", "warning", "error"):
        r.problem("level", f"{level!r} is not a level; use debug, info, warning or error")
    return LogConfig(fmt, level)


def _admin(problems: list[Problem], raw: Any, base: Path) -> AdminConfig:
    """``[admin]``: the web console (docs/console.md); off unless ``listen`` is set."""
    r = _Reader(problems, "admin", raw, toml_keys(AdminConfig))
    d = AdminConfig()
    listen = None
    text = r.get("listen", str, "")
    if text:
        try:
            listen = parse_listen(text)
        except ValueError as exc:
            r.problem("listen", str(exc))
    allow = []
    for net in r.strings("allow", ADMIN_ALLOW_DEFAULT):
        try:
            allow.append(ipaddress.ip_network(net, strict=False))
        except ValueError:
            r.problem("allow", f"{net!r} is not a network; use CIDR like 127.0.0.0/8")
    users: list[AdminUser] = []
    raw_users = r.get("users", list, [])
    for i, item in enumerate(raw_users, start=1):
        ur = _Reader(problems, "admin", item, toml_keys(AdminUser), prefix=f"users[{i}].")
        name = ur.get("name", str, "")
        if not name.strip():
            ur.problem("name", "is required and must not be empty")
        elif any(u.name == name for u in users):
            ur.problem("name", f"duplicate: {name!r} is listed before")
        stored = ur.get("password_hash", str, "")
        why = check_hash(stored) if stored else "is required: run `relay admin-passwd`"
        if why:
            ur.problem("password_hash", why)
        users.append(AdminUser(name, stored))
    if listen is not None and not raw_users:
        r.problem("users", "the console needs at least one [[admin.users]] to log in")
    cert = r.path("tls_cert", base, must_exist=True)
    key = r.path("tls_key", base, must_exist=True)
    if (cert is None) != (key is None):
        r.problem("tls_cert" if cert is None else "tls_key", "tls_cert and tls_key go together")
    return AdminConfig(listen, tuple(allow) or d.allow, tuple(users), cert, key)


def _hosts(r: _Reader, table: str, raw: Any, mx_lookup: bool) -> tuple[Host, ...]:
    if not isinstance(raw, list) or not raw:
        r.problem(table, f"must be a non-empty array of tables ([[routes.{table}]])")
        return ()
    hosts = []
    for i, item in enumerate(raw, start=1):
        # Field names carry the table position so the user finds the line.
        hr = _Reader(r.problems, r.where, item, toml_keys(Host), prefix=f"{table}[{i}].")
        name = _host_name(hr, "host", hr.table.get("host"), mx_lookup)
        port = _port(hr, "port", hr.table.get("port", _PORT))
        load = hr.table.get("load")
        if isinstance(load, bool) or not isinstance(load, int) or not 1 <= load <= 100:
            hr.problem("load", f"must be a whole number from 1 to 100, got {load!r}")
            load = 0
        hosts.append(Host(name, port, load))
    total = sum(h.load for h in hosts)
    if all(h.load for h in hosts) and total != 100:
        loads = " + ".join(str(h.load) for h in hosts)
        r.problem(table, f"loads must add up to 100, got {loads} = {total}")
    return tuple(hosts)


def _host_name(r: _Reader, field_name: str, value: Any, mx_lookup: bool) -> str:
    if not isinstance(value, str) or not value:
        r.problem(field_name, "is required: a host name (recommended) or an IP address")
        return ""
    if mx_lookup:
        if is_ip_literal(value):
            r.problem(field_name, f"{value!r} is an IP address; with mx_lookup it must be a domain")
        elif not is_hostname(value):
            r.problem(field_name, f"{value!r} is not a valid domain")
        return value.lower().rstrip(".")
    literal = ip_literal(value)
    if literal is not None:
        return literal
    if not is_hostname(value):
        r.problem(field_name, f"{value!r} is not a valid host name or IP address")
    return value.lower().rstrip(".")


#: The port of a host that names none (and of one whose port is wrong).
_PORT: int = field_default(Host, "port")


def _port(r: _Reader, field_name: str, value: Any) -> int:
    problem = check_port(value)
    if problem:
        r.problem(field_name, problem)
        return _PORT
    return int(value)


def _route(problems: list[Problem], index: int, raw: Any, base: Path) -> Route | None:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    where = f"routes[{index}]" + (f" {name!r}" if isinstance(name, str) and name else "")
    r = _Reader(problems, where, raw, toml_keys(Route))
    if not isinstance(raw, Mapping):
        return None
    if not isinstance(name, str) or not name.strip():
        r.problem("name", "is required and must not be empty")
        name = ""
    mx_lookup = r.get("mx_lookup", bool, field_default(Route, "mx_lookup"))
    d = TlsPolicy()
    tls = TlsPolicy(
        require_tls=r.get("require_tls", bool, d.require_tls),
        require_ca_signed=r.get("require_ca_signed", bool, d.require_ca_signed),
        validate_hostname=r.get("validate_hostname", bool, d.validate_hostname),
    )
    # The options build on each other, as in the console: a certificate can
    # only be checked on a connection that is required to be encrypted.
    if tls.require_ca_signed and not tls.require_tls:
        also = " and validate_hostname = false" if tls.validate_hostname else ""
        r.problem(
            "require_ca_signed",
            "is on (the default) but needs require_tls = true; turn require_tls on, "
            f"or set require_ca_signed = false{also} too",
        )
    if tls.validate_hostname and not tls.require_ca_signed:
        r.problem(
            "validate_hostname",
            "is on (the default) but needs require_ca_signed = true; turn require_ca_signed on, "
            "or set validate_hostname = false too",
        )
    on_tls_failure = r.get("on_tls_failure", str, field_default(Route, "on_tls_failure"))
    if on_tls_failure not in ON_TLS_FAILURE:
        r.problem(
            "on_tls_failure",
            f'{on_tls_failure!r} is not a choice; use "bounce" (bounce at once, the default) '
            'or "defer" (keep the mail queued until max_lifetime)',
        )
        on_tls_failure = field_default(Route, "on_tls_failure")
    mta_sts = r.get("mta_sts", bool, field_default(Route, "mta_sts"))
    if "mta_sts" in raw and not mx_lookup:
        r.problem(
            "mta_sts", "applies to a route with mx_lookup = true only (fixed hosts have no MX)"
        )
    # The shape (one host, or tables) decides which fields apply; a wrong
    # shape is a problem of the route itself, and every field present is
    # still checked so that one run of check-config lists everything.
    single = [key for key in ("host", "port") if key in raw]
    tables = [key for key in ("primary", "secondary") if key in raw]
    shape_ok = True
    if single and tables:
        r.problem(
            "",
            f"has {' and '.join(single)} beside [[routes.{tables[0]}]] tables: a route has "
            "either host/port (one host) or primary/secondary tables (multiple hosts), not both",
        )
        shape_ok = False
    elif not single and not tables:
        r.problem("", "has no host: give host (and port), or [[routes.primary]] tables")
        return None
    elif tables and "primary" not in raw:
        r.problem("", "has [[routes.secondary]] but no [[routes.primary]]: secondaries need one")
        shape_ok = False
    host = _host_name(r, "host", raw.get("host"), mx_lookup) if "host" in raw or not tables else ""
    port = _port(r, "port", raw.get("port", _PORT))
    primary = _hosts(r, "primary", raw["primary"], mx_lookup) if "primary" in raw else ()
    secondary = _hosts(r, "secondary", raw["secondary"], mx_lookup) if "secondary" in raw else ()
    plaintext = r.get("auth_over_plaintext", bool, field_default(RouteAuth, "over_plaintext"))
    auth = _auth(r, base, plaintext, name) if "auth" in raw else None
    if "auth_over_plaintext" in raw and "auth" not in raw:
        r.problem("auth_over_plaintext", "applies to a route with auth = { ... } only")
    if not shape_ok:
        return None
    if not tables:
        return Route(
            name, (Host(host, port),), (), mx_lookup, tls, single=True,
            on_tls_failure=on_tls_failure, auth=auth, mta_sts=mta_sts,
        )  # fmt: skip
    return Route(
        name, primary, secondary, mx_lookup, tls, single=False,
        on_tls_failure=on_tls_failure, auth=auth, mta_sts=mta_sts,
    )  # fmt: skip


#: Group or others may read (or write, or run) the file: ssh refuses such a key.
_OPEN_MODE = 0o077


def password_file_problem(path: Path) -> str | None:
    """What is wrong with ``path`` as a password file, or None.

    Like ssh with a private key, a file others can read is refused: the
    message names the file and the fix.
    """
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        return f"cannot read {str(path)!r}: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        return f"{str(path)!r} is not a file"
    if mode & _OPEN_MODE:
        return (
            f"{str(path)!r} is readable by others (mode {stat.S_IMODE(mode):04o}): "
            f"a password file must be private; run: chmod 600 {path}"
        )
    return None


def _auth(r: _Reader, base: Path, over_plaintext: bool, route: str) -> RouteAuth | None:
    """``auth = { username = "...", password_file = "/path" }`` of a route."""
    raw = r.table.get("auth")
    if not isinstance(raw, Mapping):
        r.problem("auth", 'must be a table: auth = { username = "...", password_file = "/path" }')
        return None
    ar = _Reader(r.problems, r.where, raw, toml_keys(RouteAuth), prefix="auth.")
    username = ar.get("username", str, "")
    if not username:
        ar.problem("username", "is required: the account name the next hop knows")
    elif any(c in username for c in "\0\r\n"):
        ar.problem("username", "must not contain NUL or line breaks")
    path = ar.path("password_file", base, must_exist=False)
    if path is None:
        ar.problem(
            "password_file",
            "is required: a file holding only the password (the password never goes "
            "in this config)",
        )
        return None
    problem = password_file_problem(path)
    if problem is not None:
        ar.problem("password_file", problem)
        return None
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        ar.problem("password_file", f"cannot read {str(path)!r}: {exc}")
        return None
    # The first line is the password (a final line break is not part of it).
    lines = text.splitlines()
    password = lines[0] if lines else ""
    if not password or "\0" in password:
        ar.problem("password_file", f"{str(path)!r} holds no password on its first line")
        return None
    tag = _fingerprint(username, password)
    return RouteAuth(username, path, password, over_plaintext, tag, route)


def _fingerprint(username: str, password: str) -> str:
    # Slow and short on purpose: enough to see that the password changed,
    # too little (and too slow) to test guesses against the audit log.
    salt = b"relay-audit\0" + username.encode("utf-8")
    digest = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, 100_000)
    return digest.hex()[:8]


def _notify(reader: _Reader, addresses: tuple[str, ...]) -> tuple[str, ...]:
    """``[bounces] notify``: every entry a plain address, each once."""
    good: list[str] = []
    for address in addresses:
        if not is_mail_address(address):
            reader.problem(
                "notify", f"{address!r} is not a mail address like postmaster@example.com"
            )
        elif address not in good:
            good.append(address)
    return tuple(good)


def _delay_warning(reader: _Reader) -> float:
    """``[bounces] delay_warning``: a duration, or "0" (any zero) for no warnings."""
    value = reader.get("delay_warning", str, None)
    if value is None:
        return BouncesConfig().delay_warning
    if value.strip() and value.strip().rstrip("mshd").strip() in ("0", "0.0"):
        return 0.0
    return reader.duration("delay_warning", BouncesConfig().delay_warning)


def _patterns(r: _Reader, name: str) -> tuple[str, ...]:
    patterns = r.strings(name, ())
    if name in r.table and not patterns:
        r.problem(name, 'must list at least one pattern: an address, "@domain" or "*"')
    for pattern in patterns:
        local, at, domain = pattern.rpartition("@")
        ok = pattern == "*" or (at and is_hostname(domain_key(domain)) and "@" not in local)
        if not ok:
            r.problem(name, f'{pattern!r} is not an address, "@domain" or "*"')
    return patterns


def _rule(
    problems: list[Problem], index: int, raw: Any, route_names: Mapping[str, int]
) -> Rule | None:
    r = _Reader(problems, f"rules[{index}]", raw, toml_keys(Rule))
    if not isinstance(raw, Mapping):
        return None
    patterns = _patterns(r, "recipients")
    senders = _patterns(r, "senders")
    if "recipients" not in r.table and "senders" not in r.table:
        r.problem(
            "recipients",
            'is required (or senders): list at least one pattern, an address, "@domain" or "*"',
        )
    route = r.get("route", str, "")
    if not route:
        r.problem("route", "is required: the name of a route")
    elif route not in route_names:
        hint = suggest(route, list(route_names))
        tip = f"; did you mean {hint!r}?" if hint else ""
        r.problem("route", f"no route is named {route!r}{tip}")
    return Rule(patterns, route, senders)


def parse(
    data: Mapping[str, Any], source: Path, sha256: str = "", base: Path | None = None
) -> Config:
    """Validate parsed TOML ``data`` as read from ``source``; raise ConfigError.

    Relative paths in it are relative to ``base``, by default the folder
    of ``source``.
    """
    problems: list[Problem] = []
    base = source.resolve().parent if base is None else base
    top = _Reader(problems, "", data, toml_keys(Config))
    server = _server(problems, data.get("server", {}), base)
    queue = _queue(problems, data.get("queue", {}), base)
    delivery = _delivery(problems, data.get("delivery", {}))
    dns = _dns(problems, data.get("dns", {}))
    tls_reader = _Reader(problems, "tls", data.get("tls", {}), toml_keys(TlsConfig))
    ca_file = tls_reader.path("ca_file", base, must_exist=True)
    tls = TlsConfig(**tls_reader.settings(TlsConfig(), {"ca_file": ca_file}))
    metrics = _metrics(problems, data.get("metrics", {}))
    audit_reader = _Reader(problems, "audit", data.get("audit", {}), toml_keys(AuditConfig))
    audit = AuditConfig(
        audit_reader.path("path", base, must_exist=False) or (base / AuditConfig().path).resolve()
    )
    log = _log(problems, data.get("log", {}))

    raw_routes = top.get("routes", list, [])
    routes = [
        r for i, raw in enumerate(raw_routes, start=1) if (r := _route(problems, i, raw, base))
    ]
    names: dict[str, int] = {}
    for i, raw in enumerate(raw_routes, start=1):
        name = raw.get("name") if isinstance(raw, Mapping) else None
        if not isinstance(name, str) or not name.strip():
            continue
        if name in names:
            problems.append(
                Problem(f"routes[{i}] {name!r}", "name", f"duplicate: routes[{names[name]}] has it")
            )
        names.setdefault(name, i)
    rules = [
        rule
        for i, raw in enumerate(top.get("rules", list, []), start=1)
        if (rule := _rule(problems, i, raw, names)) is not None
    ]
    bounce_reader = _Reader(problems, "bounces", data.get("bounces", {}), toml_keys(BouncesConfig))
    bounces = BouncesConfig(
        bounce_reader.get("route", str, field_default(BouncesConfig, "route")),
        _notify(bounce_reader, bounce_reader.strings("notify", ())),
        _delay_warning(bounce_reader),
        bounce_reader.positive("max_returned_size", BouncesConfig().max_returned_size),
    )
    admin = _admin(problems, data.get("admin", {}), base)
    if bounces.route and bounces.route not in names:
        bounce_reader.problem("route", f"no route is named {bounces.route!r}")
    if bounces.delay_warning and bounces.delay_warning >= queue.max_lifetime:
        bounce_reader.problem(
            "delay_warning",
            "must be shorter than [queue] max_lifetime (the message bounces first); "
            'use "0" to send no delay warnings',
        )
    if problems:
        raise ConfigError(source, problems)
    return Config(
        source=source.resolve(),
        sha256=sha256,
        server=server,
        queue=queue,
        delivery=delivery,
        dns=dns,
        tls=tls,
        metrics=metrics,
        audit=audit,
        log=log,
        bounces=bounces,
        admin=admin,
        routes=tuple(routes),
        rules=tuple(rules),
    )


def load(path: Path | str) -> Config:
    """Read, parse and validate the TOML file at ``path``.

    Raises ConfigError for a missing or unreadable file, a TOML syntax
    error (with line and column) or any validation problem.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise ConfigError(path, [Problem("", "", f"cannot read config file: {reason}")]) from None
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(path, [Problem("", "", f"not UTF-8 text: {exc}")]) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [Problem("", "", f"TOML syntax error: {exc}")]) from None
    return parse(data, path, hashlib.sha256(raw).hexdigest())


#: The embedded default's name in the package: config/relay.toml, linked
#: (relay/default.toml is a symbolic link to it) and installed as package data.
_EMBEDDED_FILE = "default.toml"


def embedded_text() -> str:
    """The text of the embedded default config: config/relay.toml as packaged."""
    return resources.files("relay").joinpath(_EMBEDDED_FILE).read_text(encoding="utf-8")


def load_embedded() -> Config:
    """The embedded default, read as if it were config/relay.toml in the current folder.

    Its relative paths ("../var/spool") are relative to ./config, as they
    would be for that file, so its spool is ./var/spool either way.
    """
    source = Path.cwd() / EMBEDDED
    base = (Path.cwd() / DEFAULT_CONFIG).parent
    return parse(tomllib.loads(embedded_text()), source, "embedded", base=base)
