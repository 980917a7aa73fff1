"""What the sidecar's own servers (HTTP/1.1 and HTTP/2) share: one address, its connections, and how they stop.

Each connection says in its own protocol that it takes nothing new
(:meth:`Connection.quiesce`: HTTP/2's GOAWAY; HTTP/1.1 has no such word, so an
idle connection closes and a busy one closes after its answer). What is in
progress then gets the grace period to finish, and what is left is dropped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Generic, Protocol, TypeVar, cast

import structlog

from extauthz.server.validation import ListenAddress

log = structlog.get_logger("extauthz.listener")


class Connection(Protocol):
    @property
    def busy(self) -> bool:
        """A request is in progress on it."""

    def quiesce(self) -> None:
        """Take no new request; what is in progress finishes."""

    def abort(self) -> None:
        """Past the grace period: drop the connection and what still runs on it."""


C = TypeVar("C", bound=Connection)


class Listener(Generic[C]):
    """Connections of one protocol on one address; subclasses say what a connection is (:meth:`connection`)."""

    def __init__(self, address: str, listen: ListenAddress, reuse_port: bool, max_connections: int) -> None:
        self.address = address
        self.max_connections = max_connections
        """Open connections at most: what each may hold is bounded, so this bounds them all together."""
        self._listen = listen
        self._reuse_port = reuse_port
        """Workers (``serve --workers``) share the port; the kernel spreads connections over them."""
        self.port = listen.port
        self.connections: set[C] = set()
        self.stopping = False
        """Set by :meth:`stop`: a connection made or a request answered from then on says it is the last."""
        self._server: asyncio.Server | None = None

    def connection(self) -> asyncio.Protocol:
        """A new connection's protocol; it adds itself to :attr:`connections` once made."""
        raise NotImplementedError

    def admit(self, connection: C, transport: asyncio.BaseTransport) -> bool:
        """Count a new connection in, or drop it at once when the listener holds :attr:`max_connections`.

        Envoy opens a handful of connections to a sidecar; a peer that opens more
        is not Envoy, and refusing it costs nothing that serves Envoy.
        """
        if len(self.connections) >= self.max_connections:
            cast(asyncio.Transport, transport).abort()  # a stream transport (uvloop's is not a subclass)
            log.warning("connection_refused", address=self.address, open=len(self.connections),
                        hint=f"at most {self.max_connections} connections; something other than Envoy "
                             "is connecting to the sidecar")
            return False
        self.connections.add(connection)
        return True

    async def start(self) -> None:
        self._server, self.port = await self._listen.serve(self.connection, self._reuse_port)

    async def stop(self, grace: float) -> None:
        """Accept no new connection, quiesce the open ones, let what is in progress finish within ``grace``."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for connection in list(self.connections):
            connection.quiesce()
        deadline = time.monotonic() + grace
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()
