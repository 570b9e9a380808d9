"""Sick next hops on loopback: one that never greets, one that refuses, one that says 421.

Real sockets, in-process, counting the connections they get: what host
health (relay.health) must route around.
"""

from __future__ import annotations

import asyncio

from tests.support.procs import free_port


def closed_port() -> int:
    """A loopback port nothing listens on (a connection to it is refused).

    One of :func:`free_port`'s: outside the ephemeral range and reserved, so
    no other test's listener or outgoing connection takes it meanwhile.
    """
    return free_port()


class SickHost:
    """A TCP server on 127.0.0.1 that misbehaves per ``mode``, until :meth:`heal`.

    - ``"wedged"``: accepts and never sends a greeting;
    - ``"421"``: greets ``421 4.3.2 Service not available`` and closes.

    Once healed it forwards each new connection to ``backend`` (a healthy
    sink's port), so the same address and port come back to life.
    """

    def __init__(self, mode: str, backend: int | None = None) -> None:
        assert mode in ("wedged", "421")
        self.mode = mode
        self.backend = backend
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> SickHost:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for writer in self._writers:
            writer.transport.abort()
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def heal(self) -> None:
        assert self.backend is not None
        self.mode = "healed"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        if self.mode == "wedged":
            return  # hold the connection open, say nothing
        if self.mode == "421":
            writer.write(b"421 4.3.2 Service not available\r\n")
            await writer.drain()
            writer.close()
            return
        assert self.backend is not None
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend)
        self._writers.append(up_writer)
        for source, target in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pipe(source, target))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


async def _pipe(source: asyncio.StreamReader, target: asyncio.StreamWriter) -> None:
    try:
        while data := await source.read(65536):
            target.write(data)
            await target.drain()
    except ConnectionError:
        pass
    finally:
        target.close()
