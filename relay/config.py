"""The TOML configuration: parsed into frozen dataclasses, validated all at once.

Defaults live in the dataclass field defaults and nowhere else. ``load``
either returns a complete, valid :class:`Config` or raises
:class:`ConfigError` listing every :class:`Problem` found, each naming
where (table or route) and which field.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import ipaddress
import re
import socket
import stat
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.addresses import domain_key, ip_literal, is_ip_literal
from relay.passwords import check_hash

#: The config a command uses when none is named (relay.cli.config_path).
DEFAULT_CONFIG = Path("config/relay.toml")
#: How the embedded default config is shown where a file's path would be.
EMBEDDED = "(embedded default)"


# --- the model --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Host:
    """One next hop of a route: a host name or IP literal (a domain with MX lookup)."""

    name: str
    port: int = 25
    #: Share of the route's table, 1-100; a table's loads add up to 100.
    load: int = 100


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    #: STARTTLS must be offered and succeed; otherwise the host fails.
    require_tls: bool = True
    #: The certificate chain must verify against the system store + [tls] ca_file.
    require_ca_signed: bool = True
    #: The certificate must match the name delivered to.
    validate_hostname: bool = True


@dataclass(frozen=True, slots=True)
class RouteAuth:
    """SMTP AUTH (RFC 4954) credentials of a route, for its next hops.

    The password is read from ``password_file`` at load (and at every
    reload), never written in the main config; ``repr`` leaves it out so
    no log line or traceback can show it.
    """

    username: str
    password_file: Path
    password: str = field(repr=False)
    #: Send the credentials on a connection without TLS (warned at load).
    over_plaintext: bool = False
    #: A short one-way tag of the password (PBKDF2), for the audit log's
    #: "credentials changed" without the password or a quick verifier of it.
    fingerprint: str = ""
    #: The route's name (for log lines and DSN text).
    route: str = ""

    def __str__(self) -> str:
        return f"{self.username} (password from {self.password_file})"


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    #: Tried first, in weighted random order. A single-host route has one.
    primary: tuple[Host, ...]
    #: Tried only when every primary failed.
    secondary: tuple[Host, ...] = ()
    #: Each host is a domain whose MX records give the real hosts.
    mx_lookup: bool = False
    tls: TlsPolicy = TlsPolicy()
    #: True when configured with ``host``/``port`` rather than tables.
    single: bool = True
    #: Not from the config: the recipient's (or a bounce's sender's) own
    #: domain, by MX. Only then are NXDOMAIN and null MX permanent failures.
    implicit: bool = False
    #: SMTP AUTH to the next hops, after STARTTLS; None: no AUTH.
    auth: RouteAuth | None = None
    #: When every host failed the TLS policy: "bounce" at once (as the
    #: console does) or "defer" (keep it queued until max_lifetime).
    on_tls_failure: str = "bounce"

    @property
    def tls_defers(self) -> bool:
        """A TLS-policy failure at every host keeps the mail queued rather than bouncing it."""
        return self.on_tls_failure == "defer"


#: The values of a route's ``on_tls_failure``, the default first.
ON_TLS_FAILURE = ("bounce", "defer")


#: Route name (and metric label) for mail sent straight to a domain's MX.
DIRECT_ROUTE = "(direct)"


def direct_route(domain: str) -> Route:
    """The implicit route to ``domain``'s MX hosts with opportunistic TLS.

    Used for bounces to a sender's domain and for relay_networks clients
    whose recipient matches no rule: what any MTA does with such mail.
    """
    return Route(
        name=DIRECT_ROUTE,
        primary=(Host(domain, 25, 100),),
        mx_lookup=True,
        tls=TlsPolicy(require_tls=False, require_ca_signed=False, validate_hostname=False),
        implicit=True,
    )


def address_key(address: str) -> str:
    """``address`` for comparison: the local part lower-cased, the domain by :func:`domain_key`."""
    local, at, domain = address.rpartition("@")
    if not at:
        return address.lower()
    return f"{local.lower()}@{domain_key(domain)}"


def _pattern_matches(patterns: Sequence[str], address: str) -> bool:
    """``address`` matches one of ``patterns``: a full address, "@domain" or "*"."""
    # Domains compare as A-labels (RFC 5890), so a U-label address
    # matches an "@xn--..." pattern and the other way round.
    address = address_key(address)
    domain = address.rpartition("@")[2]
    for pattern in patterns:
        pattern = address_key(pattern) if "@" in pattern else pattern
        if pattern == "*" or pattern == address:
            return True
        if pattern.startswith("@") and pattern[1:] == domain:
            return True
    return False


@dataclass(frozen=True, slots=True)
class Rule:
    #: Recipient patterns: a full address, "@domain", or "*"; empty: any recipient
    #: (a rule by sender only).
    recipients: tuple[str, ...]
    route: str
    #: Envelope sender patterns, the same syntax; empty: any sender. Only "*"
    #: matches the null sender (<>).
    senders: tuple[str, ...] = ()

    def matches(self, address: str, sender: str) -> bool:
        """The rule takes recipient ``address`` of mail from ``sender``: both
        lists, where given, must match."""
        if self.recipients and not _pattern_matches(self.recipients, address):
            return False
        return not self.senders or _pattern_matches(self.senders, sender)


@dataclass(frozen=True, slots=True)
class Listen:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    #: EHLO name, Received header, bounce From.
    hostname: str = field(default_factory=socket.getfqdn)
    listen: tuple[Listen, ...] = (Listen("127.0.0.1", 2525),)
    #: Recipient domains accepted for relaying.
    domains: tuple[str, ...] = ()
    #: Clients allowed to relay to any domain.
    relay_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_message_size: int = 36_700_160
    max_recipients: int = 100
    tls_cert: Path | None = None
    tls_key: Path | None = None
    #: Idle time after which an inbound session is closed, seconds.
    timeout: float = 300.0
    #: Seconds one DATA phase may take in all, however the bytes trickle in.
    data_timeout: float = 600.0
    #: Inbound connections open at once, over all listeners.
    max_connections: int = 1000
    #: With max_connections open, a session idle longer than this between
    #: commands is closed to let a new client in (Postfix's stress mode).
    busy_timeout: float = 10.0
    #: Inbound connections at once from one IPv4 address or IPv6 /64
    #: (relay_networks are exempt).
    max_connections_per_ip: int = 20
    #: Errors in one session after which each further error reply waits
    #: ``error_delay`` (Postfix's smtpd_soft_error_limit).
    soft_error_limit: int = 10
    #: Errors in one session after which it is closed with 421 (Postfix's
    #: smtpd_hard_error_limit).
    hard_error_limit: int = 20
    error_delay: float = 1.0
    #: Bytes of message data all sessions together hold in memory; beyond
    #: it DATA goes to the spool's temp file at once.
    max_memory: int = 64 * 1024 * 1024
    #: Accept "%", "!" and quoted "@" in the local part of a served domain's
    #: recipient from clients outside relay_networks.
    allow_routing_characters: bool = False
    #: Seconds for the client's reverse DNS (PTR and back) per connection.
    reverse_dns_timeout: float = 2.0


@dataclass(frozen=True, slots=True)
class QueueConfig:
    path: Path = Path("var/spool")
    #: Seconds undeliverable before a bounce.
    max_lifetime: float = 5 * 86400.0
    #: First retry delay in seconds; doubles (with jitter) per attempt.
    min_backoff: float = 60.0
    #: Retry delay ceiling in seconds.
    max_backoff: float = 3600.0


@dataclass(frozen=True, slots=True)
class DeliveryConfig:
    #: Delivery attempts running at once, over all next hops.
    max_concurrency: int = 20
    #: Connections at once to one next hop (host:port).
    max_per_host: int = 5
    #: Seconds to wait for a TCP connection and greeting.
    connect_timeout: float = 30.0
    #: Seconds to wait for any reply after connecting.
    command_timeout: float = 300.0
    #: Seconds an idle outbound session is kept for reuse.
    idle_timeout: float = 10.0
    #: Addresses tried per attempt, over all candidate hosts (Postfix: 5);
    #: every candidate host still gets one while the budget lasts.
    max_addresses: int = 5
    #: Seconds to wait for the reply after the message's final dot
    #: (RFC 5321 section 4.5.3.2.6 asks for 10 minutes).
    data_timeout: float = 600.0
    #: Seconds a next hop that failed (no connection, no greeting, a 4xx/5xx
    #: greeting, lost before MAIL) is skipped; doubles per repeated failure.
    hold_down: float = 30.0
    #: Ceiling of the doubling hold-down, in seconds.
    max_hold_down: float = 600.0


@dataclass(frozen=True, slots=True)
class DnsConfig:
    #: (ip, port) pairs; empty means the system resolver's nameservers.
    nameservers: tuple[tuple[str, int], ...] = ()
    timeout: float = 5.0


@dataclass(frozen=True, slots=True)
class TlsConfig:
    #: Extra trust anchors for outbound verification.
    ca_file: Path | None = None
    #: Seconds before a next hop's certificate expires from which it is warned about.
    expiry_warning: float = 21 * 86400.0


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    #: host:port for /metrics and /healthz; None disables the endpoint.
    listen: Listen | None = Listen("127.0.0.1", 9325)


@dataclass(frozen=True, slots=True)
class AuditConfig:
    path: Path = Path("var/audit.log")


@dataclass(frozen=True, slots=True)
class LogConfig:
    format: str = "text"
    level: str = "info"


@dataclass(frozen=True, slots=True)
class BouncesConfig:
    #: Route for bounces; "" means the rules, else the sender domain's MX.
    route: str = ""
    #: Addresses that get a copy of every DSN with the full diagnosis (like
    #: Postfix's notify_classes = bounce); empty: no copy.
    notify: tuple[str, ...] = ()
    #: Seconds a message waits before its sender is told once that it is
    #: delayed (an RFC 3464 "Action: delayed" DSN); 0 sends no warning, like
    #: Postfix's delay_warning_time, whose default is off too.
    delay_warning: float = 0.0


@dataclass(frozen=True, slots=True)
class AdminUser:
    """One person who may log in to the admin console (docs/console.md)."""

    name: str
    #: From ``relay admin-passwd`` (relay.passwords); never the password itself.
    password_hash: str


#: Who may reach the console when ``[admin] allow`` is not set: this machine.
ADMIN_ALLOW_DEFAULT = ("127.0.0.0/8", "::1/128")


@dataclass(frozen=True, slots=True)
class AdminConfig:
    #: host:port of the web console; None (the default) serves none.
    listen: Listen | None = None
    #: Client networks the console answers; every other address gets 403.
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = tuple(
        ipaddress.ip_network(n) for n in ADMIN_ALLOW_DEFAULT
    )
    users: tuple[AdminUser, ...] = ()
    #: Serve HTTPS (and mark the session cookie Secure) when both are set.
    tls_cert: Path | None = None
    tls_key: Path | None = None

    def allows(self, ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(addr in net for net in self.allow)

    def user(self, name: str) -> AdminUser | None:
        return next((u for u in self.users if u.name == name), None)


@dataclass(frozen=True, slots=True)
class Config:
    #: The file this was loaded from, and the sha256 of its bytes.
    source: Path
    sha256: str
    server: ServerConfig
    queue: QueueConfig = QueueConfig()
    delivery: DeliveryConfig = DeliveryConfig()
    dns: DnsConfig = DnsConfig()
    tls: TlsConfig = TlsConfig()
    metrics: MetricsConfig = MetricsConfig()
    audit: AuditConfig = AuditConfig()
    log: LogConfig = LogConfig()
    bounces: BouncesConfig = BouncesConfig()
    admin: AdminConfig = AdminConfig()
    routes: tuple[Route, ...] = ()
    rules: tuple[Rule, ...] = ()

    @property
    def shown_source(self) -> str:
        """The source as people see it: the file's path, or "(embedded default)"."""
        return EMBEDDED if self.source.name == EMBEDDED else str(self.source)

    def route(self, name: str) -> Route | None:
        for route in self.routes:
            if route.name == name:
                return route
        return None

    def route_for(self, address: str, sender: str) -> Route | None:
        """The route of the first rule that matches recipient ``address`` of
        mail from ``sender`` ("" for the null sender; first match wins)."""
        for rule in self.rules:
            if rule.matches(address, sender):
                return self.route(rule.route)
        return None

    @property
    def pid_file(self) -> Path:
        """Where the running daemon writes its pid, for ``reload`` and ``queue flush``."""
        return self.queue.path / "relay.pid"


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


# --- parsing helpers --------------------------------------------------------

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")

ALLOWED_PORTS = "25, 587, or 1024-65535"


def parse_duration(text: str) -> float:
    """``"30s"``, ``"15m"``, ``"4h"``, ``"5d"`` (also ``"500ms"``) to seconds."""
    match = _DURATION.match(text) if isinstance(text, str) else None
    if not match:
        raise ValueError(f"{text!r} is not a duration; use a number and a unit: 30s, 15m, 4h, 5d")
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def is_hostname(name: str) -> bool:
    """RFC 1123 host name: dot-separated labels of letters, digits and inner hyphens."""
    if not name or len(name) > 253:
        return False
    labels = name.rstrip(".").split(".")
    return all(_LABEL.match(label) for label in labels)


def is_mail_address(text: str) -> bool:
    """A plain ``local@domain`` address (ASCII, no display name, no brackets)."""
    local, at, domain = text.rpartition("@")
    return (
        bool(at and local)
        and text.isascii()
        and not any(c.isspace() or c in '<>"(),;:\\[]' for c in local)
        and is_hostname(domain)
    )


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


def parse_listen(text: str) -> Listen:
    """``"127.0.0.1:2525"``, ``"[::1]:2525"`` or ``"localhost:2525"``."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a host:port string")
    host, sep, port_text = text.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port (IPv6 as [::1]:2525)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        ipaddress.IPv6Address(host)
    elif ":" in host:
        raise ValueError(f"{text!r}: write an IPv6 address in brackets, as [::1]:2525")
    elif not (is_ip_literal(host) or is_hostname(host)):
        raise ValueError(f"{text!r}: {host!r} is not an IP address or host name")
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r}: port must be a number from 1 to 65535")
    return Listen(host, int(port_text))


def parse_nameserver(text: str) -> tuple[str, int]:
    """``"ip"`` or ``"ip:port"`` (``"[v6]:port"``); port defaults to 53."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string")
    if is_ip_literal(text) and not text.startswith("["):
        return (text, 53)
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not is_ip_literal(host) or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not an IP address or ip:port")
    return (host, int(port))


def suggest(word: str, known: Sequence[str]) -> str | None:
    """The known name the user most likely meant by ``word``, if any."""
    close = difflib.get_close_matches(word, known, n=1)
    if close:
        return close[0]
    # Abbreviations such as "mx" for "mx_lookup".
    starts = [k for k in known if k.startswith(word) or word.startswith(k)]
    return starts[0] if len(starts) == 1 else None


def check_port(port: Any) -> str | None:
    """The problem with an outbound port, or None when it is allowed."""
    if isinstance(port, bool) or not isinstance(port, int):
        return f"{port!r} is not a whole number; use {ALLOWED_PORTS}"
    if port == 465:
        return (
            "port 465 (implicit TLS) is not supported; use 587 or 25, "
            "where the relay upgrades with STARTTLS"
        )
    if port in (25, 587) or 1024 <= port <= 65535:
        return None
    return f"port {port} is not allowed; use {ALLOWED_PORTS}"


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


_TYPE_NAMES = {
    str: "a string",
    int: "a whole number",
    bool: "true or false",
    list: "a list",
    dict: "a table",
}

_TOP_KEYS = (
    "server", "queue", "delivery", "dns", "tls", "metrics", "audit", "log", "bounces",
    "admin", "routes", "rules",
)  # fmt: skip
_SERVER_KEYS = (
    "hostname", "listen", "domains", "relay_networks", "max_message_size", "max_recipients",
    "tls_cert", "tls_key", "timeout", "data_timeout", "max_connections",
    "max_connections_per_ip", "soft_error_limit", "hard_error_limit", "error_delay",
    "max_memory", "allow_routing_characters", "reverse_dns_timeout", "busy_timeout",
)  # fmt: skip
_ROUTE_KEYS = (
    "name", "host", "port", "mx_lookup", "require_tls", "require_ca_signed",
    "validate_hostname", "on_tls_failure", "primary", "secondary", "auth",
    "auth_over_plaintext",
)  # fmt: skip
_AUTH_KEYS = ("username", "password_file")
_HOST_KEYS = ("host", "port", "load")
_RULE_KEYS = ("recipients", "senders", "route")


# --- sections ---------------------------------------------------------------


def _server(problems: list[Problem], raw: Any, base: Path) -> ServerConfig:
    r = _Reader(problems, "server", raw, _SERVER_KEYS)
    defaults = ServerConfig(hostname="")
    hostname = r.get("hostname", str, "") or socket.getfqdn()
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
    domains = tuple(domain_key(d) for d in r.strings("domains", ()))
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
    soft = r.positive("soft_error_limit", defaults.soft_error_limit)
    hard = r.positive("hard_error_limit", defaults.hard_error_limit)
    if soft > hard:
        r.problem("soft_error_limit", f"must not exceed hard_error_limit ({soft} > {hard})")
    return ServerConfig(
        hostname=hostname,
        listen=tuple(listen) or defaults.listen,
        domains=domains,
        relay_networks=tuple(networks),
        max_message_size=r.positive("max_message_size", defaults.max_message_size),
        max_recipients=r.positive("max_recipients", defaults.max_recipients),
        tls_cert=cert,
        tls_key=key,
        timeout=r.duration("timeout", defaults.timeout),
        data_timeout=r.duration("data_timeout", defaults.data_timeout),
        max_connections=r.positive("max_connections", defaults.max_connections),
        busy_timeout=r.duration("busy_timeout", defaults.busy_timeout),
        max_connections_per_ip=r.positive(
            "max_connections_per_ip", defaults.max_connections_per_ip
        ),
        soft_error_limit=soft,
        hard_error_limit=hard,
        error_delay=r.duration("error_delay", defaults.error_delay),
        max_memory=r.positive("max_memory", defaults.max_memory),
        allow_routing_characters=r.get(
            "allow_routing_characters", bool, defaults.allow_routing_characters
        ),
        reverse_dns_timeout=r.duration("reverse_dns_timeout", defaults.reverse_dns_timeout),
    )


def _queue(problems: list[Problem], raw: Any, base: Path) -> QueueConfig:
    r = _Reader(problems, "queue", raw, ("path", "max_lifetime", "min_backoff", "max_backoff"))
    d = QueueConfig()
    cfg = QueueConfig(
        path=r.path("path", base, must_exist=False) or (base / d.path).resolve(),
        max_lifetime=r.duration("max_lifetime", d.max_lifetime),
        min_backoff=r.duration("min_backoff", d.min_backoff),
        max_backoff=r.duration("max_backoff", d.max_backoff),
    )
    if cfg.min_backoff > cfg.max_backoff:
        r.problem("min_backoff", "must not be longer than max_backoff")
    return cfg


def _delivery(problems: list[Problem], raw: Any) -> DeliveryConfig:
    known = tuple(f.name for f in dataclasses.fields(DeliveryConfig))
    r = _Reader(problems, "delivery", raw, known)
    d = DeliveryConfig()
    cfg = DeliveryConfig(
        max_concurrency=r.positive("max_concurrency", d.max_concurrency),
        max_per_host=r.positive("max_per_host", d.max_per_host),
        connect_timeout=r.duration("connect_timeout", d.connect_timeout),
        command_timeout=r.duration("command_timeout", d.command_timeout),
        idle_timeout=r.duration("idle_timeout", d.idle_timeout),
        max_addresses=r.positive("max_addresses", d.max_addresses),
        data_timeout=r.duration("data_timeout", d.data_timeout),
        hold_down=r.duration("hold_down", d.hold_down),
        max_hold_down=r.duration("max_hold_down", d.max_hold_down),
    )
    if cfg.hold_down > cfg.max_hold_down:
        r.problem("hold_down", "must not be longer than max_hold_down")
    return cfg


def _dns(problems: list[Problem], raw: Any) -> DnsConfig:
    r = _Reader(problems, "dns", raw, ("nameservers", "timeout"))
    servers = []
    for text in r.strings("nameservers", ()):
        try:
            servers.append(parse_nameserver(text))
        except ValueError as exc:
            r.problem("nameservers", str(exc))
    return DnsConfig(tuple(servers), r.duration("timeout", DnsConfig().timeout))


def _metrics(problems: list[Problem], raw: Any) -> MetricsConfig:
    r = _Reader(problems, "metrics", raw, ("listen",))
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
    r = _Reader(problems, "log", raw, ("format", "level"))
    fmt = r.get("format", str, "text")
    if fmt not in ("text", "json"):
        r.problem("format", f'{fmt!r} is not a log format; use "text" or "json"')
    level = r.get("level", str, "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        r.problem("level", f"{level!r} is not a level; use debug, info, warning or error")
    return LogConfig(fmt, level)


_ADMIN_KEYS = ("listen", "allow", "users", "tls_cert", "tls_key")


def _admin(problems: list[Problem], raw: Any, base: Path) -> AdminConfig:
    """``[admin]``: the web console (docs/console.md); off unless ``listen`` is set."""
    r = _Reader(problems, "admin", raw, _ADMIN_KEYS)
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
        ur = _Reader(problems, "admin", item, ("name", "password_hash"), prefix=f"users[{i}].")
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
        hr = _Reader(r.problems, r.where, item, _HOST_KEYS, prefix=f"{table}[{i}].")
        name = _host_name(hr, "host", hr.table.get("host"), mx_lookup)
        port = _port(hr, "port", hr.table.get("port", 25))
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


def _port(r: _Reader, field_name: str, value: Any) -> int:
    problem = check_port(value)
    if problem:
        r.problem(field_name, problem)
        return 25
    return int(value)


def _route(problems: list[Problem], index: int, raw: Any, base: Path) -> Route | None:
    name = raw.get("name") if isinstance(raw, Mapping) else None
    where = f"routes[{index}]" + (f" {name!r}" if isinstance(name, str) and name else "")
    r = _Reader(problems, where, raw, _ROUTE_KEYS)
    if not isinstance(raw, Mapping):
        return None
    if not isinstance(name, str) or not name.strip():
        r.problem("name", "is required and must not be empty")
        name = ""
    mx_lookup = r.get("mx_lookup", bool, False)
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
    on_tls_failure = r.get("on_tls_failure", str, ON_TLS_FAILURE[0])
    if on_tls_failure not in ON_TLS_FAILURE:
        r.problem(
            "on_tls_failure",
            f'{on_tls_failure!r} is not a choice; use "bounce" (bounce at once, the default) '
            'or "defer" (keep the mail queued until max_lifetime)',
        )
        on_tls_failure = ON_TLS_FAILURE[0]
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
    port = _port(r, "port", raw.get("port", 25))
    primary = _hosts(r, "primary", raw["primary"], mx_lookup) if "primary" in raw else ()
    secondary = _hosts(r, "secondary", raw["secondary"], mx_lookup) if "secondary" in raw else ()
    plaintext = r.get("auth_over_plaintext", bool, False)
    auth = _auth(r, base, plaintext, name) if "auth" in raw else None
    if "auth_over_plaintext" in raw and "auth" not in raw:
        r.problem("auth_over_plaintext", "applies to a route with auth = { ... } only")
    if not shape_ok:
        return None
    if not tables:
        return Route(
            name, (Host(host, port, 100),), (), mx_lookup, tls, single=True,
            on_tls_failure=on_tls_failure, auth=auth,
        )  # fmt: skip
    return Route(
        name, primary, secondary, mx_lookup, tls, single=False,
        on_tls_failure=on_tls_failure, auth=auth,
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
    ar = _Reader(r.problems, r.where, raw, _AUTH_KEYS, prefix="auth.")
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
    r = _Reader(problems, f"rules[{index}]", raw, _RULE_KEYS)
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


def parse(data: Mapping[str, Any], source: Path, sha256: str = "") -> Config:
    """Validate parsed TOML ``data`` as read from ``source``; raise ConfigError."""
    problems: list[Problem] = []
    base = source.resolve().parent
    top = _Reader(problems, "", data, _TOP_KEYS)
    server = _server(problems, data.get("server", {}), base)
    queue = _queue(problems, data.get("queue", {}), base)
    delivery = _delivery(problems, data.get("delivery", {}))
    dns = _dns(problems, data.get("dns", {}))
    tls_reader = _Reader(problems, "tls", data.get("tls", {}), ("ca_file", "expiry_warning"))
    tls = TlsConfig(
        tls_reader.path("ca_file", base, must_exist=True),
        tls_reader.duration("expiry_warning", TlsConfig().expiry_warning),
    )
    metrics = _metrics(problems, data.get("metrics", {}))
    audit_reader = _Reader(problems, "audit", data.get("audit", {}), ("path",))
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
    bounce_reader = _Reader(
        problems, "bounces", data.get("bounces", {}), ("route", "notify", "delay_warning")
    )
    bounces = BouncesConfig(
        bounce_reader.get("route", str, ""),
        _notify(bounce_reader, bounce_reader.strings("notify", ())),
        _delay_warning(bounce_reader),
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


def describe(config: Config) -> list[str]:
    """Human-readable summary lines, one per route (for check-config and start-up logs)."""
    lines = []
    for route in config.routes:
        opts = [
            f"{opt}={'on' if getattr(route.tls, opt) else 'off'}"
            for opt in ("require_tls", "require_ca_signed", "validate_hostname")
        ]
        if route.tls.require_tls or route.tls_defers:
            # Without require_tls no host can fail the policy: nothing to show.
            opts.append(f"on_tls_failure={route.on_tls_failure}")
        if route.mx_lookup:
            opts.insert(0, "mx_lookup")
        lines.append(f"route {route.name!r}: {' '.join(opts)}")
        tables = [("primary", route.primary), ("secondary", route.secondary)]
        for table, hosts in tables:
            for host in hosts:
                label = "host" if route.single else table
                share = "" if route.single else f" load {host.load}%"
                lines.append(f"  {label} {host.name} port {host.port}{share}")
        if route.auth is not None:
            plain = ", also without TLS (auth_over_plaintext)" if route.auth.over_plaintext else ""
            lines.append(f"  auth {route.auth}{plain}")
    for i, rule in enumerate(config.rules, start=1):
        lines.append(f"rule {i}: {rule_text(rule)} -> {rule.route!r}")
    return lines


def rule_text(rule: Rule) -> str:
    """``@a.test, bob@b.test`` or ``senders @dept.test; recipients *`` (check-config)."""
    recipients = ", ".join(rule.recipients)
    if not rule.senders:
        return recipients
    senders = f"senders {', '.join(rule.senders)}"
    return f"{senders}; recipients {recipients}" if recipients else f"{senders}; any recipient"


# --- diff (for the audit log) -----------------------------------------------

#: The settings sections a diff compares field by field, in output order.
DIFF_SECTIONS = (
    "server", "queue", "delivery", "dns", "tls", "metrics", "audit", "log", "bounces",
)  # fmt: skip


def _plain(value: Any) -> Any:
    """A JSON-ready form of a config value: Paths, networks, Listen as strings."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, tuple | list):
        return [_plain(item) for item in value]
    return str(value)


def _hosts_text(hosts: Sequence[Host]) -> list[str]:
    return [f"{h.name}:{h.port} load {h.load}" for h in hosts]


def route_snapshot(route: Route) -> dict[str, Any]:
    """One route as flat ``field: value`` pairs, the unit a route diff compares.

    A single-host route shows ``host`` and ``port``; a multiple-host route
    shows its ``primary`` and ``secondary`` tables as ``host:port load N``.
    """
    fields: dict[str, Any] = {}
    if route.single:
        fields["host"] = route.primary[0].name
        fields["port"] = route.primary[0].port
    else:
        fields["primary"] = _hosts_text(route.primary)
        fields["secondary"] = _hosts_text(route.secondary)
    fields["mx_lookup"] = route.mx_lookup
    fields["require_tls"] = route.tls.require_tls
    fields["require_ca_signed"] = route.tls.require_ca_signed
    fields["validate_hostname"] = route.tls.validate_hostname
    fields["on_tls_failure"] = route.on_tls_failure
    if route.auth is not None:
        # Only when set, so a route without auth reads as before auth existed.
        # The password never: its fingerprint says whether it changed.
        fields["auth"] = str(route.auth)
        fields["credentials"] = route.auth.fingerprint
        if route.auth.over_plaintext:
            fields["auth_over_plaintext"] = True
    return fields


def _rule_snapshot(rule: Rule) -> dict[str, Any]:
    fields: dict[str, Any] = {"recipients": list(rule.recipients), "route": rule.route}
    if rule.senders:
        # Only when given: a rule without senders reads as it did before
        # senders existed, so older audit logs diff cleanly against it.
        fields["senders"] = list(rule.senders)
    return fields


#: Fields added after audit logs were first written, with the value every
#: route (or section) had before: an older snapshot without them is read as
#: having had that value, so an upgrade is not logged as a change.
_FIELDS_SINCE: dict[str, dict[str, Any]] = {
    "routes": {"on_tls_failure": "bounce"},
    "tls": {"expiry_warning": TlsConfig().expiry_warning},
}


def snapshot(config: Config) -> dict[str, Any]:
    """The whole effective configuration as JSON-ready data (what the audit log keeps).

    ``{"routes": {name: fields}, "rules": [{"recipients", "route"}], "server": {...}, ...}``
    (a rule's ``"senders"`` only when it has some).
    """
    snap: dict[str, Any] = {
        "routes": {route.name: route_snapshot(route) for route in config.routes},
        "rules": [_rule_snapshot(r) for r in config.rules],
    }
    for section in DIFF_SECTIONS:
        value = getattr(config, section)
        snap[section] = {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    # (ip, port) pairs read better as the "ip:port" the config file uses.
    snap["dns"]["nameservers"] = [
        f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}" for ip, port in config.dns.nameservers
    ]
    return snap


def _fields_diff(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, list[Any]]:
    """``{field: [old, new]}`` for every field that differs; a missing field is None."""
    keys = list(old) + [k for k in new if k not in old]
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def _named_diff(
    old: Mapping[str, Mapping[str, Any]], new: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    changed = {
        name: fields
        for name in old
        if name in new and (fields := _fields_diff(old[name], new[name]))
    }
    return {
        "added": [name for name in new if name not in old],
        "removed": [name for name in old if name not in new],
        "changed": changed,
    }


def diff_snapshots(old: Mapping[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    """What changed from snapshot ``old`` to snapshot ``new`` (see :func:`diff`)."""
    # Rules have no names and their order matters (first match wins), so a
    # rule is known by its position: "rules[2]" changed means the second rule.
    old_rules = {f"rules[{i}]": r for i, r in enumerate(old.get("rules", []), start=1)}
    new_rules = {f"rules[{i}]": r for i, r in enumerate(new.get("rules", []), start=1)}
    since = _FIELDS_SINCE["routes"]
    old_routes = {name: {**since, **fields} for name, fields in old.get("routes", {}).items()}
    routes = _named_diff(old_routes, new.get("routes", {}))
    for fields in routes["changed"].values():
        if "credentials" in fields:
            # Not even the fingerprints: the audit says "credentials changed".
            fields["credentials"] = [v if v is None else "(hidden)" for v in fields["credentials"]]
    result: dict[str, Any] = {
        "routes": routes,
        "rules": _named_diff(old_rules, new_rules),
    }
    for section in DIFF_SECTIONS:
        before = {**_FIELDS_SINCE.get(section, {}), **old.get(section, {})}
        result[section] = _fields_diff(before, new.get(section, {}))
    return result


def diff(old: Config, new: Config) -> dict[str, Any]:
    """What changed from ``old`` to ``new``: pure, deterministic, JSON-serialisable.

    ``{"routes": {"added": [names], "removed": [names], "changed": {name:
    {field: [old, new]}}}, "rules": {same, keyed "rules[N]"}, "server":
    {field: [old, new]}, "queue": {...}, ...}`` with every section of
    :data:`DIFF_SECTIONS` present (empty when unchanged). Route fields are
    those of :func:`route_snapshot`; values are strings, numbers, booleans,
    None or lists of them. The file's own hash is not part of the diff.
    """
    return diff_snapshots(snapshot(old), snapshot(new))


def diff_is_empty(changes: Mapping[str, Any]) -> bool:
    """True when a :func:`diff` result records no change at all."""
    for key, value in changes.items():
        if key in ("routes", "rules"):
            if value["added"] or value["removed"] or value["changed"]:
                return False
        elif value:
            return False
    return True
