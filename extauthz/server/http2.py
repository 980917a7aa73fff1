"""The server side of an HTTP/2 connection (RFC 9113) in cleartext, as Envoy's gRPC client speaks it.

Enough HTTP/2 for one kind of peer: a client that opens streams with prior
knowledge (h2c), as Envoy does towards a cluster with ``http2_protocol_options``.
Frames are parsed from the bytes as they arrive and acted on at once; what the
connection answers (settings and ping acknowledgements, window updates, the
streams' frames) is gathered and written once per read. Header blocks are
decoded with ``hpack`` (one decoder per connection, as the protocol requires);
what this server sends uses only literal fields without indexing, so it keeps
no encoder state.

Flow control is kept both ways: the peer may send a stream up to
:data:`STREAM_WINDOW` bytes and the connection up to :data:`CONNECTION_WINDOW`
ahead of what was consumed (window updates are sent as data is read, and a
peer that overruns a window is a connection error), and data is sent only as
far as the peer's windows allow, the rest held until its window updates.

What the streams carry is the subclass's business (:mod:`extauthz.server.grpc_lean`):
it is told when a stream's headers arrived, when data arrived, and when a stream
was reset or the connection lost, and it answers with :meth:`Http2Connection.send_headers`,
:meth:`~Http2Connection.send_data` and :meth:`~Http2Connection.end_stream`.
Protocol errors end the connection with GOAWAY and the error's code; the
reason is logged, never guessed around.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Iterable
from typing import Any, cast

import hpack
import hpack.table
import structlog

log = structlog.get_logger("extauthz.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x9, 0xB

SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
DEFAULT_FRAME_SIZE = 16_384
MAX_FRAME_SIZE = 16_777_215

STREAM_WINDOW = 16 << 20
"""What a stream may send ahead of what was read: above the largest message (8 MiB) with room to spare."""
CONNECTION_WINDOW = 64 << 20
FRAME_SIZE = 1 << 20
"""The largest frame accepted: a 1 MB body arrives in one frame instead of 64."""
MAX_STREAMS = 1_000
MAX_HEADER_LIST = 64 << 10
"""Decoded request headers per stream; Envoy's gRPC requests carry a few hundred bytes."""

_U32 = struct.Struct(">I")
_FRAME_HEAD = struct.Struct(">IBI")
"""A frame's 9 bytes: 24-bit length and type in the first word, then flags and stream."""
_SETTING = struct.Struct(">HI")


class ProtocolError(Exception):
    """The peer broke the protocol: the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


def frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _FRAME_HEAD.pack((len(payload) << 8) | kind, flags, stream_id) + payload


def literal_block(fields: Iterable[tuple[bytes, bytes]]) -> bytes:
    """A header block that changes no dynamic table: a fresh encoder, fields never indexed (RFC 7541, 6.2.3).

    Static-table matches are still used (``:status: 200`` is one byte), so the
    block is valid on any connection, whatever its table holds.
    """
    return bytes(hpack.Encoder().encode([hpack.NeverIndexedHeaderTuple(n, v) for n, v in fields], huffman=False))


class _Table(hpack.table.HeaderTable):
    """hpack's dynamic table, counting every change to it: a decoded block stays valid while there is none."""

    def __init__(self) -> None:
        super().__init__()
        self.changes = 0

    def add(self, name: bytes, value: bytes) -> None:
        self.changes += 1
        super().add(name, value)

    @property
    def maxsize(self) -> int:
        return self._maxsize

    @maxsize.setter
    def maxsize(self, value: int) -> None:
        self.changes += 1
        hpack.table.HeaderTable.maxsize.fset(self, value)  # type: ignore[attr-defined]


class HeaderDecoder:
    """HPACK decoding with the blocks that changed nothing remembered.

    After its first requests, Envoy's header blocks on a connection are the same
    bytes every time (every field an index into the dynamic table), and decoding
    one in Python costs ~17 µs, a tenth of a Check. A block whose decoding left the
    dynamic table as it was decodes to the same headers for as long as the table
    stays as it is; any change to the table (a field added, a size update) forgets
    them all, since indexes then name other entries.
    """

    __slots__ = ("_blocks", "_decoder", "_table")

    def __init__(self) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._table = self._decoder.header_table = _Table()
        self._blocks: dict[bytes, list[tuple[bytes, bytes]]] = {}

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        known = self._blocks.get(block)
        if known is not None:
            return known
        changes = self._table.changes
        headers = cast("list[tuple[bytes, bytes]]", self._decoder.decode(block, raw=True))  # raw: as bytes
        if self._table.changes != changes:
            self._blocks.clear()
        elif len(self._blocks) < _REMEMBERED_BLOCKS:
            self._blocks[block] = headers
        return headers


_REMEMBERED_BLOCKS = 64
"""Per connection: Envoy sends a few kinds of request (a Check, an ext_proc stream, a health check)."""


class Stream:
    """One request stream: its headers, and what it may still send and receive."""

    __slots__ = (
        "handler",
        "headers",
        "id",
        "pending",
        "received",
        "remote_closed",
        "send_window",
        "trailers",
        "unacknowledged",
    )

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], send_window: int) -> None:
        self.id = stream_id
        self.headers = headers
        self.send_window = send_window
        self.unacknowledged = 0
        """Bytes read on this stream and not yet given back with a window update."""
        self.received = 0
        """Bytes the peer sent beyond what was given back: never above :data:`STREAM_WINDOW`."""
        self.pending = bytearray()
        """DATA payload waiting for window."""
        self.trailers: bytes | None = None
        """The closing header block, sent once ``pending`` is out."""
        self.remote_closed = False
        self.handler: Any = None
        """What the subclass keeps for this stream."""


class Http2Connection(asyncio.Protocol):
    """One client connection; subclasses answer streams (see the module's docstring)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self._buffer = bytearray()
        self._preface = False
        self._decoder = HeaderDecoder()
        self._continuation: tuple[int, int, bytearray] | None = None
        """(stream, HEADERS flags, block so far) while a header block spans CONTINUATION frames."""
        self._last_stream = 0
        self._peer_frame_size = DEFAULT_FRAME_SIZE
        self._peer_initial_window = DEFAULT_WINDOW
        self._send_window = DEFAULT_WINDOW
        self._received = 0
        self._unacknowledged = 0
        self._blocked: dict[int, Stream] = {}
        """Streams with data waiting for the connection's window."""
        self._out: list[bytes] = []
        self._reading = False
        self.going_away = False
        """GOAWAY sent: streams in progress finish, new ones are refused."""

    # --- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's is not a subclass)
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (SETTINGS_ENABLE_PUSH, 0), (SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
            (SETTINGS_INITIAL_WINDOW_SIZE, STREAM_WINDOW), (SETTINGS_MAX_FRAME_SIZE, FRAME_SIZE),
            (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)))
        self.transport.write(frame(SETTINGS, 0, 0, settings)
                        + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)))

    def pause_writing(self) -> None:
        # The peer is not reading what it asked for: read no more requests from it until it does.
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        streams, self.streams = self.streams, {}
        self._blocked.clear()
        for stream in streams.values():
            self.stream_reset(stream)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        # Usually whole frames arrive in one read and are parsed from it; a part frame waits in a
        # bytearray that grows in place, so a large body arriving in many reads is copied once.
        buffer: bytes | bytearray = data
        if self._buffer:
            self._buffer += data
            buffer = self._buffer
        self._reading = True
        try:
            start = 0
            if not self._preface:
                if not (PREFACE.startswith(buffer[:len(PREFACE)])):
                    raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                if len(buffer) < len(PREFACE):
                    self._buffer = bytearray(buffer)
                    return
                self._preface = True
                start = len(PREFACE)
            used = self._frames(buffer, start)
            if used == len(buffer):
                self._buffer = bytearray()
            elif buffer is self._buffer:
                del self._buffer[:used]
            else:
                self._buffer = bytearray(buffer[used:])
            if self._unacknowledged >= CONNECTION_WINDOW // 4:
                self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._unacknowledged)))
                self._received -= self._unacknowledged
                self._unacknowledged = 0
        except ProtocolError as exc:
            self._fail(exc)
        except hpack.HPACKError as exc:
            self._fail(ProtocolError(COMPRESSION_ERROR, f"header block: {exc}"))
        finally:
            self._reading = False
            self.flush()

    # --- for subclasses -----------------------------------------------------------------------------

    def stream_started(self, stream: Stream) -> None:
        """A new stream's request headers arrived (``stream.remote_closed`` if it has no body)."""
        raise NotImplementedError

    def stream_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        raise NotImplementedError

    def stream_reset(self, stream: Stream) -> None:
        """The peer reset the stream, or the connection was lost: nothing more can be sent on it."""

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool = False) -> None:
        """Response headers (literal fields, :func:`literal_block`), small enough for one frame."""
        flags = END_HEADERS | (END_STREAM if end_stream else 0)
        self._write(frame(HEADERS, flags, stream.id, block))
        if end_stream:
            self._closed_locally(stream)

    def send_data(self, stream: Stream, data: bytes) -> None:
        if stream.id not in self.streams:
            return  # reset, or ended here: nothing more goes out on it
        size = len(data)
        if not stream.pending and size <= min(stream.send_window, self._send_window, self._peer_frame_size):
            # The usual answer: one frame, within every window.
            stream.send_window -= size
            self._send_window -= size
            self._write(frame(DATA, 0, stream.id, data))
            return
        stream.pending += data
        self._send_pending(stream)

    def end_stream(self, stream: Stream, trailers: bytes) -> None:
        """The closing header block, after any data still waiting for window."""
        stream.trailers = trailers
        self._send_pending(stream)

    def flush(self) -> None:
        if self._out and self.transport is not None:
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def go_away(self) -> None:
        """Refuse new streams from now on; those in progress finish."""
        if not self.going_away and self.transport is not None:
            self.going_away = True
            self._write(frame(GOAWAY, 0, 0, _U32.pack(self._last_stream) + _U32.pack(NO_ERROR)))
            self.flush()

    # --- frames in ----------------------------------------------------------------------------------

    def _frames(self, buffer: bytes | bytearray, position: int) -> int:
        """Act on every whole frame in ``buffer`` from ``position``; returns where the first part frame starts."""
        size = len(buffer)
        while size - position >= 9:
            length = (buffer[position] << 16) | (buffer[position + 1] << 8) | buffer[position + 2]
            if length > FRAME_SIZE:
                raise ProtocolError(FRAME_SIZE_ERROR, f"a {length}-byte frame (at most {FRAME_SIZE})")
            end = position + 9 + length
            if end > size:
                break
            kind, flags = buffer[position + 3], buffer[position + 4]
            stream_id = _U32.unpack_from(buffer, position + 5)[0] & 0x7FFFFFFF
            payload = bytes(buffer[position + 9:end])
            position = end
            if self._continuation is not None and kind != CONTINUATION:
                raise ProtocolError(PROTOCOL_ERROR, "a header block interrupted by another frame")
            if kind == DATA:
                self._on_data(stream_id, flags, payload)
            elif kind == HEADERS:
                self._on_headers(stream_id, flags, payload)
            elif kind == CONTINUATION:
                self._on_continuation(stream_id, flags, payload)
            elif kind == SETTINGS:
                self._on_settings(stream_id, flags, payload)
            elif kind == PING:
                if stream_id or length != 8:
                    raise ProtocolError(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "malformed PING")
                if not flags & ACK:
                    self._out.append(frame(PING, ACK, 0, payload))
            elif kind == WINDOW_UPDATE:
                self._on_window_update(stream_id, payload)
            elif kind == RST_STREAM:
                if not stream_id or length != 4:
                    raise ProtocolError(PROTOCOL_ERROR if not stream_id else FRAME_SIZE_ERROR,
                                           "malformed RST_STREAM")
                if stream_id > self._last_stream:
                    raise ProtocolError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
                stream = self.streams.pop(stream_id, None)
                if stream is not None:
                    self._blocked.pop(stream_id, None)
                    self.stream_reset(stream)
            elif kind == PRIORITY:
                if length != 5 or not stream_id:
                    raise ProtocolError(FRAME_SIZE_ERROR if stream_id else PROTOCOL_ERROR, "malformed PRIORITY")
            elif kind == PUSH_PROMISE:
                raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            elif kind == GOAWAY and stream_id:
                raise ProtocolError(PROTOCOL_ERROR, "GOAWAY on a stream")
            # A GOAWAY means the peer opens no more streams (those in progress finish, then it closes);
            # unknown frame types are ignored (RFC 9113, 4.1).
        return position

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        if not stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        self._received += length
        self._unacknowledged += length
        if self._received > CONNECTION_WINDOW:
            raise ProtocolError(FLOW_CONTROL_ERROR, "the peer sent beyond the connection's window")
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream:
                raise ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            return  # a stream already reset or finished here: counted against the connection, dropped
        if stream.remote_closed:
            self._reset(stream, STREAM_CLOSED)
            return
        stream.received += length
        if stream.received > STREAM_WINDOW:
            raise ProtocolError(FLOW_CONTROL_ERROR, f"the peer sent beyond stream {stream_id}'s window")
        if flags & PADDED:
            payload = _unpad(payload)
        end = bool(flags & END_STREAM)
        if end:
            stream.remote_closed = True
        else:
            stream.unacknowledged += length
            if stream.unacknowledged >= STREAM_WINDOW // 4:
                self._out.append(frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(stream.unacknowledged)))
                stream.received -= stream.unacknowledged
                stream.unacknowledged = 0
        self.stream_data(stream, payload, end)

    def _on_headers(self, stream_id: int, flags: int, payload: bytes) -> None:
        if not stream_id or not stream_id & 1:
            raise ProtocolError(PROTOCOL_ERROR, f"HEADERS on stream {stream_id}")
        if flags & PADDED:
            payload = _unpad(payload)
        if flags & PRIORITY_FLAG:
            if len(payload) < 5:
                raise ProtocolError(FRAME_SIZE_ERROR, "HEADERS too short for its priority")
            payload = payload[5:]
        if flags & END_HEADERS:
            self._header_block(stream_id, flags, payload)
        else:
            self._continuation = (stream_id, flags, bytearray(payload))

    def _on_continuation(self, stream_id: int, flags: int, payload: bytes) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        block = self._continuation[2]
        block += payload
        if len(block) > MAX_HEADER_LIST:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"a header block over {MAX_HEADER_LIST} bytes")
        if flags & END_HEADERS:
            headers_flags = self._continuation[1]
            self._continuation = None
            self._header_block(stream_id, headers_flags, bytes(block))

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        # Decoded whatever becomes of the stream: the decoder's table must follow every block the peer sent.
        headers = self._decoder.decode(block)
        end = bool(flags & END_STREAM)
        existing = self.streams.get(stream_id)
        if existing is not None:  # trailers: gRPC clients send none, and they must end the stream
            if existing.remote_closed or not end:
                raise ProtocolError(PROTOCOL_ERROR, f"unexpected HEADERS on stream {stream_id}")
            existing.remote_closed = True
            self.stream_data(existing, b"", True)
            return
        if stream_id <= self._last_stream:
            raise ProtocolError(STREAM_CLOSED, f"HEADERS on closed stream {stream_id}")
        self._last_stream = stream_id
        if self.going_away or len(self.streams) >= MAX_STREAMS:
            self._out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        stream = self.streams[stream_id] = Stream(stream_id, headers, self._peer_initial_window)
        stream.remote_closed = end
        self.stream_started(stream)

    def _on_settings(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of a length not a multiple of 6")
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                delta, self._peer_initial_window = value - self._peer_initial_window, value
                for stream in self.streams.values():
                    stream.send_window += delta
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= MAX_FRAME_SIZE:
                    raise ProtocolError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self._peer_frame_size = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise ProtocolError(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
            # The rest concern what this server would encode or open: it indexes nothing and opens no stream.
        self._out.append(frame(SETTINGS, ACK, 0))
        for stream in list(self.streams.values()):
            self._send_pending(stream)

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise ProtocolError(PROTOCOL_ERROR, "a zero window increment for the connection")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "the connection's window above 2^31-1")
            blocked, self._blocked = self._blocked, {}
            for stream in blocked.values():
                self._send_pending(stream)
            return
        target = self.streams.get(stream_id)
        if target is None:
            return  # a stream that ended here
        self._stream_window_update(target, increment)

    def _stream_window_update(self, stream: Stream, increment: int) -> None:
        if not increment:
            self._reset(stream, PROTOCOL_ERROR)
            return
        stream.send_window += increment
        if stream.send_window > MAX_WINDOW:
            self._reset(stream, FLOW_CONTROL_ERROR)
            return
        self._send_pending(stream)

    # --- frames out ---------------------------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        self._out.append(data)
        if not self._reading:
            self.flush()

    def _send_pending(self, stream: Stream) -> None:
        if stream.id not in self.streams:
            return
        pending = stream.pending
        while pending:
            size = min(len(pending), stream.send_window, self._send_window, self._peer_frame_size)
            if size <= 0:
                if self._send_window <= 0:
                    self._blocked[stream.id] = stream
                return
            self._out.append(frame(DATA, 0, stream.id, bytes(pending[:size])))
            del pending[:size]
            stream.send_window -= size
            self._send_window -= size
        if stream.trailers is not None:
            self._out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, stream.trailers))
            stream.trailers = None
            self._closed_locally(stream)
        if not self._reading:
            self.flush()

    def _closed_locally(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        self._blocked.pop(stream.id, None)
        if not stream.remote_closed:
            # The answer is complete; the peer need not send the rest of its request (RFC 9113, 8.1).
            self._out.append(frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR)))

    def _reset(self, stream: Stream, code: int) -> None:
        self.streams.pop(stream.id, None)
        self._blocked.pop(stream.id, None)
        self._out.append(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        self.stream_reset(stream)

    def _fail(self, error: ProtocolError) -> None:
        log.warning("http2_connection_error", code=error.code, reason=str(error),
                    hint="the peer is not speaking HTTP/2 as Envoy's gRPC client does; the connection was closed")
        self._out.append(frame(GOAWAY, 0, 0, _U32.pack(self._last_stream) + _U32.pack(error.code)))
        self.flush()
        if self.transport is not None:
            self.transport.close()
        self._buffer = bytearray()


def _unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - payload[0]]
