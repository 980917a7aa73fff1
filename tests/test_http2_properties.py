"""The lean gRPC server's connection against random frame sequences, in process.

Whatever bytes a peer sends, in whatever pieces they arrive, the connection
(``extauthz.server.grpc_lean``'s protocol, driven through ``data_received`` with a
transport that records what it writes) must:

- never raise out of ``data_received``;
- write only whole, well-formed frames, and end a connection it gives up on with
  GOAWAY carrying an error code RFC 9113 defines, written last, then close; never
  close without one;
- hold a bounded number of bytes, whatever the peer sent (an HPACK bomb, frames
  announced at 16 MB, header blocks that never end);
- answer an allow (grpc-status 0 with the handler's OK answer) only on a stream that
  carried a complete, valid Check;
- and, for a peer that follows the protocol, answer every Check it sent, whatever
  the read boundaries.

The Check handler here allows only a request whose path is ``/ok/<n>`` and answers
with ``<n>``, so an allow can be traced to the request it answers.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Iterable
from typing import Any

import hpack
from envoy.service.auth.v3 import external_auth_pb2
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from extauthz.server.grpc_lean import LeanGrpcServer, Methods
from tests.e2e.security.transport_harness import (
    CHECK,
    CONTINUATION,
    DATA,
    END_HEADERS,
    END_STREAM,
    ERROR_CODES,
    GOAWAY,
    HEADERS,
    PADDED,
    PING,
    PREFACE,
    PRIORITY,
    PRIORITY_FLAG,
    RST_STREAM,
    SETTINGS,
    frame,
    grpc_message,
    literal,
    request_fields,
    window_update,
)
from tests.e2e.security.transport_harness import (
    settings as settings_frame,
)

HELD_BASE, HELD_PER_BYTE = 64 << 10, 4
"""Bytes a connection may hold: a base, plus a few times what it was sent; never what it was sent decoded
into many times more (an HPACK bomb names a 4 KB table entry 16 times in 20 bytes)."""


def _check_body(n: int, path: str | None = None) -> bytes:
    request = external_auth_pb2.CheckRequest()
    request.attributes.request.http.path = path if path is not None else f"/ok/{n}"
    return bytes(request.SerializeToString())


async def _check(message: bytes) -> bytes:
    """Allow only ``/ok/<n>``, answering ``n`` in the OK response's header; deny anything else."""
    request = external_auth_pb2.CheckRequest.FromString(message)
    response = external_auth_pb2.CheckResponse()
    path = request.attributes.request.http.path
    if path.startswith("/ok/"):
        response.status.code = 0
        header = response.ok_response.headers.add().header
        header.key, header.value = "x-n", path[4:]
    else:
        response.status.code = 7
        response.denied_response.status.code = 403
    return bytes(response.SerializeToString())


class Transport:
    """What the connection writes, and whether it closed; reads always (a peer that keeps up)."""

    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False
        self.written_after_close = 0
        self.paused = False

    def write(self, data: bytes) -> None:
        if self.closed:
            self.written_after_close += len(data)
            return
        self.out += data

    def writelines(self, chunks: Iterable[bytes]) -> None:
        for chunk in chunks:
            self.write(chunk)

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.closed = True  # nothing more can be written: the connection's end, as the peer sees it

    def is_closing(self) -> bool:
        return self.closed

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_write_buffer_size(self) -> int:
        return 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default


def held_bytes(root: object) -> int:
    """Bytes in the buffers reachable from the connection (each object counted once)."""
    seen: set[int] = set()
    total = 0
    todo: deque[object] = deque([root])
    skip = (Transport, LeanGrpcServer, asyncio.AbstractEventLoop, asyncio.Handle, asyncio.Future, type)
    while todo:
        obj = todo.popleft()
        if id(obj) in seen or isinstance(obj, skip) or (callable(obj) and not hasattr(obj, "__dict__")):
            continue
        seen.add(id(obj))
        if isinstance(obj, (bytes, bytearray, str, memoryview)):
            total += len(obj)
        elif isinstance(obj, dict):
            todo.extend(obj.keys())
            todo.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset, deque)):
            todo.extend(obj)
        else:
            module = type(obj).__module__
            if not (module.startswith(("extauthz", "hpack")) or module == "builtins"):
                continue
            todo.extend(getattr(obj, "__dict__", {}).values())
            for cls in type(obj).__mro__:
                for slot in getattr(cls, "__slots__", ()):
                    if hasattr(obj, slot):
                        todo.append(getattr(obj, slot))
    return total


def parse_frames(out: bytes) -> list[tuple[int, int, int, bytes]]:
    frames = []
    position = 0
    while position < len(out):
        assert len(out) - position >= 9, f"a partial frame header at the end of the output: {out[position:]!r}"
        length = int.from_bytes(out[position:position + 3], "big")
        kind, flags = out[position + 3], out[position + 4]
        stream = int.from_bytes(out[position + 5:position + 9], "big")
        assert not stream >> 31, "the reserved bit set"
        payload = out[position + 9:position + 9 + length]
        assert len(payload) == length, "a partial frame at the end of the output"
        assert length <= 16_384, "a frame over the peer's default SETTINGS_MAX_FRAME_SIZE"
        frames.append((kind, flags, stream, payload))
        position += 9 + length
    return frames


def run(chunks: list[bytes]) -> tuple[Transport, list[tuple[int, int, int, bytes]], int]:
    """Feed the chunks to a fresh connection; its output frames and the most bytes it held after a chunk."""

    async def main() -> tuple[Transport, int]:
        server = LeanGrpcServer(Methods({CHECK: _check}, {}), "127.0.0.1:0")
        transport = Transport()
        connection = server.connection()
        connection.connection_made(transport)  # type: ignore[arg-type]
        peak = 0
        try:
            for chunk in chunks:
                if transport.closed:
                    break
                connection.data_received(chunk)
                for _ in range(3):
                    await asyncio.sleep(0)  # an answer that waited runs as a task
                peak = max(peak, held_bytes(connection))
        finally:
            connection.connection_lost(None)
        return transport, peak

    transport, peak = asyncio.run(main())
    return transport, parse_frames(bytes(transport.out)), peak


def outcome(transport: Transport, frames: list[tuple[int, int, int, bytes]]) -> dict[int, tuple[int | None, bytes]]:
    """Assert the connection-level properties; returns per stream its grpc-status and answer bytes."""
    assert transport.written_after_close == 0, "bytes written after the connection was closed"
    goaways = [i for i, f in enumerate(frames) if f[0] == GOAWAY]
    if transport.closed:
        assert goaways, "the connection was closed without GOAWAY"
    for i in goaways:
        code = int.from_bytes(frames[i][3][4:8], "big")
        assert code in ERROR_CODES, f"GOAWAY with an undefined error code {code:#x}"
        if code != 0:
            assert i == len(frames) - 1, "frames written after an error GOAWAY"
            assert transport.closed, "an error GOAWAY without closing the connection"
    decoder = hpack.Decoder()
    answers: dict[int, tuple[int | None, bytes]] = {}
    for kind, _, stream, payload in frames:
        if kind == HEADERS:
            fields = dict(decoder.decode(payload, raw=True))
            if b"grpc-status" in fields:
                answers[stream] = (int(fields[b"grpc-status"]), answers.get(stream, (None, b""))[1])
        elif kind == DATA and payload:
            status, body = answers.get(stream, (None, b""))
            answers[stream] = (status, body + payload)
    return answers


def allows(answers: dict[int, tuple[int | None, bytes]]) -> dict[int, str]:
    """Stream -> ``n`` of every allow answered (grpc-status 0 and an OK CheckResponse)."""
    found = {}
    for stream, (status, body) in answers.items():
        if status != 0 or len(body) < 5:
            continue
        response = external_auth_pb2.CheckResponse.FromString(body[5:5 + int.from_bytes(body[1:5], "big")])
        if response.HasField("ok_response"):
            found[stream] = response.ok_response.headers[0].header.value
    return found


# --- what a peer sends --------------------------------------------------------------------------

STREAMS = st.sampled_from([0, 1, 2, 3, 5, 7, 9, 11, 2**31 - 1])


def valid_check(stream: int, n: int, pieces: int = 1, padded: bool = False) -> bytes:
    """A complete Check: literal header block (no table state), message in ``pieces`` DATA frames."""
    block = b"".join(literal(k.encode(), v.encode()) for k, v in request_fields())
    body = grpc_message(_check_body(n))
    cut = [len(body) * i // pieces for i in range(pieces + 1)]
    out = frame(HEADERS, END_HEADERS, stream, block)
    for i in range(pieces):
        payload = body[cut[i]:cut[i + 1]]
        flags = END_STREAM if i == pieces - 1 else 0
        if padded:
            payload, flags = bytes([3]) + payload + b"\x00\x00\x00", flags | PADDED
        out += frame(DATA, flags, stream, payload)
    return out


def truncated_check(stream: int, n: int) -> bytes:
    """A Check whose message ends two bytes short of its declared length, with END_STREAM.

    The bytes that arrived parse on their own as a Check for ``/ok/<n>`` (the two
    missing are an unknown field after it): only the framing says it is incomplete.
    """
    block = b"".join(literal(k.encode(), v.encode()) for k, v in request_fields())
    body = _check_body(n)
    whole = body + b"\x78\x01"  # field 15, a varint: unknown to the Check, still part of the message
    return frame(HEADERS, END_HEADERS, stream, block) + frame(
        DATA, END_STREAM, stream, b"\x00" + len(whole).to_bytes(4, "big") + body)


def hpack_bomb(stream: int) -> bytes:
    """One 4 KB field added to the table, then a block naming it ~16 times: small input, large header list."""
    encoder = hpack.Encoder()
    first = encoder.encode([*request_fields(), ("x-bomb", "b" * 4000)])
    again = encoder.encode([*request_fields(), *[("x-bomb", "b" * 4000)] * 16])
    return frame(HEADERS, END_HEADERS, stream, first) + frame(HEADERS, END_HEADERS, stream + 2, again)


def random_frame() -> st.SearchStrategy[bytes]:
    return st.builds(
        frame, st.integers(0, 12), st.integers(0, 255), STREAMS, st.binary(max_size=48))


def typed_frames() -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.builds(lambda k, v: settings_frame((k, v)), st.integers(0, 8), st.integers(0, 2**32 - 1)),
        st.just(settings_frame()),
        st.just(frame(SETTINGS, 1, 0)),
        st.builds(window_update, STREAMS, st.integers(0, 2**31 - 1)),
        st.builds(lambda s, p: frame(PING, 0, s, p), st.sampled_from([0, 1]), st.binary(min_size=8, max_size=8)),
        st.builds(lambda s, c: frame(RST_STREAM, 0, s, c.to_bytes(4, "big")), STREAMS, st.integers(0, 15)),
        st.builds(lambda s, d: frame(PRIORITY, 0, s, d.to_bytes(4, "big") + b"\x10"), STREAMS, STREAMS),
        st.builds(lambda s, f, p: frame(CONTINUATION, f, s, p), STREAMS, st.sampled_from([0, END_HEADERS]),
                  st.binary(max_size=32)),
        st.builds(lambda s, f, p: frame(DATA, f, s, p), STREAMS, st.sampled_from([0, END_STREAM, PADDED]),
                  st.binary(max_size=64)),
        st.builds(lambda s, f: frame(HEADERS, f, s, b"".join(literal(k.encode(), v.encode())
                                                              for k, v in request_fields())),
                  STREAMS, st.sampled_from([0, END_HEADERS, END_HEADERS | END_STREAM, PRIORITY_FLAG])),
        st.builds(lambda s: frame(HEADERS, END_HEADERS, s, b"\x80"), STREAMS),
        st.builds(lambda s, n: frame(DATA, 0, s, b"", length=n), STREAMS, st.integers(0, 2**24 - 1)),
        st.builds(lambda s: frame(GOAWAY, 0, 0, s.to_bytes(4, "big") + b"\x00\x00\x00\x00"), STREAMS),
        st.builds(hpack_bomb, st.sampled_from([1, 3, 5])),
        st.builds(lambda s: frame(HEADERS, 0, s, b"") + frame(CONTINUATION, 0, s) * 200, st.sampled_from([1, 3])),
    )


@st.composite
def element(draw: st.DrawFn, n: int, checks: dict[int, set[str]]) -> bytes:
    """One piece of a sequence; a complete valid Check is noted in ``checks`` (stream -> its ``n``)."""
    kind = draw(st.integers(0, 5))
    if kind == 0:
        stream = draw(st.sampled_from([1, 3, 5, 7, 9, 11]))
        checks.setdefault(stream, set()).add(str(n))
        return valid_check(stream, n, draw(st.integers(1, 3)), draw(st.booleans()))
    if kind == 1:
        return truncated_check(draw(st.sampled_from([1, 3, 5, 7, 9, 11])), n)
    return draw(st.one_of(typed_frames(), random_frame(), st.binary(min_size=1, max_size=24)))


@st.composite
def sequences(draw: st.DrawFn, protocol_only: bool = False) -> tuple[list[bytes], dict[int, set[str]]]:
    """Chunks as they might arrive, from a preface (mostly) and frames; and the complete valid Checks in them."""
    checks: dict[int, set[str]] = {}
    if protocol_only:
        streams = draw(st.lists(st.sampled_from(range(1, 60, 2)), unique=True, min_size=1, max_size=8))
        parts = [PREFACE, settings_frame()]
        for i, stream in enumerate(sorted(streams)):
            checks[stream] = {str(i)}
            parts.append(valid_check(stream, i, draw(st.integers(1, 3)), draw(st.booleans())))
            parts.append(draw(st.sampled_from([b"", frame(PING, 0, 0, b"12345678"), window_update(0, 100),
                                               settings_frame((4, 70_000)),
                                               frame(PRIORITY, 0, stream, b"\x00\x00\x00\x00\x10")])))
    else:
        parts = [draw(st.sampled_from([PREFACE + settings_frame(), PREFACE, b"", PREFACE[:10] + b"x"]))]
        parts += [draw(element(i, checks)) for i in range(draw(st.integers(1, 12)))]
    data = b"".join(parts)
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12))))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds) if b > a], checks


# --- the properties -----------------------------------------------------------------------------

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY_SETTINGS
@given(sequences())
def test_random_frames_end_in_answers_or_goaway_and_never_in_an_unearned_allow(
        case: tuple[list[bytes], dict[int, set[str]]]) -> None:
    chunks, possible = case
    transport, frames, peak = run(chunks)
    answers = outcome(transport, frames)
    sent = sum(map(len, chunks))
    assert peak <= HELD_BASE + HELD_PER_BYTE * sent, f"the connection held {peak} bytes after {sent} were sent"
    for stream, n in allows(answers).items():
        assert n in possible.get(stream, set()), f"an allow on stream {stream} for a Check never sent whole"


@PROPERTY_SETTINGS
@given(sequences(protocol_only=True))
def test_a_peer_following_the_protocol_gets_every_check_answered_whatever_the_read_boundaries(
        case: tuple[list[bytes], dict[int, set[str]]]) -> None:
    chunks, checks = case
    transport, frames, _ = run(chunks)
    answers = outcome(transport, frames)
    assert not transport.closed, f"closed a well-behaved connection: {frames[-1:]}"
    expected = {stream: ns.pop() for stream, ns in checks.items()}
    assert allows(answers) == expected


def test_the_held_bytes_walk_sees_a_buffered_frame() -> None:
    """The bound above measures something: a frame announced at 16 KB and half sent is held."""
    transport, _, peak = run([PREFACE + settings_frame(), frame(HEADERS, 0, 1, b"h" * 8000, length=16_000)])
    assert not transport.closed
    assert peak >= 8000

