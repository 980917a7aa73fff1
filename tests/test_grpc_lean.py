"""The lean gRPC server against a second HTTP/2 implementation (grpcio's client) and against raw frames.

Envoy drives it in every end-to-end test (it is the default); here, grpcio's
client checks the protocol from the other side (its flow control, trailers,
status codes and percent-encoded messages), and hand-written frames check what
no well-behaved client sends: a broken preface, oversized frames, a peer that
ignores its windows, header blocks in pieces.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import hpack
import pytest
from envoy.service.auth.v3 import external_auth_pb2
from grpc_health.v1 import health_pb2
from grpc_health.v1._async import HealthServicer

from bench.micro import Workload
from extauthz.server import http2
from extauthz.server.authorization import CHECK_PATH
from extauthz.server.grpc_lean import (
    INTERNAL,
    GrpcError,
    LeanGrpcServer,
    Methods,
    health_check,
    health_watch,
)
from extauthz.server.handoff_header import RECORD_HEADER


class Serving:
    """A lean server on its own loop in a thread, for blocking grpcio clients in the test."""

    def __init__(self, methods: Methods) -> None:
        self.loop = asyncio.new_event_loop()
        self.server = LeanGrpcServer(methods, "127.0.0.1:0")
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.run(self.server.start())
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.server.port}")

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def unary(self, path: str) -> grpc.UnaryUnaryMultiCallable:
        return self.channel.unary_unary(path)

    def streaming(self, path: str) -> grpc.StreamStreamMultiCallable:
        return self.channel.stream_stream(path)

    def close(self) -> None:
        self.channel.close()
        self.run(self.server.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@contextmanager
def serving(unary: dict[str, Callable[[bytes], Coroutine[Any, Any, bytes]]] | None = None,
            streams: dict[str, Callable[[], Any]] | None = None,
            server_streams: dict[str, Any] | None = None) -> Iterator[Serving]:
    running = Serving(Methods(unary or {}, streams or {}, server_streams or {}))
    try:
        yield running
    finally:
        running.close()


class Echo:
    """A stream that answers each message with its number and the message, and is done after ``limit``."""

    def __init__(self, limit: int = 3, wait: float = 0.0) -> None:
        self.limit, self.wait, self.count, self.ended_early = limit, wait, 0, False

    @property
    def done(self) -> bool:
        return self.count >= self.limit

    async def answer(self, message: bytes) -> bytes:
        if self.wait:
            await asyncio.sleep(self.wait)
        self.count += 1
        return b"%d:" % self.count + message

    def ended(self) -> None:
        self.ended_early = True


# --- against grpcio's client --------------------------------------------------------------------


def test_a_check_is_answered_with_the_servicers_own_response() -> None:
    work = Workload()
    with serving({CHECK_PATH: work.servicer.check_message}) as running:
        answer = external_auth_pb2.CheckResponse.FromString(running.unary(CHECK_PATH)(work.check_request, timeout=5))
    direct = external_auth_pb2.CheckResponse.FromString(work.run(work.check_grpc()))
    assert answer.status.code == 0 and answer.ok_response.headers  # an allow, with the upstream mutations
    assert [h.header.key for h in answer.ok_response.response_headers_to_add] == ["x-extauthz-decision-id"]
    for response in (answer, direct):  # each Check has its own decision id (also in its record); the rest is equal
        response.ok_response.response_headers_to_add[0].header.value = ""
        response.dynamic_metadata.fields[RECORD_HEADER].string_value = ""
    assert answer == direct


def test_a_request_that_does_not_parse_ends_with_internal_never_an_answer() -> None:
    work = Workload()
    with serving({CHECK_PATH: work.servicer.check_message}) as running, pytest.raises(grpc.RpcError) as failed:
        running.unary(CHECK_PATH)(b"\xff\xff\xff", timeout=5)
    assert failed.value.code() == grpc.StatusCode.INTERNAL


def test_health_answers_per_service_and_not_serving_once_draining() -> None:
    health = HealthServicer()  # as app.py builds it, for either gRPC server
    path = "/grpc.health.v1.Health/Check"

    def ask(service: str) -> int:
        raw = running.unary(path)(health_pb2.HealthCheckRequest(service=service).SerializeToString(), timeout=5)
        return health_pb2.HealthCheckResponse.FromString(raw).status

    with serving({path: health_check(health)}) as running:
        running.run(health.set("", health_pb2.HealthCheckResponse.SERVING))
        assert ask("") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as unknown:
            ask("nope")
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        running.run(health.enter_graceful_shutdown())
        running.run(health.set("", health_pb2.HealthCheckResponse.SERVING))  # ignored from now on
        assert ask("") == health_pb2.HealthCheckResponse.NOT_SERVING


def test_unknown_methods_errors_and_failures_end_with_their_status() -> None:
    async def refuses(message: bytes) -> bytes:
        raise GrpcError(grpc.StatusCode.NOT_FOUND.value[0], "no such thing: ünïcode 100% kept")

    async def breaks(message: bytes) -> bytes:
        raise ValueError("a bug")

    with serving({"/t.T/Refuses": refuses, "/t.T/Breaks": breaks}) as running:
        with pytest.raises(grpc.RpcError) as unknown:
            running.unary("/t.T/Nope")(b"", timeout=5)
        assert unknown.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.RpcError) as refused:
            running.unary("/t.T/Refuses")(b"x", timeout=5)
        assert refused.value.code() == grpc.StatusCode.NOT_FOUND
        assert refused.value.details() == "no such thing: ünïcode 100% kept"
        with pytest.raises(grpc.RpcError) as broken:
            running.unary("/t.T/Breaks")(b"x", timeout=5)
        assert broken.value.code() == grpc.StatusCode.INTERNAL and "a bug" not in broken.value.details()


def test_a_stream_is_answered_in_order_and_ends_when_done_or_when_the_client_ends() -> None:
    made: list[Echo] = []

    def opener(wait: float) -> Callable[[], Echo]:
        def make() -> Echo:
            made.append(Echo(3, wait))
            return made[-1]
        return make

    with serving(streams={"/t.T/Echo": opener(0.0), "/t.T/Slow": opener(0.01)}) as running:
        for path in ("/t.T/Echo", "/t.T/Slow"):
            answers = list(running.streaming(path)(iter([b"a", b"b", b"c", b"d", b"e"]), timeout=5))
            assert answers == [b"1:a", b"2:b", b"3:c"]
            assert not made[-1].ended_early
            call = running.streaming(path)(iter([b"a", b"b"]), timeout=5)
            assert list(call) == [b"1:a", b"2:b"] and call.code() == grpc.StatusCode.OK
            assert made[-1].ended_early


def test_large_messages_both_ways_follow_each_others_flow_control() -> None:
    big = bytes(range(256)) * (3 * 4096)  # 3 MiB: beyond grpcio's initial windows and our frame size

    with serving({"/t.T/Size": size}, {"/t.T/Echo": lambda: Echo(2)}) as running:
        assert running.unary("/t.T/Size")(big * 2, timeout=20) == str(len(big) * 2).encode()
        answers = list(running.streaming("/t.T/Echo")(iter([big, big[::-1]]), timeout=20))
        assert answers == [b"1:" + big, b"2:" + big[::-1]]
        with pytest.raises(grpc.RpcError) as too_big:
            running.unary("/t.T/Size")(b"x" * ((8 << 20) + 1), timeout=20)
        assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


def test_a_call_the_client_gives_up_on_is_cancelled_here() -> None:
    outcome: list[str] = []

    async def slow(message: bytes) -> bytes:
        try:
            await asyncio.sleep(5)
        except asyncio.CancelledError:
            outcome.append("cancelled")
            raise
        return b""

    with serving({"/t.T/Slow": slow}) as running:
        with pytest.raises(grpc.RpcError) as late:
            running.unary("/t.T/Slow")(b"x", timeout=0.2)
        assert late.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        running.run(asyncio.sleep(0.2))
    assert outcome == ["cancelled"]


def test_stop_lets_a_call_in_progress_finish_and_refuses_new_ones() -> None:
    async def slow(message: bytes) -> bytes:
        await asyncio.sleep(0.3)
        return b"done"

    running = Serving(Methods({"/t.T/Slow": slow}, {}))
    try:
        pending = running.unary("/t.T/Slow").future(b"x", timeout=5)
        running.run(asyncio.sleep(0.1))
        running.run(running.server.stop(2.0))
        assert pending.result() == b"done"
        with pytest.raises(grpc.RpcError) as refused:
            running.unary("/t.T/Slow")(b"x", timeout=2)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        running.channel.close()
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(5)


# --- raw frames ----------------------------------------------------------------------------------


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return http2.frame(kind, flags, stream, payload)


REQUEST = [(":method", "POST"), (":scheme", "http"), (":path", "/t.T/Size"), (":authority", "x"),
           ("content-type", "application/grpc"), ("te", "trailers")]


class Raw:
    """A hand-driven client connection: frames out as written, frames in as parsed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.encoder = hpack.Encoder()

    def send(self, *frames: bytes) -> None:
        self.writer.write(b"".join(frames))

    async def next(self, timeout: float = 5) -> tuple[int, int, int, bytes]:
        head = await asyncio.wait_for(self.reader.readexactly(9), timeout)
        length = int.from_bytes(head[:3], "big")
        payload = await self.reader.readexactly(length)
        return head[3], head[4], struct.unpack(">I", head[5:9])[0] & 0x7FFFFFFF, payload

    async def until(self, kind: int, timeout: float = 5) -> tuple[int, int, int, bytes]:
        while True:
            found = await self.next(timeout)
            if found[0] == kind:
                return found

    async def closed(self) -> bool:
        try:
            while await asyncio.wait_for(self.reader.read(65536), 5):
                pass
        except ConnectionError:
            pass
        return True


async def size(message: bytes) -> bytes:
    return str(len(message)).encode()


def raw_scenario(scenario: Callable[[Raw], Coroutine[Any, Any, None]], preface: bool = True,
                 methods: Methods | None = None) -> None:
    async def main() -> None:
        server = LeanGrpcServer(methods or Methods({"/t.T/Size": size}, {}), "127.0.0.1:0")
        await server.start()
        try:
            raw = Raw(*await asyncio.open_connection("127.0.0.1", server.port))
            if preface:
                raw.send(http2.PREFACE, frame(http2.SETTINGS, 0, 0))
            await scenario(raw)
            raw.writer.close()
        finally:
            await server.stop(0.5)

    asyncio.run(main())


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


def test_not_http2_is_refused_with_goaway_and_the_connection_closed() -> None:
    async def scenario(raw: Raw) -> None:
        raw.send(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
        _, _, _, payload = await raw.until(http2.GOAWAY)
        assert int.from_bytes(payload[4:8], "big") == http2.PROTOCOL_ERROR
        assert await raw.closed()

    raw_scenario(scenario, preface=False)


def test_settings_and_pings_are_acknowledged() -> None:
    async def scenario(raw: Raw) -> None:
        _, flags, _, payload = await raw.until(http2.SETTINGS)
        assert not flags & http2.ACK and payload  # the server's own settings come first
        assert (await raw.until(http2.SETTINGS))[1] & http2.ACK
        raw.send(frame(http2.PING, 0, 0, b"12345678"))
        _, flags, _, payload = await raw.until(http2.PING)
        assert flags & http2.ACK and payload == b"12345678"

    raw_scenario(scenario)


def test_a_header_block_in_pieces_and_a_padded_body_are_read_whole() -> None:
    async def scenario(raw: Raw) -> None:
        block = raw.encoder.encode(REQUEST)
        body = grpc_message(b"hello")
        raw.send(frame(http2.HEADERS, 0, 1, block[:5]), frame(http2.CONTINUATION, 0, 1, block[5:9]),
                 frame(http2.CONTINUATION, http2.END_HEADERS, 1, block[9:]),
                 frame(http2.DATA, http2.PADDED | http2.END_STREAM, 1, bytes([3]) + body + b"\x00\x00\x00"))
        _, _, stream, payload = await raw.until(http2.DATA)
        assert stream == 1 and payload == grpc_message(b"5")
        _, flags, _, trailers = await raw.until(http2.HEADERS)
        assert flags & http2.END_STREAM and (b"grpc-status", b"0") in hpack.Decoder().decode(trailers, raw=True)

    raw_scenario(scenario)


def test_data_is_sent_only_as_far_as_the_peers_window_allows() -> None:
    async def scenario(raw: Raw) -> None:
        raw.send(frame(http2.SETTINGS, 0, 0, struct.pack(">HI", http2.SETTINGS_INITIAL_WINDOW_SIZE, 4)))
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 1, raw.encoder.encode(REQUEST)),
                 frame(http2.DATA, http2.END_STREAM, 1, grpc_message(b"x" * 1000)))
        _, _, _, first = await raw.until(http2.DATA)
        assert first == grpc_message(b"1000")[:4]  # 9 bytes to send, 4 allowed
        with pytest.raises(TimeoutError):
            await raw.until(http2.DATA, timeout=0.3)
        raw.send(frame(http2.WINDOW_UPDATE, 0, 1, struct.pack(">I", 100)))
        _, _, _, rest = await raw.until(http2.DATA)
        assert first + rest == grpc_message(b"1000")
        _, flags, _, _ = await raw.until(http2.HEADERS)
        assert flags & http2.END_STREAM

    raw_scenario(scenario)


@pytest.mark.parametrize("case", ["oversized frame", "beyond the stream window", "DATA on an idle stream",
                                  "CONTINUATION without HEADERS", "HEADERS on an even stream"])
def test_a_peer_breaking_the_protocol_gets_goaway_with_its_error(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "STREAM_WINDOW", 1000)
    expected = {"oversized frame": http2.FRAME_SIZE_ERROR, "beyond the stream window": http2.FLOW_CONTROL_ERROR}

    async def scenario(raw: Raw) -> None:
        block = raw.encoder.encode(REQUEST)
        raw.send({
            "oversized frame": frame(http2.DATA, 0, 1, b"x" * 10)[:3].replace(b"\x00\x00\x0a", b"\x7f\xff\xff")
            + frame(http2.DATA, 0, 1, b"x" * 10)[3:],
            "beyond the stream window": frame(http2.HEADERS, http2.END_HEADERS, 1, block)
            + frame(http2.DATA, 0, 1, b"x" * 1001),
            "DATA on an idle stream": frame(http2.DATA, 0, 7, b"x"),
            "CONTINUATION without HEADERS": frame(http2.CONTINUATION, http2.END_HEADERS, 1, block),
            "HEADERS on an even stream": frame(http2.HEADERS, http2.END_HEADERS, 2, block),
        }[case])
        _, _, _, payload = await raw.until(http2.GOAWAY)
        assert int.from_bytes(payload[4:8], "big") == expected.get(case, http2.PROTOCOL_ERROR)
        assert await raw.closed()

    raw_scenario(scenario)


def test_a_truncated_message_and_a_compressed_one_end_their_call_not_the_connection() -> None:
    async def scenario(raw: Raw) -> None:
        block = raw.encoder.encode(REQUEST)
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 1, block),
                 frame(http2.DATA, http2.END_STREAM, 1, grpc_message(b"abc")[:-1]),
                 frame(http2.HEADERS, http2.END_HEADERS, 3, raw.encoder.encode(REQUEST)),
                 frame(http2.DATA, http2.END_STREAM, 3, b"\x01" + grpc_message(b"abc")[1:]))
        statuses = {}
        while len(statuses) < 2:
            _, flags, stream, block_in = await raw.until(http2.HEADERS)
            fields = dict(hpack.Decoder().decode(block_in, raw=True)) if flags & http2.END_STREAM else {}
            if b"grpc-status" in fields:
                statuses[stream] = int(fields[b"grpc-status"])
        assert statuses == {1: INTERNAL, 3: INTERNAL}  # a compressed flag without grpc-encoding (gRPC's spec)
        raw.send(frame(http2.PING, 0, 0, b"still-up"))
        assert (await raw.until(http2.PING))[3] == b"still-up"

    raw_scenario(scenario)


def test_remembered_header_blocks_decode_as_hpack_does_when_the_table_changes_under_them() -> None:
    """Envoy's repeated blocks are decoded once per table state: a change to the dynamic table (a new
    entry shifts every index, a size update empties it) must never let an earlier decoding answer."""
    encoder, reference, remembering = hpack.Encoder(), hpack.Decoder(), http2.HeaderDecoder()
    first = encoder.encode(REQUEST)  # literals, indexed: the table fills
    repeated = encoder.encode(REQUEST)  # indexes only: remembered
    adds = encoder.encode([(":path", "/t.T/Other")])  # a new entry: every index shifts by one
    decoded = []
    for block in (first, repeated, repeated, adds, repeated, repeated):
        decoded.append(reference.decode(block, raw=True))
        assert remembering.decode(block) == decoded[-1]
    assert decoded[4] != decoded[2]  # the same bytes name other fields once the table changed
    empty_table = b"\x20"  # a dynamic table size update to 0
    assert remembering.decode(empty_table) == reference.decode(empty_table, raw=True) == []
    with pytest.raises(hpack.HPACKError):
        reference.decode(repeated, raw=True)
    with pytest.raises(hpack.HPACKError):
        remembering.decode(repeated)


# --- gRPC where it is cheap: deadlines, compression, health watches --------------------------------


def trailer_fields(block: bytes) -> dict[bytes, bytes]:
    return dict(hpack.Decoder().decode(block, raw=True))


def test_grpc_timeout_ends_a_call_that_waits_with_deadline_exceeded() -> None:
    async def slow(message: bytes) -> bytes:
        await asyncio.sleep(5)
        return b"late"

    async def scenario(raw: Raw) -> None:
        started = asyncio.get_running_loop().time()
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 1,
                       raw.encoder.encode([*REQUEST[:2], (":path", "/t.T/Slow"), *REQUEST[3:],
                                           ("grpc-timeout", "200m")])),
                 frame(http2.DATA, http2.END_STREAM, 1, grpc_message(b"x")))
        _, flags, _, block = await raw.until(http2.HEADERS)
        waited = asyncio.get_running_loop().time() - started
        assert flags & http2.END_STREAM and trailer_fields(block)[b"grpc-status"] == b"4"  # DEADLINE_EXCEEDED
        assert 0.15 < waited < 2.0  # at the deadline the client set, not when the answer would have come

    raw_scenario(scenario, methods=Methods({"/t.T/Slow": slow}, {}))


def test_a_malformed_grpc_timeout_is_refused() -> None:
    async def scenario(raw: Raw) -> None:
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 1, raw.encoder.encode([*REQUEST, ("grpc-timeout", "1x")])),
                 frame(http2.DATA, http2.END_STREAM, 1, grpc_message(b"x")))
        _, _, _, block = await raw.until(http2.HEADERS)
        assert trailer_fields(block)[b"grpc-status"] == b"13"

    raw_scenario(scenario)


def test_compressed_requests_are_read() -> None:
    big = bytes(range(256)) * 4096  # 1 MiB, compressible
    with serving({"/t.T/Size": size}) as running:
        for compression in (grpc.Compression.Gzip, grpc.Compression.Deflate):
            answer = running.unary("/t.T/Size")(big, timeout=10, compression=compression)
            assert answer == str(len(big)).encode()


def test_an_unknown_encoding_and_a_compression_bomb_are_refused_naming_what_is_accepted() -> None:
    import zlib

    bomb = zlib.compress(bytes(64 << 20), 9)  # 64 MiB of zeros in ~64 KB

    async def scenario(raw: Raw) -> None:
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 1, raw.encoder.encode([*REQUEST, ("grpc-encoding", "br")])),
                 frame(http2.DATA, http2.END_STREAM, 1, grpc_message(b"x")))
        _, _, stream, block = await raw.until(http2.HEADERS)
        fields = trailer_fields(block)
        assert stream == 1 and fields[b"grpc-status"] == b"12"
        assert fields[b"grpc-accept-encoding"] == b"identity,deflate,gzip" and b"br" in fields[b"grpc-message"]
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 3,
                       raw.encoder.encode([*REQUEST, ("grpc-encoding", "deflate")])))
        message = b"\x01" + len(bomb).to_bytes(4, "big") + bomb
        window = http2.STREAM_WINDOW
        for offset in range(0, len(message), http2.FRAME_SIZE):
            raw.send(frame(http2.DATA, http2.END_STREAM if offset + http2.FRAME_SIZE >= len(message) else 0, 3,
                           message[offset:offset + http2.FRAME_SIZE]))
            window -= len(message[offset:offset + http2.FRAME_SIZE])
            assert window >= 0 or offset  # the rest is sent on the credit the server reserved for the message
        _, _, stream, block = await raw.until(http2.HEADERS)
        assert stream == 3 and trailer_fields(block)[b"grpc-status"] == b"8"  # RESOURCE_EXHAUSTED

    raw_scenario(scenario)


def test_health_watch_sends_the_status_then_every_change() -> None:
    health = HealthServicer()
    with serving(server_streams={"/grpc.health.v1.Health/Watch": health_watch(health)}) as running:
        running.run(health.set("", health_pb2.HealthCheckResponse.SERVING))
        watch = running.channel.unary_stream("/grpc.health.v1.Health/Watch")(
            health_pb2.HealthCheckRequest(service="").SerializeToString(), timeout=10)
        first = health_pb2.HealthCheckResponse.FromString(next(watch))
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        running.run(health.enter_graceful_shutdown())
        second = health_pb2.HealthCheckResponse.FromString(next(watch))
        assert second.status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()


# --- what a hostile peer can make the connection hold or do ----------------------------------------


class Held:
    """A stream whose answers wait until released: what the server holds meanwhile is observable."""

    def __init__(self) -> None:
        self.release = asyncio.Event()

    @property
    def done(self) -> bool:
        return False

    async def answer(self, message: bytes) -> bytes:
        await self.release.wait()
        return b"ok"

    def ended(self) -> None:
        pass


def data_frames(stream: int, body: bytes) -> list[bytes]:
    return [frame(http2.DATA, 0, stream, body[i:i + http2.FRAME_SIZE]) for i in range(0, len(body), http2.FRAME_SIZE)]


def test_window_credit_comes_back_as_messages_are_answered_not_as_they_arrive() -> None:
    held = Held()
    request = [*REQUEST[:2], (":path", "/t.T/Held"), *REQUEST[3:]]

    async def scenario(raw: Raw) -> None:
        body = grpc_message(b"x" * 60_000)
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 1, raw.encoder.encode(request)), *data_frames(1, body))
        with pytest.raises(TimeoutError):  # the message is held: no credit for the stream
            while True:
                kind, _, stream, _ = await raw.next(timeout=0.5)
                assert not (kind == http2.WINDOW_UPDATE and stream == 1)
        raw.send(frame(http2.DATA, 0, 1, b"x" * 6000))  # beyond the stream's window: the peer broke it
        _, _, _, payload = await raw.until(http2.GOAWAY)
        assert int.from_bytes(payload[4:8], "big") == http2.FLOW_CONTROL_ERROR

    async def answered(raw: Raw) -> None:
        body = grpc_message(b"x" * 60_000)
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 1, raw.encoder.encode(request)), *data_frames(1, body))
        await asyncio.sleep(0.2)
        held.release.set()
        while True:  # once answered, the message's credit comes back to the stream
            kind, _, stream, payload = await raw.next()
            if kind == http2.WINDOW_UPDATE and stream == 1:
                assert int.from_bytes(payload, "big") >= len(body)
                return

    raw_scenario(scenario, methods=Methods({}, {"/t.T/Held": lambda: held}))
    held = Held()
    raw_scenario(answered, methods=Methods({}, {"/t.T/Held": lambda: held}))


def test_large_messages_beyond_the_budget_are_refused_not_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "BUDGET", http2.Budget(reservable=1 << 20))

    async def scenario(raw: Raw) -> None:
        for stream in (1, 3):  # each declares 900 KB: the first gets its credit, the second is refused
            raw.send(frame(http2.HEADERS, http2.END_HEADERS, stream, raw.encoder.encode(REQUEST)),
                     frame(http2.DATA, 0, stream, b"\x00" + (900_000).to_bytes(4, "big") + b"x" * 1000))
        granted = refused = None
        while granted is None or refused is None:
            kind, _, stream, payload = await raw.next()
            if kind == http2.WINDOW_UPDATE and stream == 1:
                granted = int.from_bytes(payload, "big")
            if kind == http2.HEADERS and stream == 3:
                refused = trailer_fields(payload)[b"grpc-status"]
        assert granted >= 900_005 - http2.STREAM_WINDOW and refused == b"8"

    raw_scenario(scenario)
    assert http2.BUDGET.reserved == 0  # all given back when the connection ended


def test_streams_past_the_limit_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario(raw: Raw) -> None:
        for stream in range(1, 2 * http2.MAX_STREAMS + 3, 2):
            raw.send(frame(http2.HEADERS, http2.END_HEADERS, stream, raw.encoder.encode(REQUEST)))
        _, _, stream, payload = await raw.until(http2.RST_STREAM)
        assert stream == 2 * http2.MAX_STREAMS + 1 and int.from_bytes(payload, "big") == http2.REFUSED_STREAM

    raw_scenario(scenario)


def flood_ends_calmly(frames: Callable[[Raw], list[bytes]]) -> None:
    async def scenario(raw: Raw) -> None:
        raw.send(*frames(raw))
        _, _, _, payload = await raw.until(http2.GOAWAY)
        assert int.from_bytes(payload[4:8], "big") == http2.ENHANCE_YOUR_CALM
        assert await raw.closed()

    raw_scenario(scenario)


def test_rapid_reset_ends_the_connection_and_costs_no_answer() -> None:
    answered: list[bytes] = []

    async def counted(message: bytes) -> bytes:
        answered.append(message)
        return b""

    async def scenario(raw: Raw) -> None:
        block = raw.encoder.encode(REQUEST)
        raw.send(*[frame(http2.HEADERS, http2.END_HEADERS, stream, block)
                   + frame(http2.DATA, http2.END_STREAM, stream, grpc_message(b"x"))
                   + frame(http2.RST_STREAM, 0, stream, struct.pack(">I", http2.CANCEL))
                   for stream in range(1, 1000, 2)])
        _, _, _, payload = await raw.until(http2.GOAWAY)
        assert int.from_bytes(payload[4:8], "big") == http2.ENHANCE_YOUR_CALM

    raw_scenario(scenario, methods=Methods({"/t.T/Size": counted}, {}))
    assert answered == []  # every stream was reset in the batch that opened it


@pytest.mark.parametrize("flood", ["SETTINGS", "PING", "empty DATA", "CONTINUATION", "WINDOW_UPDATE", "PRIORITY"])
def test_floods_of_frames_that_ask_for_nothing_end_the_connection(flood: str) -> None:
    def frames(raw: Raw) -> list[bytes]:
        headers = frame(http2.HEADERS, http2.END_HEADERS, 1, raw.encoder.encode(REQUEST))
        return {
            "SETTINGS": [frame(http2.SETTINGS, 0, 0)] * 1000,
            "PING": [frame(http2.PING, 0, 0, b"12345678")] * 1000,
            "empty DATA": [headers, *[frame(http2.DATA, 0, 1)] * 1000],
            "CONTINUATION": [frame(http2.HEADERS, 0, 1, raw.encoder.encode(REQUEST)),
                             *[frame(http2.CONTINUATION, 0, 1, b"\x00")] * 1000],
            "WINDOW_UPDATE": [frame(http2.WINDOW_UPDATE, 0, 0, struct.pack(">I", 1))] * 1000,
            "PRIORITY": [frame(http2.PRIORITY, 0, 1, b"\x00\x00\x00\x00\x10")] * 1000,
        }[flood]

    flood_ends_calmly(frames)


def test_timeouts_close_a_silent_connection_and_an_idle_one_gracefully(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "TICK_SECONDS", 0.05)
    monkeypatch.setattr(http2, "PREFACE_SECONDS", 0.2)
    monkeypatch.setattr(http2, "IDLE_SECONDS", 0.3)

    async def silent(raw: Raw) -> None:
        assert await raw.closed()

    async def idle(raw: Raw) -> None:
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 1, raw.encoder.encode(REQUEST)),
                 frame(http2.DATA, http2.END_STREAM, 1, grpc_message(b"x")))
        await raw.until(http2.DATA)
        _, _, _, first = await raw.until(http2.GOAWAY)  # first: "no new streams soon", naming the last possible
        assert int.from_bytes(first[:4], "big") == http2.LAST_STREAM
        _, _, _, ping = await raw.until(http2.PING)
        raw.send(frame(http2.PING, http2.ACK, 0, ping))
        _, _, _, final = await raw.until(http2.GOAWAY)  # then the last stream it served, and the connection closes
        assert int.from_bytes(final[:4], "big") == 1 and int.from_bytes(final[4:8], "big") == http2.NO_ERROR
        assert await raw.closed()

    raw_scenario(silent, preface=False)
    raw_scenario(idle)


def test_at_the_cap_idle_connections_make_room_for_one_that_asks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Connections that hold the cap without asking anything cannot lock a client out: the newest is
    admitted and the least recently active is closed, so the client's calls are served throughout."""
    from extauthz.server import grpc_lean

    monkeypatch.setattr(grpc_lean, "MAX_CONNECTIONS", 3)
    with serving({"/t.T/Size": size}) as running:
        assert running.unary("/t.T/Size")(b"abc", timeout=5) == b"3"
        hoarders = [socket.create_connection(("127.0.0.1", running.server.port)) for _ in range(6)]
        try:
            for sock in hoarders:
                sock.sendall(http2.PREFACE + frame(http2.SETTINGS, 0, 0))
            assert running.unary("/t.T/Size")(b"abcd", timeout=5) == b"4"
            assert len(running.server.connections) <= 3
            closed = 0
            for sock in hoarders:
                sock.settimeout(5)
                try:
                    while sock.recv(65536):
                        pass
                    closed += 1
                except (TimeoutError, ConnectionError):
                    closed += 1
            assert closed == len(hoarders)  # each was evicted in turn (the read ended, or it was reset)
        finally:
            for sock in hoarders:
                sock.close()


# --- flow control as a real client drives it: windows tracked, frames interleaved -------------------


class Windowed(Raw):
    """A client that sends only within the windows the server grants, frames of streams in turn."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(reader, writer)
        self.connection = http2.DEFAULT_WINDOW
        self.streams: dict[int, int] = {}
        self.answers: dict[int, bytes] = {}

    def _take(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == http2.WINDOW_UPDATE:
            increment = int.from_bytes(payload, "big")
            if stream:
                self.streams[stream] = self.streams.get(stream, http2.DEFAULT_WINDOW) + increment
            else:
                self.connection += increment
        elif kind == http2.HEADERS and flags & http2.END_STREAM:
            self.answers[stream] = trailer_fields(payload).get(b"grpc-status", b"?")
        elif kind == http2.GOAWAY:
            raise AssertionError(f"GOAWAY {int.from_bytes(payload[4:8], 'big')}")

    async def pump(self, timeout: float) -> bool:
        """Read what the server sent within ``timeout``; False when nothing came."""
        try:
            self._take(*await self.next(timeout))
        except TimeoutError:
            return False
        while True:
            try:
                self._take(*await self.next(0.01))
            except TimeoutError:
                return True

    async def send_round_robin(self, bodies: dict[int, bytes], padding: int = 0) -> None:
        """Each stream's body, one frame per stream in turn, never beyond a window; fails if it stalls."""
        sent = dict.fromkeys(bodies, 0)
        for stream in bodies:
            self.streams.setdefault(stream, http2.DEFAULT_WINDOW)
        while any(sent[s] < len(b) for s, b in bodies.items()):
            moved = False
            for stream, body in bodies.items():
                room = min(self.connection, self.streams[stream]) - (padding + 1 if padding else 0)
                size = min(len(body) - sent[stream], http2.FRAME_SIZE - (padding + 1 if padding else 0), room)
                if size <= 0 and sent[stream] < len(body):
                    continue
                if sent[stream] >= len(body):
                    continue
                chunk = body[sent[stream]:sent[stream] + size]
                end = sent[stream] + size == len(body)
                flags = (http2.END_STREAM if end else 0) | (http2.PADDED if padding else 0)
                payload = bytes([padding]) + chunk + bytes(padding) if padding else chunk
                self.send(frame(http2.DATA, flags, stream, payload))
                self.connection -= len(payload)
                self.streams[stream] -= len(payload)
                sent[stream] += size
                moved = True
            await self.writer.drain()
            if not moved and not await self.pump(2.0):
                raise AssertionError(f"stalled: connection window {self.connection}, streams {self.streams}, "
                                     f"left {[len(b) - sent[s] for s, b in bodies.items()]}")
            await self.pump(0)


def test_many_mid_size_messages_interleaved_all_arrive() -> None:
    """Ten 60 KB Checks sent a frame each in turn (as nghttp2 schedules them): every window the server
    grants covers every message in progress together, so none waits on the others for ever."""
    async def scenario(raw: Raw) -> None:
        client = Windowed(raw.reader, raw.writer)
        bodies = {stream: grpc_message(b"x" * 60_000) for stream in range(1, 21, 2)}
        for stream in bodies:
            client.send(frame(http2.HEADERS, http2.END_HEADERS, stream, client.encoder.encode(REQUEST)))
        await client.send_round_robin(bodies)
        while len(client.answers) < len(bodies):
            assert await client.pump(5.0), f"answers {client.answers}"
        assert set(client.answers.values()) == {b"0"}

    raw_scenario(scenario)
    assert http2.BUDGET.reserved == 0


def test_a_padded_large_message_arrives() -> None:
    async def scenario(raw: Raw) -> None:
        client = Windowed(raw.reader, raw.writer)
        client.send(frame(http2.HEADERS, http2.END_HEADERS, 1, client.encoder.encode(REQUEST)))
        await client.send_round_robin({1: grpc_message(b"y" * 200_000)}, padding=255)
        while 1 not in client.answers:
            assert await client.pump(5.0)
        assert client.answers[1] == b"0"

    raw_scenario(scenario)
    assert http2.BUDGET.reserved == 0


def test_a_request_that_never_ends_is_reset_and_does_not_count_as_activity(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stream opened and left unfinished neither holds its place for ever nor outranks a client whose
    requests are answered when the cap needs room."""
    from extauthz.server import grpc_lean

    monkeypatch.setattr(http2, "TICK_SECONDS", 0.05)
    monkeypatch.setattr(http2, "READ_SECONDS", 0.3)
    monkeypatch.setattr(grpc_lean, "MAX_CONNECTIONS", 3)

    async def scenario(raw: Raw) -> None:
        raw.send(frame(http2.HEADERS, http2.END_HEADERS, 1, raw.encoder.encode(REQUEST)))
        _, _, stream, payload = await raw.until(http2.RST_STREAM, timeout=3)
        assert stream == 1 and int.from_bytes(payload, "big") == http2.CANCEL

    raw_scenario(scenario)
    with serving({"/t.T/Size": size}) as running:
        assert running.unary("/t.T/Size")(b"abc", timeout=5) == b"3"
        hoarders = [socket.create_connection(("127.0.0.1", running.server.port)) for _ in range(3)]
        try:
            encoder = hpack.Encoder()
            for n, sock in enumerate(hoarders):  # each holds a request that never ends: "busy", but not active
                sock.sendall(http2.PREFACE + frame(http2.SETTINGS, 0, 0)
                             + frame(http2.HEADERS, http2.END_HEADERS, 1, encoder.encode(REQUEST) if n == 0
                                     else hpack.Encoder().encode(REQUEST)))
            before = set(running.server.connections)
            assert running.unary("/t.T/Size")(b"abcd", timeout=5) == b"4"
            assert before & set(running.server.connections)  # the client's connection was kept, hoarders went
        finally:
            for sock in hoarders:
                sock.close()


def test_checks_cancelled_while_they_work_do_not_end_the_connection() -> None:
    """Envoy resets Checks it stops waiting for (its timeout, a client gone): those are not rapid resets."""
    async def slow(message: bytes) -> bytes:
        await asyncio.sleep(0.5)
        return b"late"

    with serving({"/t.T/Slow": slow, "/t.T/Size": size}) as running:
        assert running.unary("/t.T/Size")(b"a", timeout=5) == b"1"
        (connection,) = running.server.connections
        calls = [running.unary("/t.T/Slow").future(b"x", timeout=30) for _ in range(http2.PREMATURE_RESETS + 20)]
        running.run(asyncio.sleep(0.1))  # every Check is being worked on
        for call in calls:
            call.cancel()  # RST_STREAM CANCEL, before any answer and long before the deadline
        running.run(asyncio.sleep(0.2))
        assert running.unary("/t.T/Size")(b"ab", timeout=5) == b"2"
        assert running.server.connections == {connection}


def test_checks_answered_at_once_in_one_read_go_out_in_one_write() -> None:
    class Counting:
        def __init__(self) -> None:
            self.writes = 0

        def write(self, data: bytes) -> None:
            self.writes += 1

        def is_closing(self) -> bool:
            return False

        def pause_reading(self) -> None:
            pass

        def resume_reading(self) -> None:
            pass

        def get_extra_info(self, name: str, default: Any = None) -> Any:
            return default

    async def main() -> None:
        server = LeanGrpcServer(Methods({"/t.T/Size": size}, {}), "127.0.0.1:0")
        connection = server.connection()
        transport = Counting()
        connection.connection_made(transport)  # type: ignore[arg-type]
        encoder = hpack.Encoder()
        batch = http2.PREFACE + frame(http2.SETTINGS, 0, 0) + b"".join(
            frame(http2.HEADERS, http2.END_HEADERS, stream, encoder.encode(REQUEST))
            + frame(http2.DATA, http2.END_STREAM, stream, grpc_message(b"x")) for stream in range(1, 16, 2))
        transport.writes = 0
        connection.data_received(batch)  # 8 Checks, answered at once
        assert transport.writes == 1
        connection.connection_lost(None)

    asyncio.run(main())
