"""A wedged SMTP server for the ``hung`` benchmark: it accepts TCP and never greets.

This is the failure that costs an MTA the most: the connection succeeds at
once, so the client waits its whole greeting timeout (RFC 5321 4.5.3.2.1:
the 220 greeting) before it gives up on the host. The listener counts the
connections it accepted, which is the figure the benchmark reports: how
often each MTA went back to a host that never answers.

It runs in a thread of the benchmark process, holds every accepted socket
open (reading and discarding whatever the client sends) until the client
closes it, and closes everything on ``stop()``. Loopback only.
"""

from __future__ import annotations

import selectors
import socket
import threading

from tests.support import configs
from tests.support.procs import free_port


class WedgedHost:
    """Listens on ``host``:``port`` (a loopback address); ``accepted`` counts connections."""

    def __init__(self, host: str = "127.0.0.2", port: int | None = None) -> None:
        if not host.startswith("127."):
            raise ValueError("the wedged host listens on a loopback address only")
        self.host = host
        self.port = port or free_port()
        self.accepted = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._selector = selectors.DefaultSelector()
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="wedged-host", daemon=True)

    @property
    def open_connections(self) -> int:
        """Connections accepted and not yet closed by their client."""
        with self._lock:
            return sum(1 for key in self._selector.get_map().values() if key.data == "peer")

    def start(self) -> WedgedHost:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.host, self.port))
        # A deep backlog: every connection the MTAs make is accepted and counted.
        listener.listen(512)
        listener.setblocking(False)
        self._listener = listener
        self._selector.register(listener, selectors.EVENT_READ, "listener")
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            for key, _ in self._selector.select(timeout=0.1):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if key.data == "listener":
                    self._accept(sock)
                else:
                    self._drain(sock)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                peer, _ = listener.accept()
            except BlockingIOError:
                return
            peer.setblocking(False)
            with self._lock:
                self.accepted += 1
                self._selector.register(peer, selectors.EVENT_READ, "peer")

    def _drain(self, peer: socket.socket) -> None:
        try:
            data = peer.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the client gave up (its greeting timeout): forget it
            with self._lock:
                self._selector.unregister(peer)
            peer.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(5)
        with self._lock:
            for key in list(self._selector.get_map().values()):
                self._selector.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
        self._selector.close()

    def __enter__(self) -> WedgedHost:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


#: The ``hung`` variant: one of two 50/50 primaries accepts TCP and never
#: greets. relay's ``connect_timeout`` covers the TCP connect and the
#: greeting; Postfix splits them into ``smtp_connect_timeout`` (TCP only) and
#: ``smtp_helo_timeout`` (the greeting), so both get this value.
HUNG_TIMEOUT_S = 8
#: Wall-clock limit for one MTA's run: what is not at the sink by then is
#: reported as not delivered, and the MTA is stopped.
HUNG_DEADLINE_S = 60.0
#: The wedged primary; the healthy one is the sink on 127.0.0.1. Distinct
#: loopback addresses, so each MTA sees two hosts, not two ports of one.
WEDGED_ADDRESS = "127.0.0.2"
SINK_ADDRESS = "127.0.0.1"


def hung_route(wedged_port: int, sink_port: int) -> str:
    """relay's route: two primaries at 50/50, the wedged one listed first."""
    primaries = [(WEDGED_ADDRESS, wedged_port, 50), (SINK_ADDRESS, sink_port, 50)]
    return configs.route("Hung", primary=primaries)


def hung_postfix_settings(
    wedged_port: int, sink_port: int, timeout_s: int = HUNG_TIMEOUT_S
) -> dict[str, str]:
    """Postfix the same way: both hosts for every message, in a random order.

    That is what relay does with the route (a weighted random order of the
    primaries, the next one tried in the same attempt) and what Postfix does
    with two MX records of equal preference. MX records would need Postfix's
    resolver, which reads /etc/resolv.conf and cannot be pointed at a test
    DNS server on another port, so the list is the relayhost instead
    (several destinations: Postfix 3.5+, tried in order in one delivery) and
    the order is drawn per message: ``randmap:`` (Postfix 3.0+) picks one of
    two names per lookup, ``pipemap:`` turns the name into its list, and
    ``sender_dependent_relayhost_maps`` overrides ``relayhost`` for every
    message. (A plain ``randmap`` of the two hosts would give each message
    one host and no fall-back: not what either MTA does with two MX.)
    """
    wedged, sink = f"[{WEDGED_ADDRESS}]:{wedged_port}", f"[{SINK_ADDRESS}]:{sink_port}"
    orders = f"inline:{{{{wedged_first = {wedged}, {sink}}}, {{sink_first = {sink}, {wedged}}}}}"
    return {
        "sender_dependent_relayhost_maps": (
            f"pipemap:{{randmap:{{wedged_first, sink_first}}, {orders}}}"
        ),
        "smtp_connect_timeout": f"{timeout_s}s",
        "smtp_helo_timeout": f"{timeout_s}s",
    }
