"""How two processes share one listening port: SO_REUSEPORT against one inherited socket.

``python -m tests.bench listen_spread`` (or ``python -m
tests.bench.bench_listen_spread --connections 4000``). Two asyncio
processes serve a port; each connection gets a greeting, one line read,
about ``--work-ms`` of CPU (a relay's work per message), a reply, close.
20 clients open ``--connections`` connections in all, one after another
each. The figures: connections per process (the spread) and connections
per second. ``reuseport``: each process binds its own socket with
SO_REUSEPORT (the kernel picks the socket by a hash of the connection's
addresses and ports). ``inherited``: the parent binds one socket, both
children accept on it (whichever loop is woken first takes what is
waiting; asyncio accepts up to the backlog per wake-up). Alternates the
two, ``--rounds`` times. Bounded in connections and time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import signal
import socket
import time
from collections.abc import Sequence
from multiprocessing.connection import Connection

CLIENTS = 20


def _burn(ms: float) -> None:
    end = time.perf_counter() + ms / 1000
    while time.perf_counter() < end:
        pass


def _serve(port: int, sock: socket.socket | None, work_ms: float, out: Connection) -> None:
    count = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        writer.write(b"220 ready\r\n")
        await reader.readline()
        _burn(work_ms)
        count += 1
        writer.write(b"250 ok\r\n")
        await writer.drain()
        writer.close()

    async def main() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        if sock is None:
            server = await asyncio.start_server(handle, "127.0.0.1", port, reuse_port=True)
        else:
            server = await asyncio.start_server(handle, sock=sock)
        out.send("ready")
        await stop.wait()
        server.close()

    asyncio.run(main())
    out.send(count)


async def _clients(port: int, total: int) -> None:
    left = total

    async def one_client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            await reader.readline()
            writer.write(b"HELO x\r\n")
            await reader.readline()
            writer.close()
            await writer.wait_closed()

    await asyncio.wait_for(asyncio.gather(*(one_client() for _ in range(CLIENTS))), 120)


def run_once(mode: str, connections: int, work_ms: float) -> dict[str, object]:
    ctx = multiprocessing.get_context("fork")
    listener = None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    if mode == "inherited":
        listener = socket.create_server(("127.0.0.1", port), backlog=100)
    procs, pipes = [], []
    for _ in range(2):
        mine, theirs = ctx.Pipe()
        proc = ctx.Process(target=_serve, args=(port, listener, work_ms, theirs))
        proc.start()
        procs.append(proc)
        pipes.append(mine)
    for pipe in pipes:
        assert pipe.recv() == "ready"
    started = time.monotonic()
    asyncio.run(_clients(port, connections))
    elapsed = time.monotonic() - started
    counts = []
    for proc, pipe in zip(procs, pipes, strict=True):
        os.kill(proc.pid or 0, signal.SIGTERM)
        counts.append(pipe.recv() if pipe.poll(10) else None)
        proc.join(10)
    if listener is not None:
        listener.close()
    return {"mode": mode, "per_process": counts, "per_second": round(connections / elapsed)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.bench.bench_listen_spread")
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--work-ms", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv if argv is not None else [])
    if not (1 <= args.connections <= 20_000 and 1 <= args.rounds <= 5):
        parser.error("--connections 1..20000, --rounds 1..5")
    for _ in range(args.rounds):
        for mode in ("reuseport", "inherited"):
            print(json.dumps(run_once(mode, args.connections, args.work_ms)), flush=True)
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
