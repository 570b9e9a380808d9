"""A minimal SMTP sink with STARTTLS, for the TLS variant of the benchmark.

Postfix's ``smtp-sink`` has no TLS, so the "downstream requires TLS with a
verified certificate" variant needs its own sink. This one is a plain
asyncio Protocol (no aiosmtpd, to stay cheap): it answers every command
with 250, requires STARTTLS before MAIL when a certificate is given,
accepts PIPELINING, discards message bodies and prints ``mesg=N`` progress
lines on stdout (the format :class:`tests.bench.postfix_baseline.SmtpSink`
reads), so both sinks are driven the same way. Run as::

    python -m tests.bench.pysink PORT [--cert CRT --key KEY]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import re
import signal
import ssl
import subprocess
import sys
from pathlib import Path

from tests.bench.postfix_baseline import SmtpSink
from tests.support.procs import ROOT, wait_port

_END = b"\r\n.\r\n"


class _Counter:
    def __init__(self) -> None:
        self.messages = 0
        #: Completed TLS handshakes: tells a client that reuses its TLS
        #: connections from one that makes a handshake per message.
        self.handshakes = 0


class _Session(asyncio.Protocol):
    def __init__(self, counter: _Counter, tls: ssl.SSLContext | None) -> None:
        self.counter = counter
        self.tls = tls
        self.secure = False
        self.buffer = b""
        self.in_data = False
        self.upgrading = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        transport.write(b"220 sink.test ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.upgrading:
            # With TLS 1.3 the client's first command (EHLO) can come with its
            # Finished message, before start_tls() has returned the new
            # transport: a reply now would go out in clear on the old one.
            return
        replies: list[bytes] = []
        while self.buffer:
            if self.in_data:
                end = self.buffer.find(_END)
                if end < 0:
                    # Keep only a tail that may hold the start of the terminator.
                    self.buffer = self.buffer[-4:] if len(self.buffer) > 4 else self.buffer
                    break
                self.buffer = self.buffer[end + len(_END) :]
                self.in_data = False
                self.counter.messages += 1
                replies.append(b"250 2.0.0 Ok: queued\r\n")
                continue
            line_end = self.buffer.find(b"\r\n")
            if line_end < 0:
                break
            line, self.buffer = self.buffer[:line_end], self.buffer[line_end + 2 :]
            verb = line[:4].upper()
            if verb == b"EHLO":
                tls = b"250-STARTTLS\r\n" if self.tls and not self.secure else b""
                replies.append(b"250-sink.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n" + tls)
                replies.append(b"250 SIZE 104857600\r\n")
            elif verb == b"STAR" and self.tls and not self.secure:
                assert self.transport is not None
                self.transport.write(b"".join(replies) + b"220 2.0.0 Ready to start TLS\r\n")
                self.transport.pause_reading()
                # RFC 3207 section 4.2: nothing sent before the handshake counts.
                self.upgrading, self.buffer = True, b""
                asyncio.ensure_future(self._start_tls())
                return
            elif verb == b"MAIL" and self.tls and not self.secure:
                replies.append(b"530 5.7.0 Must issue a STARTTLS command first\r\n")
            elif verb == b"DATA":
                # The terminator's CRLF may be the one ending DATA's line (empty body).
                self.in_data, self.buffer = True, b"\r\n" + self.buffer
                replies.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
            elif verb == b"QUIT":
                assert self.transport is not None
                self.transport.write(b"".join(replies) + b"221 2.0.0 Bye\r\n")
                self.transport.close()
                return
            else:
                replies.append(b"250 2.0.0 Ok\r\n")
        if replies and self.transport is not None:
            self.transport.write(b"".join(replies))

    async def _start_tls(self) -> None:
        assert self.transport is not None and self.tls is not None
        loop = asyncio.get_running_loop()
        try:
            new = await loop.start_tls(self.transport, self, self.tls, server_side=True)
        except (OSError, ssl.SSLError):
            self.transport.close()
            return
        assert new is not None
        self.transport, self.secure, self.upgrading = new, True, False
        self.counter.handshakes += 1
        if self.buffer:
            self.data_received(b"")


async def _serve(port: int, tls: ssl.SSLContext | None) -> None:
    counter = _Counter()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: _Session(counter, tls), "127.0.0.1", port, backlog=512, reuse_address=True
    )
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    shown = (-1, -1)
    async with server:
        while not stop.is_set():
            if (counter.messages, counter.handshakes) != shown:
                shown = (counter.messages, counter.handshakes)
                print(f"sess=0 quit=0 mesg={shown[0]} tls={shown[1]}", flush=True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.02)


class PySink(SmtpSink):
    """This sink as a child process, driven like :class:`SmtpSink`."""

    def __init__(self, cert: Path | None = None, key: Path | None = None) -> None:
        super().__init__()
        self.cert, self.key = cert, key

    def start(self) -> PySink:
        argv = [sys.executable, "-m", "tests.bench.pysink", str(self.port)]
        if self.cert and self.key:
            argv += ["--cert", str(self.cert), "--key", str(self.key)]
        with self.out_path.open("wb") as out:
            self._proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT
            )
        wait_port("127.0.0.1", self.port, 10)
        return self

    def handshakes(self) -> int:
        """TLS handshakes completed so far (the last ``tls=N`` progress figure)."""
        counts = re.findall(rb"tls=(\d+)", self.out_path.read_bytes())
        return int(counts[-1]) if counts else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("port", type=int)
    parser.add_argument("--cert", type=Path)
    parser.add_argument("--key", type=Path)
    args = parser.parse_args(argv)
    tls = None
    if args.cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.cert, args.key)
    asyncio.run(_serve(args.port, tls))
    return 0


if __name__ == "__main__":
    sys.exit(main())
