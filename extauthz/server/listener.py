"""What the sidecar's own servers (HTTP/1.1 and HTTP/2) share: one address, its connections, and how they stop.

Each connection says in its own protocol that it takes nothing new
(:meth:`Connection.quiesce`: HTTP/2's GOAWAY; HTTP/1.1 has no such word, so an
idle connection closes and a busy one closes after its answer). What is in
progress then gets the grace period to finish, and what is left is dropped.

A listener may serve TLS (:class:`~extauthz.server.tls.ServerContexts`): each
accepted connection is then upgraded with asyncio's own TLS
(``loop.start_tls``) before its protocol sees a byte (:class:`_Handshake`).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar, cast

import structlog

from extauthz.eager import run_eagerly
from extauthz.server.validation import ListenAddress

if TYPE_CHECKING:
    from extauthz.server.tls import ServerContexts

log = structlog.get_logger("extauthz.listener")


LINGER_SECONDS = 2.0
"""How long a connection closed after an error answer still reads (and drops) what its peer sends; over TLS, how
long a closing connection waits for the peer's close_notify."""
MAX_LINGERING = 64
"""Connections lingering at once; past it a connection closes at once: a peer reconnecting in a loop to be
evicted or refused must not make the sidecar hold file descriptors for everyone's lingering."""
HANDSHAKE_SECONDS = 10.0
"""A TLS handshake must be done within this of the connection's accept (a listener may say otherwise)."""
HANDSHAKE_LOG_BURST, HANDSHAKE_LOG_WINDOW = 10, 10.0
"""Failed handshakes logged at info, at most this many per window; the rest are counted into the next line."""

_lingering: set[asyncio.Transport] = set()
_closing_tls: dict[asyncio.Transport, float] = {}
"""TLS connections closed after an error, until when they may wait for the peer's close_notify."""


def close_after_error(transport: asyncio.Transport) -> None:
    """Close a connection whose peer may still be sending, without losing the error answer just written.

    Closing a socket with bytes unread makes the kernel send a reset, and a
    reset can destroy the answer (a GOAWAY, a 400) before the peer reads it.
    So, as nginx's lingering close: the write side is closed once the answer is
    out, what still arrives is read and dropped by the caller (it stops
    handling input), and the connection closes when the peer does or after
    :data:`LINGER_SECONDS`; at most :data:`MAX_LINGERING` at a time.

    TLS has no half-close: closing it sends the answer and close_notify, and
    reads and drops what arrives until the peer's close_notify or the
    transport's shutdown timeout (:data:`LINGER_SECONDS`, set by
    :class:`_Handshake`). Those count against the same bound.
    """
    if transport.is_closing():
        return
    if transport.get_extra_info("sslcontext") is not None:
        now = time.monotonic()
        for done in [t for t, until in _closing_tls.items() if until <= now]:
            del _closing_tls[done]
        if len(_closing_tls) >= MAX_LINGERING:
            transport.abort()
            return
        _closing_tls[transport] = now + LINGER_SECONDS
        transport.close()
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

    def __init__(self, address: str, listen: ListenAddress, reuse_port: bool, max_connections: int,
                 tls: ServerContexts | None = None) -> None:
        self.address = address
        self.max_connections = max_connections
        """Open connections at most, TLS handshakes in progress included: what each may hold is bounded, so this
        bounds them all together."""
        self._listen = listen
        self._reuse_port = reuse_port
        """Workers (``serve --workers``) share the port; the kernel spreads connections over them."""
        self.port = listen.port
        self.tls = tls
        self.connections: set[C] = set()
        self.handshakes: set[_Handshake] = set()
        """TLS connections whose handshake is not done yet: counted and evicted like the others."""
        self.stopping = False
        """Set by :meth:`stop`: a connection made or a request answered from then on says it is the last."""
        self._server: asyncio.Server | None = None
        self._evicted = 0
        self._evicted_logged = -10.0
        self._failures = _FailureLog()

    def connection(self) -> asyncio.Protocol:
        """A new connection's protocol; it adds itself to :attr:`connections` once made."""
        raise NotImplementedError

    def handshake_seconds(self) -> float:
        """How long a TLS handshake may take from the connection's accept."""
        return HANDSHAKE_SECONDS

    def _accept(self) -> asyncio.Protocol:
        if self.tls is None:
            return self.connection()
        return _Handshake(self, self.tls, self.connection())

    def admit(self, connection: C) -> None:
        """Count a new connection in; at :attr:`max_connections`, the least recently active one makes room."""
        self.make_room()
        self.connections.add(connection)

    def make_room(self) -> None:
        """At :attr:`max_connections`, the least recently active connection (or handshake) is closed.

        Refusing the new connection instead would let any process in the pod
        that holds the cap lock Envoy out. Evicting the connection whose last
        request started longest ago (of equals, one without a request in
        progress) always lets Envoy in: its connections carry requests all the
        time, a hoarder's sit idle (or in a TLS handshake that never ends), spin
        on frames that do not count as activity, or hold requests that never
        end (and are reset after a while).
        """
        if len(self.connections) + len(self.handshakes) < self.max_connections:
            return
        everyone: Iterable[Connection] = itertools.chain(self.connections, self.handshakes)
        victim = min(everyone, key=lambda c: (c.last_active, c.busy))
        if isinstance(victim, _Handshake):
            self.handshakes.discard(victim)
        else:
            self.connections.discard(cast(C, victim))
        victim.evict()
        self._evicted += 1
        now = time.monotonic()
        if now - self._evicted_logged >= 10.0:  # a peer reconnecting in a loop must not flood the log
            log.warning("connections_evicted", address=self.address,
                        open=len(self.connections) + len(self.handshakes) + 1, evicted=self._evicted,
                        hint=f"at most {self.max_connections} connections: the least recently active ones were "
                        "closed; something other than Envoy is connecting")
            self._evicted, self._evicted_logged = 0, now

    def handshake_failed(self, peer: Any, reason: str, expected: bool = False) -> None:
        """A TLS connection ended before its protocol saw a byte: logged with the reason, never a traceback.

        At info, at most :data:`HANDSHAKE_LOG_BURST` lines per
        :data:`HANDSHAKE_LOG_WINDOW` (a scanner must not flood the log; the
        next line counts what was not logged); ``expected`` ones (a peer that
        closes before saying anything: a TCP probe) at debug only.
        """
        if expected:
            log.debug("tls_handshake_failed", address=self.address, peer=_peer(peer), reason=reason)
            return
        unlogged = self._failures.take(time.monotonic())
        if unlogged is not None:
            log.info("tls_handshake_failed", address=self.address, peer=_peer(peer), reason=reason,
                     **({"unlogged": unlogged} if unlogged else {}))

    async def start(self) -> None:
        self._server, self.port = await self._listen.serve(self._accept, self._reuse_port)

    async def stop(self, grace: float) -> None:
        """Accept no new connection, quiesce the open ones, let what is in progress finish within ``grace``."""
        self.stopping = True
        if self._server is not None:
            self._server.close()
        for handshake in list(self.handshakes):
            handshake.abort()
        for connection in list(self.connections):
            connection.quiesce()
        deadline = time.monotonic() + grace
        while any(c.busy for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            connection.abort()


def _peer(peer: Any) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")


class _FailureLog:
    """A budget of log lines per window, and how many lines it refused since the last one it allowed."""

    def __init__(self) -> None:
        self._window = -HANDSHAKE_LOG_WINDOW
        self._count = 0
        self._unlogged = 0

    def take(self, now: float) -> int | None:
        """None: do not log; else log, with this many not logged before it."""
        if now - self._window >= HANDSHAKE_LOG_WINDOW:
            self._window, self._count = now, 0
        self._count += 1
        if self._count > HANDSHAKE_LOG_BURST:
            self._unlogged += 1
            return None
        unlogged, self._unlogged = self._unlogged, 0
        return unlogged


def _reason(exc: BaseException, timeout: float) -> tuple[str, bool]:
    """What ended a handshake, in words, and whether it is routine (the peer just went away)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"{exc.reason}: {exc.verify_message}", False
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.strerror or exc), False
    if isinstance(exc, ConnectionAbortedError):  # asyncio's handshake timeout
        return f"no TLS handshake within {timeout:g} s", False
    if isinstance(exc, (ConnectionResetError, BrokenPipeError, EOFError)):  # asyncio's word for an EOF there
        return "the peer closed the connection during the handshake", True
    return f"{type(exc).__name__}: {exc}", False


class _Handshake(asyncio.Protocol):
    """A TLS connection until its handshake is done; then its protocol (the listener's connection) takes over.

    Why ``start_tls`` on each accepted connection rather than a server created
    with ``ssl=``: with ``ssl=``, asyncio hides a connection from its protocol
    until the handshake is done, so connections in handshakes would escape the
    listener's cap (a peer could hold any number of them, each a file
    descriptor, for the whole timeout), and a failed handshake would vanish
    without a word (asyncio reports it only in debug mode, with a traceback).
    Here the connection is counted and evictable from its accept, the reason a
    handshake failed is logged, the :class:`ssl.SSLContext` is chosen per
    connection (the newest certificate for each new handshake, with no SNI
    callback or swapping of the server's context), and the handshake must end
    within :meth:`Listener.handshake_seconds` (asyncio's
    ``ssl_handshake_timeout``: it aborts the connection then, whatever the
    peer sent, a byte at a time or nothing). The protocol gets the connection
    only if the handshake selected the required ALPN protocol.

    The protocol's own time limits count from the accept too (it is made
    then), so the handshake and, for HTTP/2, the preface share one deadline.
    """

    busy = False
    last_active = 0.0
    """Never answered anything: among the first to make room."""

    def __init__(self, listener: Listener[Any], tls: ServerContexts, protocol: asyncio.Protocol) -> None:
        self._listener = listener
        self._tls = tls
        self._protocol = protocol
        self._raw: asyncio.Transport | None = None
        self._peer: Any = None
        self._task: asyncio.Task[None] | None = None
        self._early: list[bytes] = []
        """Bytes decrypted before the protocol took over (a client's first frames may come with its Finished)."""
        self._gone = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        raw = self._raw = cast(asyncio.Transport, transport)  # a stream transport (uvloop's is not a subclass)
        self._peer = raw.get_extra_info("peername")
        if self._listener.stopping:
            raw.abort()
            return
        self._listener.make_room()
        self._listener.handshakes.add(self)
        # At once, not in a task a turn later: start_tls hands the connection to the TLS layer before any byte
        # is read (uvloop starts reading when this returns, whatever this protocol asked).
        self._task = run_eagerly(self._handshake(raw))

    async def _handshake(self, raw: asyncio.Transport) -> None:
        listener = self._listener
        timeout = listener.handshake_seconds()
        if self._gone:  # evicted before this ran
            return
        try:
            upgraded = await asyncio.get_running_loop().start_tls(
                raw, self, self._tls.latest(), server_side=True, ssl_handshake_timeout=timeout,
                ssl_shutdown_timeout=LINGER_SECONDS)
        except asyncio.CancelledError:  # evicted, or the listener stops
            raw.abort()
            return
        except Exception as exc:  # noqa: BLE001 - whatever ended it is the peer's doing: logged, never raised
            listener.handshakes.discard(self)
            raw.abort()
            listener.handshake_failed(self._peer, *_reason(exc, timeout))
            return
        transport = cast(asyncio.Transport, upgraded)  # None only for a transport that was not a stream
        if self._gone or transport.is_closing():
            listener.handshakes.discard(self)
            transport.abort()
            listener.handshake_failed(self._peer, "the peer closed the connection during the handshake", True)
            return
        if self not in listener.handshakes:  # evicted, or the listener stops, as the handshake completed
            transport.abort()
            return
        listener.handshakes.discard(self)
        ssl_object = transport.get_extra_info("ssl_object")
        selected = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
        if selected != self._tls.alpn:
            transport.abort()
            listener.handshake_failed(self._peer, f"ALPN {selected or 'not used'}: only {self._tls.alpn} is served")
            return
        protocol = self._protocol
        transport.set_protocol(protocol)
        protocol.connection_made(transport)
        if self._early:
            early, self._early = b"".join(self._early), []
            protocol.data_received(early)

    # --- the TLS layer's protocol until the connection's own takes over ---------------------------------

    def data_received(self, data: bytes) -> None:
        self._early.append(data)

    def eof_received(self) -> bool | None:
        self._gone = True
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._gone = True
        self._listener.handshakes.discard(self)

    # --- as the listener counts it --------------------------------------------------------------------

    def quiesce(self) -> None:
        self.abort()

    def abort(self) -> None:
        self._gone = True
        self._listener.handshakes.discard(self)
        if self._task is not None:
            self._task.cancel()
        if self._raw is not None:
            self._raw.abort()

    def evict(self) -> None:
        self.abort()
