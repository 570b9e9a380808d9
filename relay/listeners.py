"""The TCP listeners of ``[server] listen``: bound at start, rebound on
reload, closed at shutdown. No SMTP here: each accepted connection goes to
the protocol the owner gives (relay.inbound's admission gate)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable, Sequence

from relay import events
from relay.config import Listen


class Listeners:
    """One asyncio server per listen address."""

    def __init__(self, protocol: Callable[[], asyncio.Protocol]) -> None:
        self._protocol = protocol
        self.servers: list[asyncio.Server] = []
        #: The same servers by the listen address they were bound for.
        self._listening: dict[Listen, asyncio.Server] = {}
        #: SO_REUSEPORT: set in a worker process (relay.workers), whose
        #: siblings bind the same addresses; the kernel spreads connections.
        self.reuse_port = False

    async def bind(self, listen: Listen) -> None:
        """Start accepting on ``listen``; raises OSError if it cannot be bound."""
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            self._protocol, listen.host, listen.port, reuse_port=self.reuse_port or None
        )
        self.servers.append(server)
        self._listening[listen] = server

    def _unbind(self, listen: Listen) -> None:
        # asyncio.Server.close() stops accepting but leaves the connections
        # it accepted open: their sessions carry on to the end.
        server = self._listening.pop(listen)
        self.servers.remove(server)
        server.close()

    async def relisten(self, listens: Sequence[Listen]) -> tuple[list[Listen], list[Listen]]:
        """Make the listeners match ``listens`` (a reload changed ``[server] listen``).

        Addresses in both stay bound, untouched. Removed ones stop
        accepting (first, so that e.g. ``0.0.0.0:2525`` can become
        ``127.0.0.1:2525``), sessions they accepted carry on; then new ones
        are bound. If one cannot be bound, the listeners are put back as
        they were and the OSError is raised. Returns (added, removed).
        """
        wanted = list(dict.fromkeys(listens))
        removed = [listen for listen in self._listening if listen not in wanted]
        added = [listen for listen in wanted if listen not in self._listening]
        for listen in removed:
            self._unbind(listen)
        bound: list[Listen] = []
        try:
            for listen in added:
                await self.bind(listen)
                bound.append(listen)
        except OSError:
            for listen in bound:
                self._unbind(listen)
            for listen in removed:
                try:
                    await self.bind(listen)
                except OSError as exc:
                    events.error("listen_lost", listen=str(listen), error=str(exc))
            raise
        return added, removed

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """The bound (host, port) pairs, e.g. to find a port chosen by the OS."""
        return [
            (str(sock.getsockname()[0]), int(sock.getsockname()[1]))
            for server in self.servers
            for sock in server.sockets
        ]

    def close(self) -> None:
        """Stop accepting everywhere (open sessions carry on)."""
        for server in self.servers:
            server.close()
        self.servers.clear()
        self._listening.clear()


def address_texts(addresses: Iterable[tuple[str, int]]) -> Iterable[str]:
    """Bound addresses as host:port text (IPv6 in brackets), for the log."""
    for host, port in addresses:
        yield f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
