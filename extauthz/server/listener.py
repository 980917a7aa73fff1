"""What the sidecar's own servers (HTTP/1.1 and HTTP/2) share: one address, its connections, and how they stop.

Each connection says in its own protocol that it takes nothing new
(:meth:`Connection.quiesce`: HTTP/2's GOAWAY; HTTP/1.1 has no such word, so an
idle connection closes and a busy one closes after its answer). What is in
progress then gets the grace period to finish, and what is left is dropped.
"""

from __future__ import annotations

import asyncio
import time
from typing import Generic, Protocol, TypeVar

import structlog

from extauthz.server.validation import ListenAddress

log = structlog.get_logger("extauthz.listener")


LINGER_SECONDS = 2.0
"""How long a connection closed after an error answer still reads (and drops) what its peer sends."""
MAX_LINGERING = 64
"""Connections lingering at once; past it a connection closes at once: a peer reconnecting in a loop to be
evicted or refused must not make the sidecar hold file descriptors for everyone's lingering."""

_lingering: set[asyncio.Transport] = set()


def close_after_error(transport: asyncio.Transport) -> None:
    """Close a connection whose peer may still be sending, without losing the error answer just written.

    Closing a socket with bytes unread makes the kernel send a reset, and a
    reset can destroy the answer (a GOAWAY, a 400) before the peer reads it.
    So, as nginx's lingering close: the write side is closed once the answer is
    out, what still arrives is read and dropped by the caller (it stops
    handling input), and the connection closes when the peer does or after
    :data:`LINGER_SECONDS`; at most :data:`MAX_LINGERING` at a time.
    """
    if transport.is_closing():
        return
    for done in [t for t in _lingering if t.is_closing()]:
        _lingering.discard(done)
    if not transport.can_write_eof() or len(_lingering) >= MAX_LINGERING:
        transport.close()
        return
    _lingering.add(transport)
    transport.write_eof()
    transport.resume_reading()

    def end() -> None:
        _lingering.discard(transport)
        transport.abort()

    asyncio.get_running_loop().call_later(LINGER_SECONDS, end)


class Connection(Protocol):
    @property
    def busy(self) -> bool:
        """A request is in progress on it."""

    @property
    def last_active(self) -> float:
        """When it last received a request or a frame (its protocol's clock): the least recent makes room."""

    def quiesce(self) -> None:
        """Take no new request; what is in progress finishes."""

    def abort(self) -> None:
        """Past the grace period: drop the connection and what still runs on it."""

    def evict(self) -> None:
        """Drop it now to make room for a new connection, saying so if its protocol can."""


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
        self._evicted = 0
        self._evicted_logged = -10.0

    def connection(self) -> asyncio.Protocol:
        """A new connection's protocol; it adds itself to :attr:`connections` once made."""
        raise NotImplementedError

    def admit(self, connection: C) -> None:
        """Count a new connection in; at :attr:`max_connections`, the least recently active one makes room.

        Refusing the new connection instead would let any process in the pod
        that holds the cap lock Envoy out. Evicting the connection whose last
        request started longest ago (of equals, one without a request in
        progress) always lets Envoy in: its connections carry requests all the
        time, a hoarder's sit idle, spin on frames that do not count as
        activity, or hold requests that never end (and are reset after a while).
        """
        if len(self.connections) >= self.max_connections:
            victim = min(self.connections, key=lambda c: (c.last_active, c.busy))
            self.connections.discard(victim)
            victim.evict()
            self._evicted += 1
            now = time.monotonic()
            if now - self._evicted_logged >= 10.0:  # a peer reconnecting in a loop must not flood the log
                log.warning("connections_evicted", address=self.address, open=len(self.connections) + 1,
                            evicted=self._evicted, hint=f"at most {self.max_connections} connections: the "
                            "least recently active ones were closed; something other than Envoy is connecting")
                self._evicted, self._evicted_logged = 0, now
        self.connections.add(connection)

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
