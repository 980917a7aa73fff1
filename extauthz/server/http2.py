"""The server side of an HTTP/2 connection (RFC 9113), as Envoy's gRPC client speaks it.

Enough HTTP/2 for one kind of peer: a client that opens streams with prior
knowledge (h2c), as Envoy does towards a cluster with ``http2_protocol_options``,
or over TLS once the handshake selected :data:`ALPN` (the listener's
business, :mod:`extauthz.server.listener`: this connection sees the same bytes).
Frames are parsed from the bytes as they arrive; what the connection answers
(settings and ping acknowledgements, window updates, the streams' frames) is
gathered and written once per batch. Header blocks are decoded with ``hpack``
(one decoder per connection, as the protocol requires); what this server sends
uses only literal fields without indexing, so it keeps no encoder state.

A sidecar shares its pod with code it does not trust, so everything a peer can
make this connection hold or do is bounded by construction, the way the mature
stacks (nghttp2, Envoy) were hardened after each published HTTP/2 attack:

* **Input memory.** Frames are at most the protocol's default 16 KiB, so a
  frame in progress holds no more. Window credit goes back to the peer as the
  layer above *consumes* what it received (:meth:`Http2Connection.release`),
  not as bytes arrive, so a stream holds at most its window (64 KiB) and a
  connection :data:`CONNECTION_WINDOW`. Messages larger than that get credit
  for exactly their declared lengths (:meth:`~Http2Connection.expect`): a
  stream's window always covers its message in progress, and the connection's
  all of them together, the part beyond its base taken from a per-connection
  and a process-wide budget (:data:`BUDGET`); past them, that call is refused,
  not the process. A request that stops making progress is reset.
* **Output memory.** What waits for the peer's window is counted; past
  :data:`OUTPUT_PER_CONNECTION` the connection refuses new streams, and
  output that makes no progress for :data:`STALL_SECONDS` ends the connection.
* **Streams and headers.** At most :data:`MAX_STREAMS` open streams, header
  lists of :data:`MAX_HEADER_LIST` bytes, :data:`MAX_CONTINUATIONS` frames per
  header block; remembered header blocks are bounded in bytes.
* **Time.** The preface, a frame or header block in pieces, and an idle
  connection each have a limit (:data:`PREFACE_SECONDS`, :data:`READ_SECONDS`,
  :data:`IDLE_SECONDS`), and a TLS connection an age (:data:`TLS_MAX_AGE_SECONDS`),
  checked by one timer per connection.
* **Fairness.** At most :data:`FRAMES_PER_TURN` frames and
  :data:`STREAMS_PER_TURN` new streams are handled per turn of the loop before
  other connections run, and a stream's request is handed on only at the end
  of the batch it arrived in, so a stream reset in the same batch costs no
  Check (rapid reset, CVE-2023-44487). Control frames cost constant time.
* **Abuse.** Patterns no real client produces end the connection with GOAWAY
  ENHANCE_YOUR_CALM: more than half of the streams reset before their answer,
  floods of SETTINGS, PING, PRIORITY or WINDOW_UPDATE frames, empty frames
  (CVE-2019-9518), endless CONTINUATION frames (the 2024 CONTINUATION floods).

What the streams carry is the subclass's business (:mod:`extauthz.server.grpc_lean`):
it is told when a stream's headers arrived, when data arrived, when the batch
that brought them ends, and when a stream was reset or the connection lost; it
answers with :meth:`Http2Connection.send_headers`, :meth:`~Http2Connection.send_data`
and :meth:`~Http2Connection.end_stream`. Protocol errors end the connection with
GOAWAY and the RFC's error code; the reason is logged, never guessed around.
"""

from __future__ import annotations

import asyncio
import random
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import hpack
import hpack.table
import structlog

from extauthz.server.listener import close_after_error

log = structlog.get_logger("extauthz.http2")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ALPN = "h2"
"""HTTP/2 over TLS (RFC 9113, 3.2): the only protocol a TLS listener of this server lets a handshake select."""

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20

NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR, STREAM_CLOSED, FRAME_SIZE_ERROR = 0x0, 0x1, 0x3, 0x5, 0x6
REFUSED_STREAM, CANCEL, COMPRESSION_ERROR, ENHANCE_YOUR_CALM = 0x7, 0x8, 0x9, 0xB

SETTINGS_ENABLE_PUSH, SETTINGS_MAX_CONCURRENT_STREAMS = 0x2, 0x3
SETTINGS_INITIAL_WINDOW_SIZE, SETTINGS_MAX_FRAME_SIZE, SETTINGS_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6

DEFAULT_WINDOW = 65_535
MAX_WINDOW = 2**31 - 1
DEFAULT_FRAME_SIZE = 16_384
MAX_FRAME_SIZE = 16_777_215
LAST_STREAM = 2**31 - 1

FRAME_SIZE = DEFAULT_FRAME_SIZE
"""The largest frame accepted: the protocol's default, so a frame in progress never holds more."""
STREAM_WINDOW = DEFAULT_WINDOW
"""What a stream may send ahead of what was consumed: the protocol's default, so it holds from the first byte
(no round trip passes with a larger window the peer assumed); a larger message reserves its length."""
CONNECTION_WINDOW = 256 << 10
"""What a connection may send ahead of what was consumed, besides reservations: a few hundred Checks of Envoy's."""
RESERVE_PER_CONNECTION = 16 << 20
"""Connection credit beyond its base for messages in progress, at most (two of the largest, 8 MiB)."""
MAX_STREAMS = 100
"""Open streams per connection (SETTINGS_MAX_CONCURRENT_STREAMS): Envoy opens another connection past it."""
MAX_HEADER_LIST = 16 << 10
"""Decoded request headers per stream; Envoy's gRPC requests carry a few hundred bytes."""
MAX_CONTINUATIONS = 8
"""CONTINUATION frames per header block, as nghttp2 allows after the 2024 floods."""
OUTPUT_PER_CONNECTION = 1 << 20
"""Answers waiting for the peer's window; past it, new streams are refused until the peer reads."""
REMEMBERED_BLOCK_BYTES = 64 << 10
"""Decoded header blocks kept per connection, in bytes (Envoy repeats a few kinds of request)."""
FRAMES_PER_TURN = 128
STREAMS_PER_TURN = 16
PREFACE_SECONDS = 10.0
"""The client's preface must have arrived within this of the accept; over TLS the handshake comes first, in the
same time."""
READ_SECONDS = 10.0
"""A frame or a header block started must be complete within this, and a request (or a message in
progress) must make progress within it."""
STALL_SECONDS = 30.0
"""Output waiting for the peer's window with no progress for this long ends the connection."""
IDLE_SECONDS = 600.0
"""A connection without a stream for this long is closed gracefully (Envoy reconnects when it needs one)."""
TLS_MAX_AGE_SECONDS = 1800.0
"""A TLS connection is closed gracefully after this long (give or take a tenth, so they do not all end at once):
a rotated certificate or client CA reaches every peer within it, as grpc.aio's connection age did."""
MAX_AGE_GRACE_SECONDS = 30.0
"""What a connection past its age still has for the calls in progress (an ext_proc stream lives as long as its
request through Envoy); then what is left is cut."""
TICK_SECONDS = 2.0
PREMATURE_RESETS = 50
"""Streams reset before any work was done on them, tolerated in any case; past it, more than half of all
streams so reset ends the connection (rapid reset). A reset of a request being worked on never counts."""
SETTINGS_BURST, SETTINGS_PER_SECOND = 32, 2.0
PING_BURST, PING_PER_SECOND = 200, 20.0
"""Envoy sends SETTINGS once and PINGs for keepalive; grpc clients' bandwidth probes send a few per second."""
PRIORITY_PER_STREAM = 100
WINDOW_UPDATES_PER_DATA_FRAME = 10
"""Envoy's defaults: max_inbound_priority_frames_per_stream, max_inbound_window_update_frames_per_data_frame_sent."""
CONTROL_BASE = 100

_U32 = struct.Struct(">I")
_FRAME_HEAD = struct.Struct(">IBI")
"""A frame's 9 bytes: 24-bit length and type in the first word, then flags and stream."""
_SETTING = struct.Struct(">HI")
_DRAIN_PING = b"goaway\x00\x00"


class ProtocolError(Exception):
    """The peer broke the protocol (or abused it): the connection ends with GOAWAY and this code."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code


@dataclass
class Budget:
    """What all connections of this process may hold together, beyond each connection's own windows."""

    reservable: int = 64 << 20
    """Connection credit beyond the connections' bases, for large messages in progress, all together."""
    reserved: int = 0


BUDGET = Budget()


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
    """HPACK decoding with the blocks that changed nothing remembered, within a byte budget.

    After its first requests, Envoy's header blocks on a connection are the same
    bytes every time (every field an index into the dynamic table), and decoding
    one in Python costs ~17 µs. A block whose decoding left the dynamic table as
    it was decodes to the same headers for as long as the table stays as it is;
    any change to the table (a field added, a size update) forgets them all,
    since indexes then name other entries. What is remembered is bounded in
    bytes (:data:`REMEMBERED_BLOCK_BYTES`), so distinct blocks cost a peer
    decoding time, never memory.
    """

    __slots__ = ("_blocks", "_decoder", "_size", "_table")

    def __init__(self) -> None:
        self._decoder = hpack.Decoder(max_header_list_size=MAX_HEADER_LIST)
        self._table = self._decoder.header_table = _Table()
        self._blocks: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self._size = 0

    def decode(self, block: bytes) -> list[tuple[bytes, bytes]]:
        known = self._blocks.get(block)
        if known is not None:
            return known
        changes = self._table.changes
        headers = cast("list[tuple[bytes, bytes]]", self._decoder.decode(block, raw=True))  # raw: as bytes
        if self._table.changes != changes:
            self._blocks.clear()
            self._size = 0
            return headers
        # What a block costs to keep, roughly: its bytes, and each field's with a tuple's overhead.
        size = len(block) + sum(len(n) + len(v) + 64 for n, v in headers)
        if self._size + size <= REMEMBERED_BLOCK_BYTES:
            self._blocks[block] = headers
            self._size += size
        return headers


class Stream:
    """One request stream: its headers, what it may still send and receive, and what it holds."""

    __slots__ = (
        "awaiting",
        "extra",
        "handed",
        "handler",
        "headers",
        "held",
        "id",
        "pending",
        "progress",
        "recv_window",
        "remote_closed",
        "send_credit",
        "trailers",
        "unacknowledged",
    )

    def __init__(self, stream_id: int, headers: list[tuple[bytes, bytes]], now: float) -> None:
        self.id = stream_id
        self.headers = headers
        """The request headers, for :meth:`Http2Connection.stream_started` (emptied after it)."""
        self.send_credit = 0
        """The peer's window updates less what was sent: its window is this plus its initial window size."""
        self.recv_window = STREAM_WINDOW
        """What the peer may still send on it, as the peer sees it (credit counts once its update is sent)."""
        self.held = 0
        """Bytes received and not yet released by the layer above."""
        self.extra = 0
        """Credit granted for a large message beyond :data:`STREAM_WINDOW`, not yet consumed."""
        self.awaiting = 0
        """Bytes of the message in progress still to come, as its prefix declared (:meth:`~Http2Connection.expect`)."""
        self.progress = now
        """When its request last moved (opened, or data arrived)."""
        self.handed = False
        """Handed on to the layer above at least once: from then on work was spent on it."""
        self.unacknowledged = 0
        """Credit released and not yet given back with a window update."""
        self.pending = bytearray()
        """DATA payload waiting for window."""
        self.trailers: bytes | None = None
        """The closing header block, sent once ``pending`` is out."""
        self.remote_closed = False
        self.handler: Any = None
        """What the subclass keeps for this stream."""


_YIELD, _WRITE = 1, 2
"""Why reading is paused: to let other connections run, or because the peer does not read what it asked for."""


class Http2Connection(asyncio.Protocol):
    """One client connection; subclasses answer streams (see the module's docstring)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.streams: dict[int, Stream] = {}
        self._buffer = bytearray()
        self._preface = False
        self._decoder: HeaderDecoder | None = None
        self._continuation: tuple[int, int, bytearray] | None = None
        """(stream, HEADERS flags, block so far) while a header block spans CONTINUATION frames."""
        self._continuations = 0
        self._last_stream = 0
        self._peer_frame_size = DEFAULT_FRAME_SIZE
        self._peer_initial_window = DEFAULT_WINDOW
        self._send_window = DEFAULT_WINDOW
        self._recv_window = DEFAULT_WINDOW
        self._unacknowledged = 0
        """Connection credit released and not yet given back."""
        self._awaiting = 0
        """Bytes of every stream's message in progress still to come: the connection's window covers them all."""
        self._extra = 0
        """Connection credit granted beyond :data:`CONNECTION_WINDOW` (counted in :data:`BUDGET`), not yet absorbed."""
        self._spare_since = 0.0
        """Since when the connection holds extra credit with no message awaiting it."""
        self._blocked: dict[int, Stream] = {}
        """Streams with data waiting for the connection's window, in order."""
        self._stalled: dict[int, Stream] = {}
        """Streams with data waiting for their own window."""
        self._ready: dict[int, Stream] = {}
        """Streams that received data in this batch: handed on at its end (:meth:`stream_ready`)."""
        self._output = 0
        """Bytes of DATA waiting for window."""
        self._out: list[bytes] = []
        self._batching = False
        self._paused = 0
        self._continue: asyncio.Handle | None = None
        self._timer: asyncio.TimerHandle | None = None
        now = self._now = time.monotonic()
        """The time of the batch being read (one clock read per batch)."""
        self._made = self._active = self._progress = now
        self._partial_since = 0.0
        # Counters of what no real client does (see the module's docstring).
        self._opened = 0
        self._premature = 0
        self._refused = 0
        self._empty = 0
        self._priority = 0
        self._idle_frames = 0
        self._data_sent = 0
        self._settings = _Bucket(SETTINGS_BURST, SETTINGS_PER_SECOND, now)
        self._pings = _Bucket(PING_BURST, PING_PER_SECOND, now)
        self.going_away = False
        """GOAWAY sent: streams in progress finish, new ones are refused once the final GOAWAY is out."""
        self._final_goaway = False
        self._close_when_idle = False
        self._lingering = False
        self._answered_at = 0.0
        self.max_age = 0.0
        """Seconds after which the connection closes gracefully, or 0 (cleartext: nothing to rotate)."""
        self._aged = 0.0
        """When the connection reached its age and began to go away (0: not yet)."""

    # --- asyncio.Protocol ----------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's is not a subclass)
        settings = b"".join(_SETTING.pack(k, v) for k, v in (
            (SETTINGS_ENABLE_PUSH, 0), (SETTINGS_MAX_CONCURRENT_STREAMS, MAX_STREAMS),
            (SETTINGS_MAX_FRAME_SIZE, FRAME_SIZE), (SETTINGS_MAX_HEADER_LIST_SIZE, MAX_HEADER_LIST)))
        self.transport.write(frame(SETTINGS, 0, 0, settings)
                             + frame(WINDOW_UPDATE, 0, 0, _U32.pack(CONNECTION_WINDOW - DEFAULT_WINDOW)))
        self._recv_window = CONNECTION_WINDOW
        if transport.get_extra_info("sslcontext") is not None:
            self.max_age = TLS_MAX_AGE_SECONDS * random.uniform(0.9, 1.1)  # noqa: S311 - spreading, not secrecy
        self._timer = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)

    def pause_writing(self) -> None:
        # The peer is not reading what it asked for: read no more requests from it until it does.
        self._pause(_WRITE)

    def resume_writing(self) -> None:
        self._resume(_WRITE)

    def connection_lost(self, exc: Exception | None) -> None:
        streams, self.streams = self.streams, {}
        for stream in streams.values():
            self._forget(stream)
            self.stream_reset(stream)
        BUDGET.reserved -= self._extra  # credit the peer can no longer use
        self._extra = 0
        self._blocked.clear()
        self._stalled.clear()
        self._ready.clear()
        for handle in (self._timer, self._continue):
            if handle is not None:
                handle.cancel()
        self._buffer = bytearray()
        self.transport = None

    @property
    def last_active(self) -> float:
        """When a stream was last answered; never (0) before the first: opening streams that never end, or
        frames alone (PINGs, SETTINGS), are not activity."""
        return self._answered_at

    def data_received(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing() or self._lingering:
            return
        self._buffer += data
        self._process()

    # --- for subclasses -----------------------------------------------------------------------------

    def stream_started(self, stream: Stream) -> None:
        """A new stream's request headers arrived (``stream.remote_closed`` if it has no body)."""
        raise NotImplementedError

    def stream_data(self, stream: Stream, data: bytes, end_stream: bool) -> None:
        """Data arrived: keep it; act on it in :meth:`stream_ready`, once the batch has been read."""
        raise NotImplementedError

    def stream_ready(self, stream: Stream) -> None:
        """The batch that brought data (or the end) for this stream was read, and the stream is still open."""
        raise NotImplementedError

    def stream_reset(self, stream: Stream) -> None:
        """The peer reset the stream, or the connection was lost: nothing more can be sent on it."""

    def stream_stalled(self, stream: Stream) -> bool:
        """The stream's request has not moved for :data:`READ_SECONDS`: should it be reset? (Not a
        stream that may rightly wait, such as ext_proc's between messages.)"""
        return False

    def release(self, stream: Stream, size: int) -> None:
        """``size`` bytes the stream received are consumed: give the peer that much credit back.

        Credit reserved for a large message is absorbed first, so the windows
        return to their base once the message is consumed.
        """
        size = min(size, stream.held)  # nothing twice: a stream that ended released all it held
        stream.held -= size
        kept = min(stream.extra, size)
        stream.extra -= kept
        self._credit_stream(stream, size - kept)
        kept = min(self._extra, size)
        if kept:
            self._extra -= kept
            BUDGET.reserved -= kept
        self._give_back(size - kept)
        self._flush_unless_batching()

    def expect(self, stream: Stream, awaiting: int) -> bool:
        """The stream's message in progress still has ``awaiting`` bytes to come: let them all arrive.

        The stream's window is raised to cover them, and the connection's to
        cover every stream's together (never one shared window counted once per
        message, which would leave messages that fit no window each waiting for
        the others). What the connection needs beyond its base comes from its
        own and the process's budget; False when that cannot take it (the
        caller refuses the message instead), so memory held for messages in
        progress stays bounded whatever the peers declare.
        """
        self._awaiting += awaiting - stream.awaiting
        stream.awaiting = awaiting
        short = self._awaiting - self._recv_window  # the windows as the peer sees them
        if short > 0:
            if self._extra + short > RESERVE_PER_CONNECTION or BUDGET.reserved + short > BUDGET.reservable:
                return False
            self._extra += short
            BUDGET.reserved += short
            credit, self._unacknowledged = short + self._unacknowledged, 0
            self._recv_window += credit
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(credit)))
        short = awaiting - stream.recv_window
        if short > 0:  # a stream's window is no memory: the connection's bounds what arrives
            stream.extra += short
            credit, stream.unacknowledged = short + stream.unacknowledged, 0
            stream.recv_window += credit
            self._out.append(frame(WINDOW_UPDATE, 0, stream.id, _U32.pack(credit)))
        self._flush_unless_batching()
        return True

    def send_headers(self, stream: Stream, block: bytes, end_stream: bool = False) -> None:
        """Response headers (literal fields, :func:`literal_block`), small enough for one frame."""
        self._out.append(frame(HEADERS, END_HEADERS | (END_STREAM if end_stream else 0), stream.id, block))
        if end_stream:
            self._closed_locally(stream)
        self._flush_unless_batching()

    def send_data(self, stream: Stream, data: bytes) -> None:
        if stream.id not in self.streams:
            return  # reset, or ended here: nothing more goes out on it
        size = len(data)
        if not stream.pending and size <= min(self._peer_initial_window + stream.send_credit, self._send_window,
                                              self._peer_frame_size):
            # The usual answer: one frame, within every window.
            stream.send_credit -= size
            self._send_window -= size
            self._data_sent += 1
            self._out.append(frame(DATA, 0, stream.id, data))
            self._flush_unless_batching()
            return
        stream.pending += data
        self._output += size
        self._send_pending(stream)
        self._flush_unless_batching()

    def end_stream(self, stream: Stream, trailers: bytes) -> None:
        """The closing header block, after any data still waiting for window."""
        stream.trailers = trailers
        self._send_pending(stream)
        self._flush_unless_batching()

    def flush(self) -> None:
        if self._out and self.transport is not None and not self._lingering:  # nothing after the last GOAWAY
            self.transport.write(b"".join(self._out))
        self._out.clear()

    def go_away(self) -> None:
        """Refuse new streams from now on; those in progress finish.

        Gracefully, as nghttp2 and Envoy drain: a GOAWAY naming the last
        possible stream and a PING first, so streams the peer sent meanwhile are
        still served; the final GOAWAY once the PING comes back (or after a
        second).
        """
        if self.going_away or self.transport is None or self._lingering:
            return
        self.going_away = True
        self._out.append(frame(GOAWAY, 0, 0, _U32.pack(LAST_STREAM) + _U32.pack(NO_ERROR))
                         + frame(PING, 0, 0, _DRAIN_PING))
        self.flush()
        asyncio.get_running_loop().call_later(1.0, self._send_final_goaway)

    def calm_down(self) -> None:
        """End the connection now with GOAWAY ENHANCE_YOUR_CALM: its place is needed (the listener's cap)."""
        if self.transport is None or self._lingering:
            return
        self._out.append(frame(GOAWAY, 0, 0, _U32.pack(self._last_stream) + _U32.pack(ENHANCE_YOUR_CALM)))
        self._end_after_goaway()

    # --- reading ------------------------------------------------------------------------------------

    def _process(self) -> None:
        """Act on the frames buffered so far, a bounded batch per turn of the loop."""
        self._continue = None
        self._batching = True
        self._now = time.monotonic()
        try:
            buffer = self._buffer
            start = 0
            if not self._preface:
                if not PREFACE.startswith(bytes(buffer[:len(PREFACE)])):
                    raise ProtocolError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                if len(buffer) < len(PREFACE):
                    return
                self._preface = True
                start = len(PREFACE)
            used, more = self._frames(buffer, start)
            if used:
                del buffer[:used]
            if buffer or self._continuation is not None:
                if used or not self._partial_since:  # a frame completed: the one in pieces now is a new one
                    self._partial_since = self._now
            else:
                self._partial_since = 0.0
            self._hand_on()
            if more:
                # Let other connections run before the rest of this one's frames.
                self._pause(_YIELD)
                self._continue = asyncio.get_running_loop().call_soon(self._go_on)
        except ProtocolError as exc:
            self._fail(exc)
        except hpack.HPACKError as exc:
            self._fail(ProtocolError(COMPRESSION_ERROR, f"header block: {exc}"))
        finally:
            self._batching = False
            self.flush()

    def _go_on(self) -> None:
        self._resume(_YIELD)
        if self.transport is not None and not self.transport.is_closing():
            self._process()

    def _hand_on(self) -> None:
        ready, self._ready = self._ready, {}
        for stream in ready.values():
            if self.streams.get(stream.id) is stream:
                stream.handed = True
                self.stream_ready(stream)

    def _frames(self, buffer: bytearray, position: int) -> tuple[int, bool]:
        """Act on whole frames from ``position``, a batch at most; where it stopped, and whether frames remain."""
        size = len(buffer)
        count = 0
        started = self._opened
        while size - position >= 9:
            if count >= FRAMES_PER_TURN or self._opened - started >= STREAMS_PER_TURN:
                return position, True
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
            count += 1
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
                self._on_ping(stream_id, flags, payload)
            elif kind == WINDOW_UPDATE:
                self._on_window_update(stream_id, payload)
            elif kind == RST_STREAM:
                self._on_rst_stream(stream_id, payload)
            elif kind == PRIORITY:
                if length != 5 or not stream_id:
                    raise ProtocolError(FRAME_SIZE_ERROR if stream_id else PROTOCOL_ERROR, "malformed PRIORITY")
                self._priority += 1
                if self._priority > PRIORITY_PER_STREAM * (self._opened + 1):
                    raise ProtocolError(ENHANCE_YOUR_CALM, "a flood of PRIORITY frames")
            elif kind == PUSH_PROMISE:
                raise ProtocolError(PROTOCOL_ERROR, "PUSH_PROMISE from a client")
            elif kind == GOAWAY and stream_id:
                raise ProtocolError(PROTOCOL_ERROR, "GOAWAY on a stream")
            # A GOAWAY means the peer opens no more streams (those in progress finish, then it closes);
            # unknown frame types are ignored (RFC 9113, 4.1).
        return position, False

    def _on_data(self, stream_id: int, flags: int, payload: bytes) -> None:
        if not stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "DATA on stream 0")
        length = len(payload)
        self._recv_window -= length
        if self._recv_window < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, "the peer sent beyond the connection's window")
        end = bool(flags & END_STREAM)
        self._count_empty(length == 0 and not end)
        stream = self.streams.get(stream_id)
        if stream is None or stream.remote_closed:
            if stream is None and stream_id > self._last_stream:
                raise ProtocolError(PROTOCOL_ERROR, f"DATA on idle stream {stream_id}")
            self._give_back(length)  # a stream already reset or finished here: counted, dropped
            if stream is not None:
                self._reset(stream, STREAM_CLOSED)
            return
        stream.recv_window -= length
        if stream.recv_window < 0:
            raise ProtocolError(FLOW_CONTROL_ERROR, f"the peer sent beyond stream {stream_id}'s window")
        if flags & PADDED:
            data = _unpad(payload)
            padding = length - len(data)
            if padding:  # never held, and never part of a message's due: given straight back
                self._credit_stream(stream, padding)
                self._give_back(padding)
        else:
            data = payload
        stream.held += len(data)
        stream.progress = self._now
        if end:
            stream.remote_closed = True
        self._ready[stream_id] = stream
        self.stream_data(stream, data, end)

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
            self._count_empty(not payload)
            self._continuation = (stream_id, flags, bytearray(payload))
            self._continuations = 0

    def _on_continuation(self, stream_id: int, flags: int, payload: bytes) -> None:
        if self._continuation is None or self._continuation[0] != stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "CONTINUATION without its HEADERS")
        self._continuations += 1
        if self._continuations > MAX_CONTINUATIONS:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"a header block in over {MAX_CONTINUATIONS} CONTINUATION frames")
        block = self._continuation[2]
        block += payload
        if len(block) > MAX_HEADER_LIST:
            raise ProtocolError(ENHANCE_YOUR_CALM, f"a header block over {MAX_HEADER_LIST} bytes")
        if flags & END_HEADERS:
            headers_flags = self._continuation[1]
            self._continuation = None
            self._header_block(stream_id, headers_flags, bytes(block))
        else:
            self._count_empty(not payload)

    def _header_block(self, stream_id: int, flags: int, block: bytes) -> None:
        # Decoded whatever becomes of the stream: the decoder's table must follow every block the peer sent.
        if self._decoder is None:
            self._decoder = HeaderDecoder()
        headers = self._decoder.decode(block)
        self._empty = 0
        end = bool(flags & END_STREAM)
        existing = self.streams.get(stream_id)
        if existing is not None:  # trailers: gRPC clients send none, and they must end the stream
            if existing.remote_closed or not end:
                raise ProtocolError(PROTOCOL_ERROR, f"unexpected HEADERS on stream {stream_id}")
            existing.remote_closed = True
            self._ready[stream_id] = existing
            self.stream_data(existing, b"", True)
            return
        if stream_id <= self._last_stream:
            raise ProtocolError(STREAM_CLOSED, f"HEADERS on closed stream {stream_id}")
        self._last_stream = stream_id
        self._opened += 1
        if self._final_goaway or len(self.streams) >= MAX_STREAMS or self._output > OUTPUT_PER_CONNECTION:
            self._refused += 1
            if self._refused > MAX_STREAMS + self._opened // 2:
                raise ProtocolError(ENHANCE_YOUR_CALM, "streams opened again and again past the limits")
            self._out.append(frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        stream = self.streams[stream_id] = Stream(stream_id, headers, self._now)
        self._active = self._now
        stream.remote_closed = end
        self.stream_started(stream)
        stream.headers = []
        if end:
            self._ready[stream_id] = stream

    def _on_settings(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id:
            raise ProtocolError(PROTOCOL_ERROR, "SETTINGS on a stream")
        if flags & ACK:
            if payload:
                raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS acknowledgement with a payload")
            return
        if len(payload) % 6:
            raise ProtocolError(FRAME_SIZE_ERROR, "SETTINGS of a length not a multiple of 6")
        if not self._settings.take(time.monotonic()):
            raise ProtocolError(ENHANCE_YOUR_CALM, "a flood of SETTINGS frames")
        grown = False
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == SETTINGS_INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise ProtocolError(FLOW_CONTROL_ERROR, "SETTINGS_INITIAL_WINDOW_SIZE above 2^31-1")
                # Streams keep their credit relative to this size, so a change costs nothing per stream.
                grown = grown or value > self._peer_initial_window
                self._peer_initial_window = value
            elif key == SETTINGS_MAX_FRAME_SIZE:
                if not DEFAULT_FRAME_SIZE <= value <= MAX_FRAME_SIZE:
                    raise ProtocolError(PROTOCOL_ERROR, f"SETTINGS_MAX_FRAME_SIZE {value}")
                self._peer_frame_size = value
            elif key == SETTINGS_ENABLE_PUSH and value > 1:
                raise ProtocolError(PROTOCOL_ERROR, f"SETTINGS_ENABLE_PUSH {value}")
            # The rest concern what this server would encode or open: it indexes nothing and opens no stream.
        self._out.append(frame(SETTINGS, ACK, 0))
        if grown:
            for stream in list(self._stalled.values()):
                self._send_pending(stream)

    def _on_ping(self, stream_id: int, flags: int, payload: bytes) -> None:
        if stream_id or len(payload) != 8:
            raise ProtocolError(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "malformed PING")
        if flags & ACK:
            if payload == _DRAIN_PING:
                self._send_final_goaway()
            return
        if not self._pings.take(time.monotonic()):
            raise ProtocolError(ENHANCE_YOUR_CALM, "a flood of PING frames")
        self._out.append(frame(PING, ACK, 0, payload))

    def _on_rst_stream(self, stream_id: int, payload: bytes) -> None:
        if not stream_id or len(payload) != 4:
            raise ProtocolError(PROTOCOL_ERROR if not stream_id else FRAME_SIZE_ERROR, "malformed RST_STREAM")
        if stream_id > self._last_stream:
            raise ProtocolError(PROTOCOL_ERROR, f"RST_STREAM on idle stream {stream_id}")
        stream = self.streams.pop(stream_id, None)
        if stream is None:
            self._control_frame("RST_STREAM")
            return
        if not stream.handed:
            # Rapid reset: streams opened and reset before anything was done with them.
            self._premature += 1
            if self._premature > PREMATURE_RESETS and 2 * self._premature > self._opened:
                raise ProtocolError(ENHANCE_YOUR_CALM, "most streams reset before their answer")
        self._forget(stream)
        self.stream_reset(stream)
        self._close_if_done()

    def _on_window_update(self, stream_id: int, payload: bytes) -> None:
        if len(payload) != 4:
            raise ProtocolError(FRAME_SIZE_ERROR, "malformed WINDOW_UPDATE")
        self._control_frame("WINDOW_UPDATE")
        increment = _U32.unpack(payload)[0] & 0x7FFFFFFF
        if not stream_id:
            if not increment:
                raise ProtocolError(PROTOCOL_ERROR, "a zero window increment for the connection")
            self._send_window += increment
            if self._send_window > MAX_WINDOW:
                raise ProtocolError(FLOW_CONTROL_ERROR, "the connection's window above 2^31-1")
            # In order, and only while there is window: a 1-byte update moves one stream one byte.
            while self._blocked and self._send_window > 0:
                self._send_pending(next(iter(self._blocked.values())))
            return
        stream = self.streams.get(stream_id)
        if stream is None:
            if stream_id > self._last_stream:
                raise ProtocolError(PROTOCOL_ERROR, f"WINDOW_UPDATE on idle stream {stream_id}")
            return  # a stream that ended here
        if not increment:
            self._reset(stream, PROTOCOL_ERROR)
            return
        stream.send_credit += increment
        if self._peer_initial_window + stream.send_credit > MAX_WINDOW:
            self._reset(stream, FLOW_CONTROL_ERROR)
            return
        if stream.pending or stream.trailers is not None:
            self._send_pending(stream)

    def _control_frame(self, kind: str) -> None:
        """A frame that asks for no work: in proportion to the answers sent, as Envoy counts them."""
        self._idle_frames += 1
        if self._idle_frames > CONTROL_BASE + WINDOW_UPDATES_PER_DATA_FRAME * (self._data_sent + self._opened):
            raise ProtocolError(ENHANCE_YOUR_CALM, f"a flood of {kind} frames")

    def _count_empty(self, empty: bool) -> None:
        """Frames that carry nothing and end nothing, back to back, are only a way to spend CPU."""
        if not empty:
            self._empty = 0
            return
        self._empty += 1
        if self._empty > 1:
            raise ProtocolError(ENHANCE_YOUR_CALM, "a flood of empty frames")

    # --- credit -------------------------------------------------------------------------------------

    def _give_back(self, credit: int) -> None:
        if credit <= 0:
            return
        self._unacknowledged += credit
        if self._unacknowledged >= CONNECTION_WINDOW // 4 or self._recv_window < CONNECTION_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, 0, _U32.pack(self._unacknowledged)))
            self._recv_window += self._unacknowledged
            self._unacknowledged = 0

    def _credit_stream(self, stream: Stream, credit: int) -> None:
        if credit <= 0 or stream.remote_closed or stream.id not in self.streams:
            return
        stream.unacknowledged += credit
        if stream.unacknowledged >= STREAM_WINDOW // 2 or stream.recv_window < STREAM_WINDOW // 2:
            self._out.append(frame(WINDOW_UPDATE, 0, stream.id, _U32.pack(stream.unacknowledged)))
            stream.recv_window += stream.unacknowledged
            stream.unacknowledged = 0

    def _forget(self, stream: Stream) -> None:
        """A stream is gone: what it held is consumed, and its message in progress is awaited no more."""
        self._blocked.pop(stream.id, None)
        self._stalled.pop(stream.id, None)
        self._output -= len(stream.pending)
        stream.pending = bytearray()
        if stream.held:
            self.release(stream, stream.held)
        self._awaiting -= stream.awaiting
        stream.awaiting = 0

    # --- frames out ---------------------------------------------------------------------------------

    def _flush_unless_batching(self) -> None:
        if not self._batching:
            self.flush()

    def _send_pending(self, stream: Stream) -> None:
        if stream.id not in self.streams:
            return
        pending = stream.pending
        while pending:
            size = min(len(pending), self._peer_initial_window + stream.send_credit, self._send_window,
                       self._peer_frame_size)
            if size <= 0:
                if self._send_window <= 0:
                    self._blocked[stream.id] = stream
                else:
                    self._stalled[stream.id] = stream
                return
            self._out.append(frame(DATA, 0, stream.id, bytes(pending[:size])))
            del pending[:size]
            stream.send_credit -= size
            self._send_window -= size
            self._output -= size
            self._data_sent += 1
            self._progress = time.monotonic()
        self._blocked.pop(stream.id, None)
        self._stalled.pop(stream.id, None)
        if stream.trailers is not None:
            self._out.append(frame(HEADERS, END_HEADERS | END_STREAM, stream.id, stream.trailers))
            stream.trailers = None
            self._closed_locally(stream)

    def _closed_locally(self, stream: Stream) -> None:
        self.streams.pop(stream.id, None)
        # An answer that waited (a task) ends after its batch: read the clock then.
        self._active = self._answered_at = self._now if self._batching else time.monotonic()
        self._forget(stream)
        if not stream.remote_closed:
            # The answer is complete; the peer need not send the rest of its request (RFC 9113, 8.1).
            self._out.append(frame(RST_STREAM, 0, stream.id, _U32.pack(NO_ERROR)))
        self._close_if_done()

    def _close_if_done(self) -> None:
        if self._close_when_idle and not self.streams:
            self._close_after_flush()

    def _reset(self, stream: Stream, code: int) -> None:
        self.streams.pop(stream.id, None)
        self._forget(stream)
        self._out.append(frame(RST_STREAM, 0, stream.id, _U32.pack(code)))
        self.stream_reset(stream)

    def _send_final_goaway(self) -> None:
        if self._final_goaway or self.transport is None:
            return
        self._final_goaway = True
        self._out.append(frame(GOAWAY, 0, 0, _U32.pack(self._last_stream) + _U32.pack(NO_ERROR)))
        if self._close_when_idle and not self.streams:
            self._close_after_flush()
        self._flush_unless_batching()

    def _close_after_flush(self) -> None:
        self.flush()
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: ProtocolError) -> None:
        log.warning("http2_connection_error", code=error.code, reason=str(error),
                    hint="the peer is not speaking HTTP/2 as Envoy's gRPC client does; the connection was closed")
        self._out.append(frame(GOAWAY, 0, 0, _U32.pack(self._last_stream) + _U32.pack(error.code)))
        self._end_after_goaway()

    # --- pausing and time ---------------------------------------------------------------------------

    def _pause(self, reason: int) -> None:
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()
        self._paused |= reason

    def _resume(self, reason: int) -> None:
        if not self._paused & reason:
            return
        self._paused &= ~reason
        if not self._paused and self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _tick(self) -> None:
        """Once per :data:`TICK_SECONDS`: the time limits of the module's docstring."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        now = time.monotonic()
        if not self._preface and now - self._made > PREFACE_SECONDS:
            self._timed_out("no HTTP/2 preface")
            return
        if self._partial_since and now - self._partial_since > READ_SECONDS:
            self._timed_out("a frame or header block left incomplete")
            return
        if self._output and now - self._progress > STALL_SECONDS:
            self._timed_out("answers waiting for a window the peer does not open")
            return
        for stream in [s for s in self.streams.values() if not s.remote_closed and now - s.progress > READ_SECONDS]:
            if stream.awaiting or self.stream_stalled(stream):
                log.warning("http2_stream_stalled", stream=stream.id,
                            hint=f"a request made no progress for {READ_SECONDS:g} s; it was reset")
                self._reset(stream, CANCEL)
        if self._extra and self._awaiting:
            self._spare_since = 0.0
        elif self._extra and not self._spare_since:
            self._spare_since = now
        elif self._extra and now - self._spare_since > READ_SECONDS and not self.going_away:
            # Credit for messages that never came holds the process's budget: the connection ends gracefully.
            self._close_when_idle = True
            self.go_away()
        if self._aged and now - self._aged > MAX_AGE_GRACE_SECONDS:
            self._timed_out("calls still in progress past the connection's maximum age and its grace")
            return
        if self.max_age and not self._aged and now - self._made > self.max_age:
            self._aged = now
            self._close_when_idle = True
            self.go_away()
        self.flush()
        if not self.streams and not self.going_away and now - self._active > IDLE_SECONDS:
            self._close_when_idle = True
            self.go_away()
        self._timer = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)

    def _timed_out(self, reason: str) -> None:
        log.warning("http2_connection_timeout", reason=reason, hint="the connection was closed")
        self._out.append(frame(GOAWAY, 0, 0, _U32.pack(self._last_stream) + _U32.pack(NO_ERROR)))
        self._end_after_goaway()

    def _end_after_goaway(self) -> None:
        """Nothing more is read or answered; the GOAWAY reaches the peer even if it is still sending."""
        self.flush()
        self._lingering = True
        self._buffer = bytearray()
        if self._continue is not None:
            self._continue.cancel()
            self._continue = None
        self._paused = 0
        streams, self.streams = self.streams, {}
        for stream in streams.values():  # nothing more can be answered: calls in progress are cancelled
            self._forget(stream)
            self.stream_reset(stream)
        if self.transport is not None:
            close_after_error(self.transport)


class _Bucket:
    """A token bucket: ``burst`` at once, then ``rate`` per second."""

    __slots__ = ("_at", "_rate", "_size", "_tokens")

    def __init__(self, burst: int, rate: float, now: float) -> None:
        self._size, self._rate, self._tokens, self._at = float(burst), rate, float(burst), now

    def take(self, now: float) -> bool:
        self._tokens = min(self._size, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _unpad(payload: bytes) -> bytes:
    if not payload or payload[0] >= len(payload):
        raise ProtocolError(PROTOCOL_ERROR, "padding longer than the frame")
    return payload[1:len(payload) - payload[0]]
