"""A real DNS server for tests: dnsmasq on 127.0.0.1 with records given per test.

Usage (the ``dns_server`` fixture is a factory; import it into a test module
or a conftest with ``from tests.support.dnsserver import dns_server``)::

    async def test_x(dns_server):
        server = dns_server(
            hosts={"mx1.example.test": ["127.0.0.1", "::1"]},
            mx={"example.test": [(10, "mx1.example.test")], "null.test": [(0, ".")]},
            servfail=["broken.test"],
            timeout=["slow.test"],
        )
        resolver = DnsResolver(server.config(timeout=1.0))

What dnsmasq answers (verified against dnsmasq 2.90):

- ``hosts``: A and AAAA records (``--host-record``); a name given only IPv4
  addresses answers AAAA with NOERROR and no data, and the other way round.
- ``hosts`` also gives each address its PTR record (the name).
- ``ptr``: PTR records alone, address → name (``--ptr-record``), e.g. a
  PTR whose name has no address record or another address.
- ``txt``: TXT records (``--txt-record``), name → texts, one record each.
- ``mx``: MX records (``--mx-host``); an exchange of ``"."`` gives RFC 7505's
  null MX ``MX 0 .``. A domain with MX but no host entry answers A/AAAA
  with NOERROR and no data.
- every other name, under any TLD: NXDOMAIN (``--local=/#/``: never forwarded).
- ``servfail``: these domains and their subdomains are forwarded to a tiny
  in-process UDP responder that answers SERVFAIL to everything; dnsmasq
  passes that SERVFAIL on.
- ``timeout``: these domains are forwarded to a UDP socket that never
  answers, so the client times out.

Use names under ``.test`` (RFC 2606). dnsmasq listens only on 127.0.0.1
(UDP and TCP, a free high port) and is stopped (terminate + wait) at the
end of the test. Tests skip when /usr/sbin/dnsmasq is missing.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import IO, NamedTuple

import dns.exception
import dns.flags
import dns.message
import dns.query
import dns.rcode
import dns.reversename
import pytest

from relay.config import DnsConfig
from tests.support.peers import DNSMASQ, require_dnsmasq

LOOPBACK = "127.0.0.1"


class DnsServer(NamedTuple):
    """Where a test DNS server listens: unpacks as ``ip, port``."""

    ip: str
    port: int

    def config(self, timeout: float = 2.0) -> DnsConfig:
        """A ``[dns]`` config that uses only this server."""
        return DnsConfig(nameservers=((self.ip, self.port),), timeout=timeout)


class _ServfailResponder:
    """Answers SERVFAIL to every UDP query: the dead upstream dnsmasq forwards to."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.sock.settimeout(0.1)
        self.port: int = self.sock.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="servfail-dns", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            reply = dns.message.make_response(query)
            reply.set_rcode(dns.rcode.SERVFAIL)
            reply.flags |= dns.flags.RA
            self.sock.sendto(reply.to_wire(), peer)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


def _free_port() -> int:
    """A port that is free for both UDP and TCP on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            udp.bind((LOOPBACK, 0))
            port: int = udp.getsockname()[1]
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
                try:
                    tcp.bind((LOOPBACK, port))
                except OSError:
                    continue
                return port
    raise RuntimeError("no free port for dnsmasq")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def dnsmasq_arguments(
    port: int,
    hosts: Mapping[str, Sequence[str]],
    mx: Mapping[str, Sequence[tuple[int, str]]],
    forward: Mapping[str, int],
    ptr: Mapping[str, str] | None = None,
    txt: Mapping[str, Sequence[str]] | None = None,
    ttl: int = 0,
) -> list[str]:
    """The dnsmasq command line serving these records on 127.0.0.1:port
    (with time to live ``ttl``: 0, dnsmasq's default, lets no client cache them)."""
    args = [
        DNSMASQ,
        "--no-daemon",
        "--no-resolv",
        "--no-hosts",
        "--bind-interfaces",
        f"--listen-address={LOOPBACK}",
        f"--port={port}",
        "--conf-file=/dev/null",
        "--pid-file=",
        "--cache-size=0",
        "--no-negcache",
        "--log-facility=-",
        "--log-queries",
        # Everything not configured below is NXDOMAIN, never forwarded.
        "--local=/#/",
        f"--local-ttl={ttl}",
    ]
    for name, addresses in hosts.items():
        for address in addresses:
            if not _is_ip(address):
                raise ValueError(f"{name}: {address!r} is not an IP address")
            args.append(f"--host-record={name},{address}")
    for address, name in (ptr or {}).items():
        # A PTR alone, with no address record behind it (a lying PTR).
        reverse = dns.reversename.from_address(address).to_text(omit_final_dot=True)
        args.append(f"--ptr-record={reverse},{name}")
    for name, texts in (txt or {}).items():
        for text in texts:
            # On the command line quotes are kept literally; a comma would
            # split the text into character-strings (joined again by readers).
            args.append(f"--txt-record={name},{text}")
    for domain, records in mx.items():
        for preference, exchange in records:
            args.append(f"--mx-host={domain},{exchange},{preference}")
    for domain, upstream in forward.items():
        # More specific than --local=/#/, so these names are forwarded.
        args.append(f"--server=/{domain}/{LOOPBACK}#{upstream}")
    return args


def _wait_ready(proc: subprocess.Popen[bytes], port: int, deadline: float) -> bool:
    """Poll until dnsmasq answers a query; False if it exited (port taken)."""
    query = dns.message.make_query("ready.invalid", "A")
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            dns.query.udp(query, LOOPBACK, port=port, timeout=0.2)
            return True
        except (dns.exception.Timeout, OSError):
            time.sleep(0.02)
    raise RuntimeError(f"dnsmasq did not answer on {LOOPBACK}:{port} within its start-up time")


class DnsmasqFactory:
    """Starts dnsmasq instances and stops them all on :meth:`close`."""

    def __init__(self) -> None:
        self._procs: list[tuple[subprocess.Popen[bytes], IO[bytes]]] = []
        self._responders: list[_ServfailResponder] = []
        self._silent: list[socket.socket] = []

    def __call__(
        self,
        hosts: Mapping[str, Sequence[str]] | None = None,
        mx: Mapping[str, Sequence[tuple[int, str]]] | None = None,
        servfail: Sequence[str] = (),
        timeout: Sequence[str] = (),
        ptr: Mapping[str, str] | None = None,
        txt: Mapping[str, Sequence[str]] | None = None,
        ttl: int = 0,
    ) -> DnsServer:
        forward: dict[str, int] = {}
        if servfail:
            responder = _ServfailResponder()
            self._responders.append(responder)
            forward.update(dict.fromkeys(servfail, responder.port))
        if timeout:
            silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            silent.bind((LOOPBACK, 0))
            self._silent.append(silent)
            forward.update(dict.fromkeys(timeout, silent.getsockname()[1]))
        for _ in range(5):
            port = _free_port()
            log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close()
            args = dnsmasq_arguments(port, hosts or {}, mx or {}, forward, ptr, txt, ttl)
            proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
            self._procs.append((proc, log))
            if _wait_ready(proc, port, time.monotonic() + 10):
                return DnsServer(LOOPBACK, port)
            # The port was taken between choosing and binding: try another.
            log.seek(0)
            reason = log.read().decode(errors="replace").strip()
            if "in use" not in reason:
                raise RuntimeError(f"dnsmasq failed to start: {reason}")
        raise RuntimeError("dnsmasq could not bind a free port")

    def close(self) -> None:
        for proc, log in self._procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            log.close()
        self._procs.clear()
        for responder in self._responders:
            responder.close()
        self._responders.clear()
        for sock in self._silent:
            sock.close()
        self._silent.clear()


@contextlib.contextmanager
def dnsmasq_servers() -> Iterator[DnsmasqFactory]:
    """The factory as a context manager, for fixtures of a wider scope."""
    require_dnsmasq()
    factory = DnsmasqFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def dns_server() -> Iterator[Callable[..., DnsServer]]:
    """Factory fixture: ``dns_server(hosts=..., mx=..., servfail=..., timeout=...)``."""
    with dnsmasq_servers() as factory:
        yield factory
