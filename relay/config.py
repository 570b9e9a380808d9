"""The configuration model: frozen dataclasses, one per TOML table.

Each default and each TOML key lives here, on the field it sets, and
nowhere else: relay.configload reads a file into these classes (asking
:func:`toml_keys` which keys a table may hold and :func:`field_default` what an
absent one means), relay.configdiff describes and compares them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relay.addresses import domain_key

#: The config a command uses when none is named (relay.cli.config_path).
DEFAULT_CONFIG = Path("config/relay.toml")
#: How the embedded default config is shown where a file's path would be.
EMBEDDED = "(embedded default)"

#: Field metadata: the TOML keys that set a field, when they are not just
#: its own name; none for a field no key of its table sets.
_TOML = "toml"


def toml(*keys: str) -> dict[str, tuple[str, ...]]:
    """Metadata for a field set by TOML ``keys`` (none: not from the file)."""
    return {_TOML: keys}


def toml_keys(cls: type) -> tuple[str, ...]:
    """The keys a TOML table of dataclass ``cls`` may hold, in field order."""
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        keys.extend(f.metadata.get(_TOML, (f.name,)))
    return tuple(keys)


def field_default(cls: type, name: str) -> Any:
    """The default of field ``name`` of dataclass ``cls``."""
    [f] = [f for f in dataclasses.fields(cls) if f.name == name]
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    if f.default is dataclasses.MISSING:
        raise TypeError(f"{cls.__name__}.{name} has no default")
    return f.default


# --- the model --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Host:
    """One next hop of a route: a host name or IP literal (a domain with MX lookup)."""

    name: str = field(metadata=toml("host"))
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
    password: str = field(repr=False, metadata=toml())
    #: Send the credentials on a connection without TLS (warned at load);
    #: the route's ``auth_over_plaintext`` sets it.
    over_plaintext: bool = field(default=False, metadata=toml())
    #: A short one-way tag of the password (PBKDF2), for the audit log's
    #: "credentials changed" without the password or a quick verifier of it.
    fingerprint: str = field(default="", metadata=toml())
    #: The route's name (for log lines and DSN text).
    route: str = field(default="", metadata=toml())

    def __str__(self) -> str:
        return f"{self.username} (password from {self.password_file})"


#: The values of a route's ``on_tls_failure``, the default first.
ON_TLS_FAILURE = ("bounce", "defer")


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    #: Tried first, in weighted random order. A single-host route has one,
    #: from ``host`` and ``port``; a route of tables lists [[routes.primary]].
    primary: tuple[Host, ...] = field(metadata=toml("host", "port", "primary"))
    #: Tried only when every primary failed.
    secondary: tuple[Host, ...] = ()
    #: Each host is a domain whose MX records give the real hosts.
    mx_lookup: bool = False
    #: Written flat in the route's table (``require_tls = false``).
    tls: TlsPolicy = field(default=TlsPolicy(), metadata=toml(*toml_keys(TlsPolicy)))
    #: True when configured with ``host``/``port`` rather than tables.
    single: bool = field(default=True, metadata=toml())
    #: Not from the config: the recipient's (or a bounce's sender's) own
    #: domain, by MX. Only then are NXDOMAIN and null MX permanent failures.
    implicit: bool = field(default=False, metadata=toml())
    #: SMTP AUTH to the next hops, after STARTTLS; None: no AUTH.
    auth: RouteAuth | None = field(default=None, metadata=toml("auth", "auth_over_plaintext"))
    #: When every host failed the TLS policy: "bounce" at once (as the
    #: console does) or "defer" (keep it queued until max_lifetime).
    on_tls_failure: str = ON_TLS_FAILURE[0]
    #: With ``mx_lookup``: apply the MTA-STS policy (RFC 8461) each domain
    #: publishes (relay/mtasts.py). Routes to fixed hosts have no MX to check.
    mta_sts: bool = True

    @property
    def tls_defers(self) -> bool:
        """A TLS-policy failure at every host keeps the mail queued rather than bouncing it."""
        return self.on_tls_failure == "defer"


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
    #: Worker processes (relay.workers); "auto" in the file is the cores
    #: this process may run on. 1: one process, no supervisor.
    workers: int = 1
    #: "asyncio" or "uvloop" (relay.loops); applies at start.
    event_loop: str = "asyncio"


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
    #: Bytes of the original message a DSN returns when its sender asked
    #: for the full message (RFC 3461 RET=FULL); a longer one is returned
    #: as its headers only (as Postfix's bounce_size_limit, 50000).
    max_returned_size: int = 50_000


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
    source: Path = field(metadata=toml())
    sha256: str = field(metadata=toml())
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
