"""The wait a client sees for each reply, measured by one extra session under load.

``smtp-source`` gives no timing per command. While it loads an MTA with its
20 sessions, a ReplyProbe runs one more session in a thread, in the same
shape (``smtp-source``'s: one command at a time, no pipelining; a new
connection per message or one connection for every message), and records
how long each reply took from the moment the command was sent: the greeting
(from the connect), EHLO, MAIL, RCPT, DATA, the final dot and QUIT. The
median and 99th percentile per command are what a client waits for a turn
of the MTA.

Bounded: ``max_messages``, and every read times out.
"""

from __future__ import annotations

import socket
import statistics
import threading
import time

from tests.bench.pacer import message

_TIMEOUT = 30.0
COMMANDS = ("greeting", "ehlo", "mail", "rcpt", "data", "dot", "quit")


class ReplyProbe:
    """One SMTP session in a thread, timing every reply, until ``stop()``."""

    def __init__(
        self, port: int, size: int, one_per_connection: bool, max_messages: int = 20_000
    ) -> None:
        self.port, self.one_per_connection = port, one_per_connection
        self.max_messages = max_messages
        self.body = message(size)
        self.waits: dict[str, list[float]] = {name: [] for name in COMMANDS}
        #: Messages the MTA answered 250 to (so the sink will receive them).
        self.messages = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="reply-probe", daemon=True)

    def start(self) -> ReplyProbe:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(_TIMEOUT + 5)

    def summary(self) -> dict[str, object]:
        """p50 and p99 in ms per command, and how many of each were timed."""
        out: dict[str, object] = {"messages": self.messages}
        for name, waits in self.waits.items():
            if len(waits) >= 2:
                q = statistics.quantiles(waits, n=100, method="inclusive")
                out[name] = f"{q[49] * 1000:.1f}/{q[98] * 1000:.1f}"
        if self.error:
            out["error"] = self.error
        return out

    def _run(self) -> None:
        try:
            while not self._stop.is_set() and self.messages < self.max_messages:
                self._session()
        except (OSError, ValueError) as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _session(self) -> None:
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", self.port), timeout=_TIMEOUT) as sock:
            replies = sock.makefile("rb")
            self._reply(replies, "greeting", started)
            self._command(sock, replies, "ehlo", b"EHLO probe.test\r\n")
            while True:
                self._command(sock, replies, "mail", b"MAIL FROM:<bench@source.test>\r\n")
                self._command(sock, replies, "rcpt", b"RCPT TO:<bench@example.org>\r\n")
                self._command(sock, replies, "data", b"DATA\r\n", b"354")
                self._command(sock, replies, "dot", self.body)
                self.messages += 1
                if self.one_per_connection or self._stop.is_set():
                    break
                if self.messages >= self.max_messages:
                    break
            self._command(sock, replies, "quit", b"QUIT\r\n", b"221")

    def _command(
        self, sock: socket.socket, replies: object, name: str, line: bytes, want: bytes = b"250"
    ) -> None:
        started = time.perf_counter()
        sock.sendall(line)
        self._reply(replies, name, started, want)

    def _reply(self, replies: object, name: str, started: float, want: bytes = b"2") -> None:
        while True:
            line = replies.readline()  # type: ignore[attr-defined]
            if not line:
                raise ValueError(f"connection closed waiting for the {name} reply")
            if line[3:4] != b"-":
                break
        self.waits[name].append(time.perf_counter() - started)
        if not line.startswith(want):
            raise ValueError(f"{name}: {line.decode(errors='replace').strip()}")
