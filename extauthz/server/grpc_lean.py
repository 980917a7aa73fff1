"""gRPC for Envoy on extauthz's own HTTP/2 server: ext_authz Check, ext_proc Process and health Check/Watch.

Why not grpc.aio: through Envoy on the benchmark's 2-core machine, grpc.aio's
native machinery (a completion-queue poller thread handing every event to the
loop, several batches and futures per call) cost ~270 µs of CPU per Check even
for a server that decides nothing, and it made the Check's own Python code cost
twice what it does alone. The same Checks served here, by protocol callbacks
on the loop with nothing between the bytes and the decision, cost under half of
that all in (docs/benchmarks.md). grpc.aio stays for what this server does not
do: the admin service, and ``EXTAUTHZ_GRPC_SERVER=grpcio``.

The scope is what gRPC clients send to a sidecar: HTTP/2 with prior knowledge
in cleartext, or over TLS with ALPN ``h2`` (:mod:`extauthz.server.http2`,
:mod:`extauthz.server.listener`), POSTs of ``application/grpc``,
length-prefixed messages, uncompressed or gzip/deflate (inflated within
:data:`MAX_MESSAGE`, so a small bomb cannot grow past it). Each method is unary
(one message in, one out; the handler takes and returns serialised messages),
a stream of answers, one per message in order (ext_proc), or one request and
answers sent as they come (health Watch). A handler that raises
:class:`GrpcError` ends its call with that status, and any other exception with
INTERNAL, which Envoy turns into its configured failure answer (the shipped
configs fail closed). ``grpc-timeout`` is the call's deadline (DEADLINE_EXCEEDED);
a reset from Envoy cancels the call earlier. Bytes of a message are released to
the connection's flow control once its answer is out, so what a call holds is
bounded by its windows.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

import grpc
import structlog
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from extauthz.eager import run_eagerly
from extauthz.policy.model import TlsSettings
from extauthz.server import http2
from extauthz.server.http2 import Http2Connection, Stream, literal_block
from extauthz.server.listener import Listener
from extauthz.server.tls import ServerContexts
from extauthz.server.validation import parse_address

log = structlog.get_logger("extauthz.grpc")

OK, DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, UNIMPLEMENTED, INTERNAL = 0, 4, 8, 12, 13
MAX_CONNECTIONS = 64
"""Envoy opens one connection per worker to a cluster, another only past :data:`~extauthz.server.http2.MAX_STREAMS`."""
MAX_MESSAGE = 8 << 20
"""The largest request message accepted (after decompression), as ``grpc.max_receive_message_length``."""
ACCEPT_ENCODING = b"identity,deflate,gzip"
"""Request compressions read (``grpc-accept-encoding``); answers are never compressed."""

_HEAD = [(b":status", b"200"), (b"content-type", b"application/grpc"), (b"grpc-accept-encoding", ACCEPT_ENCODING)]
RESPONSE_HEADERS = literal_block(_HEAD)
_MESSAGE_SAFE = " !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~"
"""Printable ASCII but ``%`` stays as it is in grpc-message; the rest is percent-encoded (gRPC over HTTP/2)."""
_WBITS = {b"gzip": 31, b"deflate": 15}
_TIMEOUT_UNITS = {ord("H"): 3600.0, ord("M"): 60.0, ord("S"): 1.0, ord("m"): 1e-3, ord("u"): 1e-6, ord("n"): 1e-9}


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
Send = Callable[[bytes], None]
ServerStreaming = Callable[[bytes, Send], Coroutine[Any, Any, None]]
"""One request message, then answers sent with ``send`` until the coroutine returns (or the client cancels)."""


@dataclass(frozen=True)
class Methods:
    """The served methods by path (``/package.Service/Method``)."""

    unary: Mapping[str, Unary]
    streams: Mapping[str, Callable[[], MessageStream]]
    server_streams: Mapping[str, ServerStreaming] = field(default_factory=dict)


def _trailers(code: int, message: str, head: bool) -> bytes:
    fields = [*(_HEAD if head else []), (b"grpc-status", str(code).encode())]
    if message:
        fields.append((b"grpc-message", urllib.parse.quote(message, safe=_MESSAGE_SAFE).encode()))
    return literal_block(fields)


TRAILERS_OK = _trailers(OK, "", head=False)


def _framed(message: bytes) -> bytes:
    return b"\x00" + len(message).to_bytes(4, "big") + message


_timeouts: dict[bytes, float] = {}


def parse_timeout(value: bytes) -> float:
    """``grpc-timeout`` in seconds (up to 8 digits and a unit); raises ValueError. Remembered: Envoy repeats one."""
    seconds = _timeouts.get(value)
    if seconds is None:
        unit = _TIMEOUT_UNITS.get(value[-1]) if value else None
        digits = value[:-1]
        if unit is None or not 1 <= len(digits) <= 8 or not digits.isdigit():
            raise ValueError(f"malformed grpc-timeout {value[:16]!r}")
        seconds = int(digits) * unit
        if len(_timeouts) < 64:
            _timeouts[value] = seconds
    return seconds


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

    __slots__ = ("answered", "buffer", "deadline", "ended", "inflate", "queue", "serving", "stream", "streaming",
                 "task", "timer")

    def __init__(self) -> None:
        self.stream: MessageStream | None = None
        self.serving: ServerStreaming | None = None
        self.streaming = False
        self.buffer = bytearray()
        self.queue: deque[tuple[bytes, int]] = deque()
        """Whole messages waiting for their answer, with their size on the wire (released once answered)."""
        self.inflate = 0
        """zlib's window bits for the call's ``grpc-encoding``, or 0 when messages are not compressed."""
        self.deadline = 0.0
        """The loop's time by which the call must end (``grpc-timeout``), or 0."""
        self.task: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False
        """Response headers sent."""
        self.ended = False
        """The call's status was sent (or the stream reset): nothing more happens on it."""


class _Connection(Http2Connection):
    def __init__(self, server: LeanGrpcServer) -> None:
        super().__init__()
        self._server = server

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._server.admit(self)
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
            self.transport.abort()  # connection_lost resets what is left, which cancels its calls

    def evict(self) -> None:
        self.calm_down()

    # --- streams in ---------------------------------------------------------------------------------

    def stream_started(self, stream: Stream) -> None:
        fields = dict(stream.headers)
        path = fields.get(b":path", b"").decode("ascii", "replace")
        methods = self._server.methods
        call = _Call()
        stream.handler = call
        if fields.get(b":method") != b"POST" or not fields.get(b"content-type", b"").startswith(b"application/grpc"):
            self._finish(stream, call, UNIMPLEMENTED, "not a gRPC request (POST of application/grpc)")
            return
        encoding = fields.get(b"grpc-encoding", b"identity")
        if encoding != b"identity":
            call.inflate = _WBITS.get(encoding, 0)
            if not call.inflate:
                self._finish(stream, call, UNIMPLEMENTED,
                             f"grpc-encoding {encoding[:32].decode('ascii', 'replace')} is not accepted "
                             f"({ACCEPT_ENCODING.decode()})")
                return
        timeout = fields.get(b"grpc-timeout")
        if timeout is not None:
            try:
                call.deadline = asyncio.get_running_loop().time() + parse_timeout(timeout)
            except ValueError as exc:
                self._finish(stream, call, INTERNAL, str(exc))
                return
        unary, opener, serving = methods.unary.get(path), methods.streams.get(path), methods.server_streams.get(path)
        if opener is not None:
            call.stream, call.streaming = opener(), True
            self._arm(stream, call)  # a stream's deadline covers it whole
        elif unary is not None:
            call.stream = _Unary(unary)
        elif serving is not None:
            call.serving = serving
        else:
            self._finish(stream, call, UNIMPLEMENTED, f"unknown method {path}")

    def stream_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        call: _Call = stream.handler
        if call.ended:
            return
        buffer = call.buffer
        buffer += data
        while len(buffer) >= 5:
            length = int.from_bytes(buffer[1:5], "big")
            if length > MAX_MESSAGE:
                self._finish(stream, call, RESOURCE_EXHAUSTED, f"a {length}-byte message (at most {MAX_MESSAGE})")
                return
            whole = 5 + length
            if len(buffer) < whole:
                # Credit for the rest of the message, whatever the windows (or the call ends).
                if not self.expect(stream, whole - len(buffer)):
                    self._finish(stream, call, RESOURCE_EXHAUSTED,
                                 "the sidecar holds as many large messages as it may; try again")
                    return
                break
            try:
                message = self._message(call, buffer[0], bytes(buffer[5:whole]))
            except GrpcError as exc:
                self._finish(stream, call, exc.code, str(exc))
                return
            call.queue.append((message, whole))
            del buffer[:whole]
            if not call.streaming and len(call.queue) > 1:
                self._finish(stream, call, UNIMPLEMENTED, "more than one request message on a unary call")
                return
        else:
            if stream.awaiting:
                self.expect(stream, 0)
        if end_stream and buffer:
            self._finish(stream, call, INTERNAL, "the request ended inside a message")

    def stream_ready(self, stream: Stream) -> None:
        call: _Call = stream.handler
        if call.ended:
            return
        if call.streaming:
            self._pump(stream, call)
        elif not stream.remote_closed:
            return  # a unary or server-streaming call is answered once its request has ended
        elif not call.queue:
            self._finish(stream, call, INTERNAL, "the request carried no message")
        elif call.serving is not None:
            self._serve(stream, call, call.serving)
        else:
            self._pump(stream, call)

    def stream_reset(self, stream: Stream) -> None:
        call: _Call | None = stream.handler
        if call is not None and not call.ended:
            self._end(call)

    def stream_stalled(self, stream: Stream) -> bool:
        call: _Call | None = stream.handler
        # A unary or server-streaming request must end, and a message once begun must finish; ext_proc's
        # stream rightly waits between messages while the upstream answers.
        return call is None or not call.streaming or bool(call.buffer)

    @staticmethod
    def _message(call: _Call, flag: int, payload: bytes) -> bytes:
        """A message's bytes as the handler reads them: inflated within :data:`MAX_MESSAGE` when compressed."""
        if not flag:
            return payload
        if flag != 1 or not call.inflate:
            raise GrpcError(INTERNAL, "a compressed message without grpc-encoding" if flag == 1
                            else f"message flag {flag}")
        inflater = zlib.decompressobj(call.inflate)
        try:
            message = inflater.decompress(payload, MAX_MESSAGE + 1)
        except zlib.error as exc:
            raise GrpcError(INTERNAL, f"a compressed message that does not inflate: {exc}") from None
        if len(message) > MAX_MESSAGE or inflater.unconsumed_tail:
            raise GrpcError(RESOURCE_EXHAUSTED, f"a message over {MAX_MESSAGE} bytes once inflated")
        if not inflater.eof:
            raise GrpcError(INTERNAL, "a compressed message cut short")
        return message

    # --- answers ------------------------------------------------------------------------------------

    def _pump(self, stream: Stream, call: _Call) -> None:
        """Answer the stream's queued messages in order, one at a time; end the call when it is done."""
        while not call.ended and call.task is None:
            if call.queue:
                assert call.stream is not None
                message, size = call.queue.popleft()
                call.task = run_eagerly(self._answer_message(stream, call, call.stream.answer(message), size))
                if call.task is not None and not call.streaming:
                    self._arm(stream, call)  # only a Check that waits needs a timer; one answered at once has none
            elif stream.remote_closed:
                assert call.stream is not None
                call.stream.ended()
                self._finish(stream, call, OK, "")
            else:
                return

    async def _answer_message(self, stream: Stream, call: _Call, answering: Awaitable[bytes], size: int) -> None:
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
        self._send(stream, call, answer)
        self.release(stream, size)
        assert call.stream is not None
        if call.stream.done:
            self._finish(stream, call, OK, "")
        elif resumed:  # go on with what arrived meanwhile (an answer given at once returns to _pump's loop)
            self._pump(stream, call)

    def _serve(self, stream: Stream, call: _Call, serving: ServerStreaming) -> None:
        message, _ = call.queue.popleft()
        self._arm(stream, call)
        call.task = run_eagerly(self._served(stream, call, serving(message, lambda a: self._send(stream, call, a))))

    async def _served(self, stream: Stream, call: _Call, serving: Awaitable[None]) -> None:
        try:
            await serving
        except Exception as exc:  # noqa: BLE001 - the call ends with a status, whatever went wrong
            self._failed(stream, call, exc)
            return
        finally:
            call.task = None
        self._finish(stream, call, OK, "")

    def _send(self, stream: Stream, call: _Call, answer: bytes) -> None:
        if call.ended:
            return
        if not call.answered:
            call.answered = True
            self.send_headers(stream, RESPONSE_HEADERS)
        self.send_data(stream, _framed(answer))

    def _arm(self, stream: Stream, call: _Call) -> None:
        if call.deadline and call.timer is None:
            call.timer = asyncio.get_running_loop().call_at(call.deadline, self._expire, stream, call)

    def _expire(self, stream: Stream, call: _Call) -> None:
        call.timer = None
        self._finish(stream, call, DEADLINE_EXCEEDED, "deadline exceeded")

    def _failed(self, stream: Stream, call: _Call, exc: Exception) -> None:
        if isinstance(exc, GrpcError):
            self._finish(stream, call, exc.code, str(exc))
            return
        log.error("grpc_call_failed", error=f"{type(exc).__name__}: {exc}", exc_info=exc)
        self._finish(stream, call, INTERNAL, "internal error")

    @staticmethod
    def _end(call: _Call) -> None:
        """Nothing more happens on the call: its timer and any answer still being worked out are cancelled."""
        call.ended = True
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if call.task is not None:
            call.task.cancel()
            call.task = None

    def _finish(self, stream: Stream, call: _Call, code: int, message: str) -> None:
        if call.ended:
            return
        self._end(call)
        if call.answered:
            self.end_stream(stream, TRAILERS_OK if code == OK else _trailers(code, message, head=False))
        else:
            # Trailers-only: the status in the one header block (a stream ended before any answer).
            self.send_headers(stream, _trailers(code, message, head=True), end_stream=True)


class LeanGrpcServer(Listener["_Connection"]):
    """The listener: connections from Envoy, each an :class:`~extauthz.server.http2.Http2Connection`.

    With ``tls`` (``server.tls``), over TLS with ALPN ``h2`` (as gRPC requires),
    mTLS when it names a client CA, the certificate re-read for new handshakes
    when its files change (:class:`~extauthz.server.tls.ServerContexts`).
    """

    def __init__(self, methods: Methods, address: str, reuse_port: bool = False,
                 tls: TlsSettings | None = None) -> None:
        super().__init__(address, parse_address(address), reuse_port, MAX_CONNECTIONS,
                         tls=ServerContexts(tls, http2.ALPN) if tls is not None else None)
        self.methods = methods

    def connection(self) -> _Connection:
        return _Connection(self)

    def handshake_seconds(self) -> float:
        """The preface's limit: the handshake and the preface share it, both counted from the accept."""
        return http2.PREFACE_SECONDS


class _AbortOnly:
    """The one call grpc_health's servicer makes on its context: ``abort`` (for an unknown service)."""

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise GrpcError(code.value[0], details or f"{code.value[1]}")


class _Writer(_AbortOnly):
    """``Health/Watch``'s context: each status it writes is an answer on the stream."""

    def __init__(self, send: Send) -> None:
        self._send = send

    async def write(self, response: health_pb2.HealthCheckResponse) -> None:
        self._send(bytes(response.SerializeToString()))


def health_watch(servicer: HealthServicer) -> ServerStreaming:
    """``grpc.health.v1.Health/Watch``: the current status, then every change, until the client cancels."""

    async def watch(message: bytes, send: Send) -> None:
        await servicer.Watch(health_pb2.HealthCheckRequest.FromString(message), _Writer(send))

    return watch


def health_check(servicer: HealthServicer) -> Unary:
    """``grpc.health.v1.Health/Check`` answered by the same servicer (and statuses) grpc.aio serves."""

    async def check(message: bytes) -> bytes:
        response = await servicer.Check(health_pb2.HealthCheckRequest.FromString(message), _AbortOnly())
        return bytes(response.SerializeToString())

    return check
