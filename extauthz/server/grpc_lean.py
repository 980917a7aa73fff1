"""gRPC for Envoy on extauthz's own HTTP/2 server: ext_authz Check, ext_proc Process and health Check.

Why not grpc.aio: through Envoy on the benchmark's 2-core machine, grpc.aio's
native machinery (a completion-queue poller thread handing every event to the
loop, several batches and futures per call) cost ~270 µs of CPU per Check even
for a server that decides nothing, and it made the Check's own Python code cost
twice what it does alone. The same Checks served here, by protocol callbacks
on the loop with nothing between the bytes and the decision, cost under half of
that all in (docs/benchmarks.md). grpc.aio stays for what this server does not
do: TLS listeners, the admin service, and ``EXTAUTHZ_GRPC_SERVER=grpcio``.

The scope is what Envoy's gRPC client sends to a sidecar: cleartext HTTP/2 with
prior knowledge (:mod:`extauthz.server.http2`), POSTs of ``application/grpc``,
uncompressed length-prefixed messages. Each method is either unary (one message
in, one out; the handler takes and returns serialised messages) or a stream of
answers, one per message in order (ext_proc); a handler that raises
:class:`GrpcError` ends its call with that status, and any other exception with
INTERNAL, which Envoy turns into its configured failure answer (the shipped
configs fail closed). Deadlines are Envoy's: a Check that outlives its timeout
is reset by Envoy, and the reset cancels it here.
"""

from __future__ import annotations

import asyncio
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn, Protocol

import grpc
import structlog
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from extauthz.eager import run_eagerly
from extauthz.server.http2 import Http2Connection, Stream, literal_block
from extauthz.server.listener import Listener
from extauthz.server.validation import parse_address

log = structlog.get_logger("extauthz.grpc")

OK, INTERNAL, RESOURCE_EXHAUSTED, UNIMPLEMENTED = 0, 13, 8, 12
MAX_CONNECTIONS = 128
"""Envoy opens one connection per worker to a cluster (more only past the stream limit)."""
MAX_MESSAGE = 8 << 20
"""The largest request message accepted, as ``grpc.max_receive_message_length`` on the grpc.aio server."""

_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc")]
RESPONSE_HEADERS = literal_block(_HEAD)
TRAILERS_OK = literal_block([(b"grpc-status", b"0")])
_MESSAGE_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"
"""Printable ASCII but ``%`` stays as it is in grpc-message; the rest is percent-encoded (gRPC over HTTP/2)."""


class GrpcError(Exception):
    """Ends the call with ``code`` and ``message`` (grpc-status, grpc-message) instead of an answer."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


class MessageStream(Protocol):
    """One bidirectional call: an answer per message, in order, until :attr:`done` or the client's end."""

    @property
    def done(self) -> bool: ...
    def answer(self, message: bytes) -> Coroutine[Any, Any, bytes]: ...
    def ended(self) -> None:
        """The client ended its side before :attr:`done`."""


Unary = Callable[[bytes], Coroutine[Any, Any, bytes]]


@dataclass(frozen=True)
class Methods:
    """The served methods by path (``/package.Service/Method``)."""

    unary: Mapping[str, Unary]
    streams: Mapping[str, Callable[[], MessageStream]]


def _trailers(code: int, message: str, head: bool) -> bytes:
    fields = [*(_HEAD if head else []), (b"grpc-status", str(code).encode())]
    if message:
        fields.append((b"grpc-message", urllib.parse.quote(message, safe=_MESSAGE_SAFE).encode()))
    return literal_block(fields)


def _framed(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


class _Unary:
    """A unary method as a stream that is done after its one answer: both kinds of call share one path."""

    __slots__ = ("_handler", "done")

    def __init__(self, handler: Unary) -> None:
        self._handler = handler
        self.done = False

    async def answer(self, message: bytes) -> bytes:
        answer = await self._handler(message)
        self.done = True
        return answer

    def ended(self) -> None:
        """Never called: a unary call is answered only once its request has ended."""


class _Call:
    """The state of one call: the message bytes not yet whole, the messages waiting for an answer."""

    __slots__ = ("answered", "buffer", "ended", "queue", "stream", "streaming", "task")

    def __init__(self) -> None:
        self.stream: MessageStream | None = None
        self.streaming = False
        self.buffer = bytearray()
        self.queue: deque[bytes] = deque()
        """Whole messages waiting for their answer (a unary call's one, until its request has ended)."""
        self.task: asyncio.Task[None] | None = None
        self.answered = False
        """Response headers sent."""
        self.ended = False
        """The call's status was sent (or the stream reset): nothing more happens on it."""


class _Connection(Http2Connection):
    def __init__(self, server: LeanGrpcServer) -> None:
        super().__init__()
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if not self._server.admit(self, transport):
            return
        super().connection_made(transport)
        if self._server.stopping:
            self.go_away()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._server.connections.discard(self)

    @property
    def busy(self) -> bool:
        return bool(self.streams)

    def quiesce(self) -> None:
        self.go_away()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.close()  # connection_lost resets what is left, which cancels its calls

    # --- streams in ---------------------------------------------------------------------------------

    def stream_started(self, stream: Stream) -> None:
        fields = dict(stream.headers)
        path = fields.get(b":path", b"").decode("ascii", "replace")
        methods = self._server.methods
        unary, opener = methods.unary.get(path), methods.streams.get(path)
        call = _Call()
        stream.handler = call
        if fields.get(b":method") != b"POST" or not fields.get(b"content-type", b"").startswith(b"application/grpc"):
            self._finish(stream, call, UNIMPLEMENTED, "not a gRPC request (POST of application/grpc)")
        elif unary is None and opener is None:
            self._finish(stream, call, UNIMPLEMENTED, f"unknown method {path}")
        elif fields.get(b"grpc-encoding", b"identity") != b"identity":
            self._finish(stream, call, UNIMPLEMENTED, "compressed messages are not accepted")
        else:
            if opener is not None:
                call.stream, call.streaming = opener(), True
            else:
                assert unary is not None
                call.stream = _Unary(unary)
            if stream.remote_closed:
                self.stream_data(stream, b"", True)

    def stream_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        call: _Call = stream.handler
        if call.ended:
            return
        buffer = call.buffer
        buffer += data
        while len(buffer) >= 5:
            length = int.from_bytes(buffer[1:5], "big")
            if buffer[0]:
                self._finish(stream, call, UNIMPLEMENTED, "compressed messages are not accepted")
                return
            if length > MAX_MESSAGE:
                self._finish(stream, call, RESOURCE_EXHAUSTED,
                             f"a {length}-byte message (at most {MAX_MESSAGE})")
                return
            if len(buffer) < 5 + length:
                break
            call.queue.append(bytes(buffer[5:5 + length]))
            del buffer[:5 + length]
            if not call.streaming and len(call.queue) > 1:
                self._finish(stream, call, UNIMPLEMENTED, "more than one request message on a unary call")
                return
        if end_stream and buffer:
            self._finish(stream, call, INTERNAL, "the request ended inside a message")
            return
        if call.streaming:
            self._pump(stream, call)
        elif end_stream:  # a unary call is answered once its request has ended, with its one message
            if call.queue:
                self._pump(stream, call)
            else:
                self._finish(stream, call, INTERNAL, "the request carried no message")

    def stream_reset(self, stream: Stream) -> None:
        call: _Call | None = stream.handler
        if call is not None and not call.ended:
            call.ended = True
            if call.task is not None:
                call.task.cancel()

    # --- answers ------------------------------------------------------------------------------------

    def _pump(self, stream: Stream, call: _Call) -> None:
        """Answer the stream's queued messages in order, one at a time; end the call when it is done."""
        while not call.ended and call.task is None:
            if call.queue:
                assert call.stream is not None
                call.task = run_eagerly(self._answer_message(stream, call, call.stream.answer(call.queue.popleft())))
            elif stream.remote_closed:
                assert call.stream is not None
                call.stream.ended()
                self._finish(stream, call, OK, "")
            else:
                return

    async def _answer_message(self, stream: Stream, call: _Call, answering: Awaitable[bytes]) -> None:
        try:
            answer = await answering
        except Exception as exc:  # noqa: BLE001 - the call ends with a status, whatever went wrong
            self._failed(stream, call, exc)
            return
        finally:
            # Only an answer that waited ran as a task (run_eagerly returns before the task is set otherwise).
            resumed, call.task = call.task is not None, None
        if call.ended:
            return
        if not call.answered:
            call.answered = True
            self.send_headers(stream, RESPONSE_HEADERS)
        self.send_data(stream, _framed(answer))
        assert call.stream is not None
        if call.stream.done:
            self._finish(stream, call, OK, "")
        elif resumed:  # go on with what arrived meanwhile (an answer given at once returns to _pump's loop)
            self._pump(stream, call)

    def _failed(self, stream: Stream, call: _Call, exc: Exception) -> None:
        if isinstance(exc, GrpcError):
            self._finish(stream, call, exc.code, str(exc))
            return
        log.error("grpc_call_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        self._finish(stream, call, INTERNAL, "internal error")

    def _finish(self, stream: Stream, call: _Call, code: int, message: str) -> None:
        if call.ended:
            return
        call.ended = True
        if call.answered:
            self.end_stream(stream, _trailers(code, message, head=False))
        else:
            # Trailers-only: the status in the one header block (a stream ended before any answer).
            self.send_headers(stream, _trailers(code, message, head=True), end_stream=True)
        self.flush()


class LeanGrpcServer(Listener["_Connection"]):
    """The listener: connections from Envoy, each an :class:`~extauthz.server.http2.Http2Connection`."""

    def __init__(self, methods: Methods, address: str, reuse_port: bool = False) -> None:
        super().__init__(address, parse_address(address), reuse_port, MAX_CONNECTIONS)
        self.methods = methods

    def connection(self) -> _Connection:
        return _Connection(self)


class _AbortOnly:
    """The one call grpc_health's servicer makes on its context: ``abort`` (for an unknown service)."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise GrpcError(code.value[0], details or f"{code.value[1]}")


def health_check(servicer: HealthServicer) -> Unary:
    """``grpc.health.v1.Health/Check`` answered by the same servicer (and statuses) grpc.aio serves."""

    async def check(message: bytes) -> bytes:
        response = await servicer.Check(health_pb2.HealthCheckRequest.FromString(message), _AbortOnly())
        return bytes(response.SerializeToString())

    return check
