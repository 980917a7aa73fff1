"""The HTTP ext_authz transport in-process: raw HTTP/1.1 bytes in, the same decisions out.

Envoy is not needed to test the adapter's own contract: what it accepts as a
check request (strictly: anything odd is a 400 and a closed connection, never
an allow), how a decision is written (the same denial as the gRPC transport,
the upstream mutations and the hand-off as headers), and how a connection
behaves (keep-alive, pipelining, shutdown). A real server on a loopback port
decides with a real authorizer and a real signing key; tests/e2e run it behind
the real Envoy.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extauthz.cli import Exit
from extauthz.core.authorizer import Authorizer
from extauthz.core.decision import Code, Decision, Mutations
from extauthz.core.handoff import Handoff
from extauthz.core.request import HttpRequest
from extauthz.demo.idp import SigningKey
from extauthz.demo.processes import ENVOY_DIR, SidecarProcess, free_port
from extauthz.eager import in_task
from extauthz.identity.verifier import TokenCache, Verifier
from extauthz.observability.metrics import REGISTRY
from extauthz.policy.loader import parse_policy
from extauthz.server import authorization as grpc_adapter
from extauthz.server import http_authorization
from extauthz.server.handoff_header import HANDOFF_HEADER, RECORD_HEADER, decode_handoff, encode_handoff
from extauthz.server.headers import METADATA_NAMESPACE
from extauthz.server.http1 import MAX_HEAD_BYTES, MAX_HEADERS, HeadError, parse_head
from extauthz.server.http_authorization import (
    HttpAuthorizationServer,
    refuse_query_removal,
    to_request,
    to_response,
)
from extauthz.server.processing import to_handoff

KEY = SigningKey()
ISSUER = "https://idp.test"
os.environ["EXTAUTHZ_HTTP_TEST_KEY"] = "service-key"  # the upstream credential, read when the policy loads
POLICY = parse_policy(f"""
providers:
  - name: idp
    issuer: {ISSUER}
    audiences: [api]
    jwks: {json.dumps({"keys": [KEY.jwk]})}
    from: [{{header: authorization, prefix: "Bearer "}}, {{query: access_token}}]
proxies:
  - name: orders
    upstream:
      targetCredential: {{header: x-api-key, env: EXTAUTHZ_HTTP_TEST_KEY}}
      identityHeaders: {{x-auth-sub: "{{{{sub}}}}"}}
    rules: [{{effect: allow, path: {{path: {{pattern: "^/orders"}}}}}}]
    filters:
      - methods: [GET]
        path: {{pattern: "^/orders/mine"}}
        defaultFilterOperation: retain
        operations: [{{effect: destroy, jsonPath: {{pattern: "^secret$"}}}}]
  - name: admin
    rules: [{{effect: allow, token: [{{claim: {{pattern: "^role$"}}, value: {{pattern: "^admin$"}}}}]}}]
""")


def token(**claims: Any) -> str:
    return KEY.sign({"iss": ISSUER, "aud": "api", "exp": int(time.time()) + 60, **claims})


def head(target: str = "/orders", method: str = "GET", proxy: str | None = "orders", length: str = "",
         **headers: str) -> bytes:
    """A check request as Envoy 1.40 writes it (the shipped envoy-http.yaml's headers_to_add included)."""
    lines = [f"{method} {target} HTTP/1.1", "host: api.example", "content-length: 0"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    lines.append(f"x-extauthz-check: proxy={proxy or ''};scheme=http;length={length}")
    lines += ["x-envoy-internal: true", "x-envoy-expected-rq-timeout-ms: 1000"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Answer:
    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status, self.header_list, self.body = status, headers, body
        self.headers = dict(headers)

    def json(self) -> Any:
        return json.loads(self.body)


async def read_answer(reader: asyncio.StreamReader, head_only: bool = False) -> Answer:
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw.decode().rstrip("\r\n").split("\r\n")
    assert status_line.startswith("HTTP/1.1 ")
    headers = [(n.lower(), v.strip()) for n, _, v in (line.partition(":") for line in lines)]
    length = int(dict(headers).get("content-length", "0"))
    body = b"" if head_only else await reader.readexactly(length)
    return Answer(int(status_line.split(" ")[1]), headers, body)


Scenario = Callable[[HttpAuthorizationServer, int], Awaitable[None]]


def serve(scenario: Scenario, authorizer: Callable[[Authorizer], Authorizer] | None = None) -> None:
    """Run ``scenario(server, port)`` against a live server deciding with the test policy."""

    async def main() -> None:
        async with httpx.AsyncClient() as client:
            real = Authorizer(POLICY, Verifier(POLICY.providers, client, TokenCache(10, 60)))
            chosen = authorizer(real) if authorizer else real
            server = HttpAuthorizationServer(lambda: chosen, "127.0.0.1:0")
            await server.start()
            try:
                await scenario(server, server.port)
            finally:
                await server.stop(1.0)

    asyncio.run(main())


async def exchange(port: int, *requests: bytes, head_only: bool = False) -> list[Answer]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        answers = []
        for request in requests:
            writer.write(request)
            answers.append(await read_answer(reader, head_only))
        return answers
    finally:
        writer.close()


# --- request heads: strict ----------------------------------------------------------------------


def test_a_check_request_as_envoy_writes_it_is_read() -> None:
    parsed = parse_head(head("/orders?page=2", authorization="Bearer t").removesuffix(b"\r\n\r\n"))
    assert (parsed.method, parsed.target, parsed.close) == ("GET", "/orders?page=2", False)
    assert parsed.headers["authorization"] == "Bearer t" and parsed.headers["host"] == "api.example"


@pytest.mark.parametrize("raw, why", [
    (b"GET /orders HTTP/1.0\r\nhost: a", "version"),
    (b"GET /orders HTTP/1.1 x\r\nhost: a", "request line"),
    (b"GET  /orders HTTP/1.1\r\nhost: a", "request line"),
    (b"G@T /orders HTTP/1.1\r\nhost: a", "method"),
    (b"GET http://evil/orders HTTP/1.1\r\nhost: a", "not a path"),
    (b"GET /orders HTTP/1.1\r\nhost : a", "header line"),
    (b"GET /orders HTTP/1.1\r\nhost: a\r\n folded: b", "header line"),
    (b"GET /orders HTTP/1.1\r\nno-colon", "header line"),
    (b"GET /orders HTTP/1.1\r\nhost: a\r\nHost: b", "repeated"),
    (b"GET /orders HTTP/1.1\r\nx-a: 1\nx-b: 2", "control"),
    (b"GET /orders HTTP/1.1\r\nx-a: 1\rx-b: 2", "control"),
    (b"GET /orders HTTP/1.1\r\nx-a: a\x00b", "control"),
    (b"GET /orders HTTP/1.1\r\nx-a: a\x1bb", "control"),
    (b"GET /orders HTTP/1.1\r\ncontent-length: 5", "body"),
    (b"GET /orders HTTP/1.1\r\ncontent-length: 00", "body"),
    (b"GET /orders HTTP/1.1\r\ntransfer-encoding: chunked", "transfer-encoding"),
    (b"GET /orders HTTP/1.1\r\n" + b"\r\n".join(b"x-%d: 1" % i for i in range(MAX_HEADERS + 1)), "headers"),
    (b"GET /orders HTTP/1.1\r\nx-big: " + b"a" * MAX_HEAD_BYTES, "bytes"),
])
def test_anything_envoy_does_not_send_is_refused(raw: bytes, why: str) -> None:
    with pytest.raises(HeadError, match=why):
        parse_head(raw)


def test_undecodable_bytes_read_as_envoy_sanitises_them_for_grpc() -> None:
    parsed = parse_head(b"GET /orders HTTP/1.1\r\ncookie: a=\xe9; b=\xc3\xa9")
    assert parsed.headers["cookie"] == "a=!; b=\u00e9"


def test_the_check_request_reads_as_the_grpc_check_request_does() -> None:
    parsed = parse_head(head("/Orders/1?access_token=x&y=2", method="get", length="12", x_request_id="r-1",
                             cookie="a=b").removesuffix(b"\r\n\r\n"))
    request = to_request(parsed)
    assert (request.method, request.path, request.query_string) == ("GET", "/Orders/1", "access_token=x&y=2")
    assert (request.host, request.request_id, dict(request.context)) == ("api.example", "r-1", {"proxy": "orders"})
    # The headers Envoy's CheckRequest carries, not those of the HTTP hop between Envoy and the sidecar.
    assert request.headers == {
        ":authority": "api.example", ":method": "get", ":path": "/Orders/1?access_token=x&y=2",
        ":scheme": "http", "content-length": "12", "x-request-id": "r-1", "cookie": "a=b",
    }
    without_proxy = to_request(parse_head(head(proxy=None).removesuffix(b"\r\n\r\n")))
    assert dict(without_proxy.context) == {} and "content-length" not in without_proxy.headers


@pytest.mark.parametrize("value", [
    "orders", "proxy=orders", "proxy=a;b;scheme=http;length=", "proxy=a;scheme=http;length=x",
])
def test_a_check_context_not_as_envoy_writes_it_is_refused(value: str) -> None:
    """The route's proxy is never guessed from a value the shipped config would not write."""
    raw = b"GET /orders HTTP/1.1\r\nhost: api.example\r\nx-extauthz-check: " + value.encode()
    with pytest.raises(HeadError, match="x-extauthz-check"):
        to_request(parse_head(raw))


# --- answers: the same decisions as over gRPC --------------------------------------------------

HANDOFF = Handoff("d-1", "orders", "digest", ("GET",), ("/orders/mine",), "api", ({"sub": "u-1"},))
ALLOW = Decision(True, 200, Code.ALLOWED, "rule #0", "d-1", "orders",
                 mutations=Mutations(set_headers=(("x-auth-sub", "u-1"), ("x-extauthz-unfiltered", "1")),
                                     remove_headers=("authorization", "x_auth_sub")),
                 metadata=HANDOFF.to_metadata())


def parse_answer(raw: bytes) -> Answer:
    head_bytes, _, body = raw.partition(b"\r\n\r\n")
    status_line, *lines = head_bytes.decode().split("\r\n")
    return Answer(int(status_line.split(" ")[1]), [(n, v.strip()) for n, _, v in (x.partition(":") for x in lines)],
                  body)


def test_an_allow_is_a_200_with_the_upstream_mutations_and_the_handoff() -> None:
    answer = parse_answer(to_response(ALLOW))
    assert answer.status == 200 and answer.body == b"" and answer.headers["content-length"] == "0"
    assert answer.headers["x-auth-sub"] == "u-1" and answer.headers["x-extauthz-unfiltered"] == "1"
    assert answer.headers["x-envoy-auth-headers-to-remove"] == "authorization, x_auth_sub"
    assert answer.headers["x-extauthz-decision-id"] == "d-1"
    assert "connection" not in answer.headers
    assert Handoff.from_metadata(decode_handoff(answer.headers[HANDOFF_HEADER]) or {}) == HANDOFF


@pytest.mark.parametrize("decision", [
    Decision(False, 401, Code.INVALID_TOKEN, "token_expired", "d-2", "orders",
             www_authenticate='Bearer realm="extauthz", error="invalid_token"'),
    Decision(False, 403, Code.FORBIDDEN, "default deny", "d-3", "orders"),
    Decision(False, 405, Code.METHOD_NOT_ALLOWED, "TRACE", "d-4", "orders"),
    Decision(False, 400, Code.BAD_REQUEST, "two readings", "d-5"),
], ids=lambda d: str(d.status))
def test_a_denial_is_the_same_status_headers_and_body_as_over_grpc(decision: Decision) -> None:
    answer = parse_answer(to_response(decision))
    denied = grpc_adapter.to_response(decision).denied_response
    assert answer.status == denied.status.code
    assert answer.body == denied.body.encode()
    grpc_headers = {h.header.key: h.header.value for h in denied.headers}
    assert {k: v for k, v in answer.headers.items() if k not in ("content-length", RECORD_HEADER)} == grpc_headers
    # The Check record: a header here (Envoy copies it into metadata), dynamic metadata over gRPC; the same value.
    record = grpc_adapter.to_response(decision).dynamic_metadata.fields[RECORD_HEADER].string_value
    assert answer.headers[RECORD_HEADER] == record
    assert answer.headers["content-length"] == str(len(answer.body))


def test_a_denial_is_never_written_as_an_allow() -> None:
    odd = Decision(False, 200, Code.FORBIDDEN, "a denial with an allow's status", "d-6")
    assert parse_answer(to_response(odd)).status == 403


def test_an_answer_to_head_keeps_the_length_but_sends_no_body() -> None:
    denial = Decision(False, 401, Code.TOKEN_MISSING, "no token", "d-7", www_authenticate='Bearer realm="extauthz"')
    raw = to_response(denial, head_only=True)
    assert raw.endswith(b"\r\n\r\n")
    assert parse_answer(raw).headers["content-length"] == str(len(denial.body()))


@pytest.mark.parametrize("set_headers", [
    (("x-auth-sub", "u-1\r\nx-injected: 1"),),
    (("x-auth-sub", "u-1\nx"),),
    (("x-extauthz-handoff", "forged"),),
    (("x-extauthz-decision-id", "forged"),),
    (("content-length", "5"),),
    (("x auth", "1"),),
])
def test_an_upstream_header_that_cannot_be_written_as_is_is_refused(set_headers: tuple[tuple[str, str], ...]) -> None:
    with pytest.raises(ValueError, match="header"):  # the caller turns it into a denial
        to_response(Decision(True, 200, Code.ALLOWED, "", "d-8", mutations=Mutations(set_headers=set_headers)))


def test_an_allow_that_needs_a_query_parameter_removed_is_denied() -> None:
    allow = Decision(True, 200, Code.ALLOWED, "rule #0", "d-9", "orders",
                     mutations=Mutations(remove_query_params=("access_token",)))
    refused = refuse_query_removal(allow)
    assert (refused.allowed, refused.status, refused.code) == (False, 400, Code.QUERY_TOKEN_REFUSED)
    answer = parse_answer(to_response(refused))
    assert answer.status == 400 and answer.json()["error"] == Code.QUERY_TOKEN_REFUSED
    assert "header" in answer.json()["message"] and answer.json()["decisionId"] == "d-9"
    assert refuse_query_removal(ALLOW) is ALLOW


# --- the hand-off reaches the response phase in one form from either transport ---------------------


def processing_request(fields: dict[str, Any]) -> pb.ProcessingRequest:
    struct = struct_pb2.Struct()
    struct.update(fields)
    message = pb.ProcessingRequest()
    message.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(struct)
    return message


def test_the_response_phase_reads_the_handoff_from_the_http_transports_header() -> None:
    # As Envoy writes it: the header's value as a string, beside the filter's own duration.
    message = processing_request({HANDOFF_HEADER: encode_handoff(HANDOFF.to_metadata()), "ext_authz_duration": 1})
    assert to_handoff(message) == HANDOFF
    # The gRPC transport writes the same string into the Check's dynamic metadata.
    allow = Decision(True, 200, Code.ALLOWED, "rule #0", "d-1", "orders", metadata=HANDOFF.to_metadata())
    forwarded = pb.ProcessingRequest()
    forwarded.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(
        grpc_adapter.to_response(allow).dynamic_metadata)
    assert to_handoff(forwarded) == HANDOFF
    # The hand-off's fields as a Struct of their own are no hand-off: only the one string is read.
    assert to_handoff(processing_request(HANDOFF.to_metadata())) is None


@pytest.mark.parametrize("value", ["", "not base64!", encode_handoff({"v": "2"}), 7, "W10"])
def test_a_handoff_header_that_does_not_decode_is_no_handoff(value: object) -> None:
    assert to_handoff(processing_request({HANDOFF_HEADER: value, **HANDOFF.to_metadata()})) is None


# --- a live server --------------------------------------------------------------------------


def decisions(result: str, code: str) -> float:
    return REGISTRY.get_sample_value("extauthz_decisions_total",
                                     {"proxy": "orders", "result": result, "code": code, "rule": "0"}) or 0.0


def test_requests_on_one_connection_are_answered_in_order_and_counted() -> None:
    good, other = token(sub="u-1"), token(sub="u-2")

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        before = decisions("allow", "allowed")
        # Two on one write (pipelined), then one more on the same kept-alive connection.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head(authorization=f"Bearer {good}") + head("/nope", authorization=f"Bearer {other}"))
        first, second = await read_answer(reader), await read_answer(reader)
        writer.write(head("/orders/mine", authorization=f"Bearer {other}"))
        third = await read_answer(reader)
        writer.close()
        assert (first.status, first.headers["x-auth-sub"], first.headers["x-api-key"]) == (200, "u-1", "service-key")
        assert first.headers["x-envoy-auth-headers-to-remove"] == "authorization"
        assert (second.status, second.json()["error"]) == (403, "forbidden")
        assert third.status == 200 and "x-extauthz-unfiltered" not in third.headers
        assert decode_handoff(third.headers[HANDOFF_HEADER])["filterValues"] == [{  # type: ignore[index]
            "method": "GET", "host": "api.example", "path": "/orders/mine", "sub": "u-2"}]
        assert decisions("allow", "allowed") - before == 2

    serve(scenario)


def test_a_check_that_waits_keeps_its_place_and_the_ones_behind_it_theirs() -> None:
    """Checks are answered at once when they need not wait; one that waits (a relationship lookup, a key fetch)
    is answered when done, and the checks pipelined behind it after it, in order, even when they would not wait."""
    first_sub, second_sub = token(sub="u-slow"), token(sub="u-fast")

    class Waits(Authorizer):
        async def check(self, request: HttpRequest, explain: bool = False) -> Decision:
            if request.path == "/orders/slow":
                await asyncio.sleep(0.05)
                await asyncio.sleep(0)  # a second wait: the rest of the check is driven to its end
            return await super().check(request, explain)

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head("/orders/slow", authorization=f"Bearer {first_sub}")
                     + head("/orders", authorization=f"Bearer {second_sub}")
                     + head("/nope", authorization=f"Bearer {second_sub}"))
        answers = [await read_answer(reader) for _ in range(3)]
        writer.close()
        assert [(a.status, a.headers.get("x-auth-sub")) for a in answers] == [
            (200, "u-slow"), (200, "u-fast"), (403, None)]

    serve(scenario, lambda real: Waits(real.policy, real.verifier))


def test_the_route_metadata_proxy_decides_like_grpc_context_extensions() -> None:
    admin = token(sub="u-1", role="admin")

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        on_orders, on_admin, unknown = await exchange(
            port, head("/admin", authorization=f"Bearer {admin}"),
            head("/admin", proxy="admin", authorization=f"Bearer {admin}"),
            head("/orders", proxy="nope", authorization=f"Bearer {admin}"))
        assert on_orders.status == 403 and on_admin.status == 200
        assert (unknown.status, unknown.json()["error"]) == (403, "no_policy")  # never falls back

    serve(scenario)


def test_a_malformed_check_context_is_a_400_and_closes() -> None:
    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head(proxy="a;b", authorization=f"Bearer {token(sub='u-1', role='admin')}"))
        answer = await read_answer(reader)
        assert (answer.status, answer.json()["error"], answer.headers["connection"]) == (400, "bad_request", "close")
        assert await reader.read() == b""
        writer.close()

    serve(scenario)


def test_a_query_token_is_denied_not_forwarded() -> None:
    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        (answer,) = await exchange(port, head(f"/orders?access_token={token(sub='u-1')}&page=2"))
        assert (answer.status, answer.json()["error"]) == (400, Code.QUERY_TOKEN_REFUSED)

    serve(scenario)


def test_head_is_answered_without_a_body_and_the_connection_stays_usable() -> None:
    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head(method="HEAD") + head())
        first = await read_answer(reader, head_only=True)
        second = await read_answer(reader)
        writer.close()
        assert first.status == 401 and int(first.headers["content-length"]) > 0
        assert second.status == 401 and second.json()["error"] == "token_missing"  # not the first's body

    serve(scenario)


@pytest.mark.parametrize("garbage", [
    b"GET /orders HTTP/1.1\r\nhost: a\r\ncontent-length: 7\r\n\r\nGET /or",
    b"GET /orders HTTP/1.1\r\nhost: a\r\nhost: b\r\n\r\n",
    b"\r\n" + head(),
    b"GET /orders HTTP/1.1\r\nx: " + b"a" * (MAX_HEAD_BYTES + 10),
])
def test_a_malformed_request_is_a_400_then_the_connection_closes(garbage: bytes) -> None:
    """Nothing after a refused head is read: a smuggled request behind it is never answered, let alone allowed."""
    smuggled = head(authorization=f"Bearer {token(sub='u-1')}")

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        before = REGISTRY.get_sample_value("extauthz_decisions_total",
                                           {"proxy": "", "result": "deny", "code": "bad_request", "rule": "default"})
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(garbage + smuggled)
        answer = await read_answer(reader)
        rest = await reader.read()
        writer.close()
        assert (answer.status, answer.json()["error"], answer.headers["connection"]) == (400, "bad_request", "close")
        assert rest == b""
        after = REGISTRY.get_sample_value("extauthz_decisions_total",
                                          {"proxy": "", "result": "deny", "code": "bad_request", "rule": "default"})
        assert (after or 0) - (before or 0) == 1

    serve(scenario)


def test_a_head_arriving_in_pieces_is_read_once_whole() -> None:
    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for byte in head(authorization=f"Bearer {token(sub='u-1')}"):
            writer.write(bytes([byte]))
            await writer.drain()
        answer = await read_answer(reader)
        writer.close()
        assert answer.status == 200 and answer.headers["x-auth-sub"] == "u-1"

    serve(scenario)


def test_a_head_that_never_ends_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http_authorization, "HEAD_TIMEOUT_SECONDS", 0.2)

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head()[:40])
        answer = await read_answer(reader)
        assert (answer.status, answer.headers["connection"]) == (400, "close") and await reader.read() == b""
        writer.close()

    serve(scenario)


def test_an_error_in_the_decision_is_a_500_never_an_allow() -> None:
    class Broken(Authorizer):
        async def check(self, request: HttpRequest, explain: bool = False) -> Decision:
            raise RuntimeError("boom")

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        (answer,) = await exchange(port, head(authorization=f"Bearer {token(sub='u-1')}"))
        # Envoy reads any 5xx as an auth service error: status_on_error (503), fail closed.
        assert (answer.status, answer.json()["error"]) == (500, "internal_error")

    serve(scenario, lambda real: Broken(real.policy, real.verifier))


def test_a_connection_of_connection_close_is_closed_after_its_answer() -> None:
    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head(connection="close"))
        answer = await read_answer(reader)
        assert answer.headers["connection"] == "close" and await reader.read() == b""
        writer.close()

    serve(scenario)


def test_stop_closes_idle_connections_and_lets_a_check_in_flight_finish() -> None:
    release = asyncio.Event()

    class Slow(Authorizer):
        async def check(self, request: HttpRequest, explain: bool = False) -> Decision:
            await release.wait()
            return await super().check(request, explain)

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        idle_reader, idle_writer = await asyncio.open_connection("127.0.0.1", port)
        busy_reader, busy_writer = await asyncio.open_connection("127.0.0.1", port)
        busy_writer.write(head())
        while not any(c.busy for c in server.connections):
            await asyncio.sleep(0.01)
        stopping = asyncio.create_task(server.stop(5.0))
        assert await idle_reader.read() == b""  # closed at once: it had nothing in flight
        release.set()
        answer = await read_answer(busy_reader)
        assert answer.status == 401 and answer.headers["connection"] == "close"
        assert await busy_reader.read() == b""
        await stopping
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        idle_writer.close()
        busy_writer.close()

    serve(scenario, lambda real: Slow(real.policy, real.verifier))


# --- limits: what a peer that is not Envoy can make a connection cost ----------------------------

READ_SIZE = 256 * 1024
"""The most one read brings (asyncio's and uvloop's read buffers)."""
SLOW = 30.0
"""How long a test waits for what should take milliseconds before it fails rather than hangs."""


def echoed(request: HttpRequest, pad: int = 0) -> Decision:
    """An allow that names the request it answers (its x-request-id as the decision id), ``pad`` bytes larger."""
    return Decision(True, 200, Code.ALLOWED, "echo", request.request_id,
                    mutations=Mutations(set_headers=(("x-pad", "a" * pad),) if pad else ()))


def echoing(gate: Callable[[HttpRequest], Awaitable[None]] | None = None,
            pad: int = 0) -> Callable[[Authorizer], Authorizer]:
    """An authorizer answering :func:`echoed` at once, after ``gate`` when one is given."""

    class Echo(Authorizer):
        async def check(self, request: HttpRequest, explain: bool = False) -> Decision:
            if gate is not None:
                await gate(request)
            return echoed(request, pad)

    return lambda real: Echo(real.policy, real.verifier)


async def answers(reader: asyncio.StreamReader, count: int) -> list[str]:
    """The decision ids of the next ``count`` answers."""
    async def read() -> list[str]:
        return [(await read_answer(reader)).headers["x-extauthz-decision-id"] for _ in range(count)]
    return await asyncio.wait_for(read(), SLOW)


async def closed(reader: asyncio.StreamReader, within: float = SLOW) -> bool:
    """The server closed the connection (a FIN or a reset) without sending anything more."""
    try:
        return await asyncio.wait_for(reader.read(), within) == b""
    except ConnectionResetError:
        return True


async def fill(writer: asyncio.StreamWriter) -> int:
    """Pipeline 4 KB requests ``r-0``, ``r-1``... until the peer's send blocks: the server no longer reads.

    Returns how many were written (some may still wait in the writer's buffer).
    """
    sent = 0
    while True:
        writer.write(b"".join(head(x_request_id=f"r-{sent + i}", x_pad="a" * 4000) for i in range(64)))
        sent += 64
        try:
            await asyncio.wait_for(writer.drain(), 0.5)
        except TimeoutError:
            return sent
        assert sent < 16_000, "64 MB sent and the server still reads"


async def until(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + SLOW
    while not condition():
        assert time.monotonic() < deadline, "the server never got there"
        await asyncio.sleep(0.01)


def test_a_thousand_pipelined_checks_in_one_write_are_answered_in_order() -> None:
    """A check answered at once is followed by the next in a loop, not from inside its own answer: a few
    hundred pipelined in one read would overflow the stack and drop the connection, all of them unanswered."""
    count = 1000

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"".join(head(x_request_id=f"r-{i}") for i in range(count)))
        assert await answers(reader, count) == [f"r-{i}" for i in range(count)]
        writer.write(head(x_request_id="after"))  # the connection is still in service
        assert await answers(reader, 1) == ["after"]
        writer.close()

    serve(scenario, echoing())


def test_checks_pipelined_behind_one_that_waits_stop_the_reading_and_are_all_answered() -> None:
    """The peer's send blocks once the connection holds about one head's worth beyond one read; then every
    request it sent is answered, in order, none lost."""
    release = asyncio.Event()

    async def gate(request: HttpRequest) -> None:
        if request.request_id == "first":
            await release.wait()

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head(x_request_id="first"))
        sent = await fill(writer)
        (connection,) = server.connections
        assert not connection.reading
        assert MAX_HEAD_BYTES < connection.buffered <= MAX_HEAD_BYTES + READ_SIZE
        release.set()
        assert await answers(reader, sent + 1) == ["first", *(f"r-{i}" for i in range(sent))]
        writer.close()

    serve(scenario, echoing(gate))


def test_a_peer_that_does_not_read_its_answers_is_not_read_either() -> None:
    """Answers the peer leaves unread stop the answering, hence the reading: the connection holds a bounded
    number of bytes both ways, and once the peer reads, every answer arrives, in order."""
    pad = 4000

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sent = await fill(writer)
        (connection,) = server.connections
        assert not connection.reading
        # One head's worth and one read of requests; answers up to the transport's high-water mark and the last.
        assert connection.buffered <= MAX_HEAD_BYTES + READ_SIZE + 64 * 1024 + 2 * pad
        assert await answers(reader, sent) == [f"r-{i}" for i in range(sent)]
        writer.close()

    serve(scenario, echoing(pad=pad))


def test_a_peer_that_never_reads_its_answers_is_dropped_after_the_idle_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Its answers would wait in memory for ever, and it would hold one of the connections the cap allows."""
    idle = 1.5  # longer than fill() takes to see the peer's send blocked
    monkeypatch.setattr(http_authorization, "IDLE_TIMEOUT_SECONDS", idle)

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        await fill(writer)
        stalled = time.monotonic()
        await until(lambda: not server.connections)
        assert time.monotonic() - stalled < idle + 2.0
        writer.transport.abort()

    serve(scenario, echoing(pad=4000))


def test_a_check_pipelined_behind_one_that_waited_keeps_its_own_timeout() -> None:
    """Run inside the task of the check before it, which ends as soon as it is answered, a check's timeout
    (the relationship and key clients') would cancel that finished task and never fire."""

    async def gate(request: HttpRequest) -> None:
        await in_task()
        async with asyncio.timeout(0.05):
            await asyncio.sleep(0.01 if request.request_id == "first" else 3)

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        started = time.monotonic()
        writer.write(head(x_request_id="first") + head(x_request_id="second"))
        first, second = [await asyncio.wait_for(read_answer(reader), SLOW) for _ in range(2)]
        assert time.monotonic() - started < 2
        assert (first.status, second.status) == (200, 500) and second.json()["error"] == "internal_error"
        writer.close()

    serve(scenario, echoing(gate))


def test_a_connection_closed_with_answers_its_peer_never_reads_is_dropped(monkeypatch: pytest.MonkeyPatch) -> None:
    """Closing waits for what is written to be sent; a peer that never reads would keep the connection for ever."""
    idle, grace = 0.3, 0.5
    monkeypatch.setattr(http_authorization, "IDLE_TIMEOUT_SECONDS", idle)
    monkeypatch.setattr(http_authorization, "HEAD_TIMEOUT_SECONDS", grace)
    checked: list[str] = []

    async def gate(request: HttpRequest) -> None:
        checked.append(request.request_id)

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # answers soon wait in the server
        sock.connect(("127.0.0.1", port))
        _, writer = await asyncio.open_connection(sock=sock)
        await until(lambda: len(server.connections) == 1)
        (connection,) = server.connections
        sent: list[str] = []
        while not connection.buffered:  # one 32 KB answer at a time, until the server holds some unsent
            sent.append(f"r-{len(sent)}")
            writer.write(head(x_request_id=sent[-1]))
            await until(lambda: checked == sent)
            await asyncio.sleep(0.01)
            assert len(sent) < 1000, "the peer's kernel buffers never filled"
        assert connection.reading  # answers are waiting, but fewer than the transport pauses for
        quiet = time.monotonic()
        await until(lambda: not server.connections)
        assert idle + grace * 0.9 <= time.monotonic() - quiet < idle + grace + 2.0
        writer.transport.abort()

    serve(scenario, echoing(gate, pad=32_000))


def test_a_connection_with_many_pipelined_checks_does_not_starve_another() -> None:
    """Two connections with a pile each, ready at the same moment, take turns of a few checks each."""
    release = asyncio.Event()
    order: list[str] = []

    async def gate(request: HttpRequest) -> None:
        if request.request_id.endswith("gate"):
            await release.wait()
        order.append(request.request_id)

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        piles = {name: [f"{name}-{i}" for i in range(200)] for name in "ab"}
        streams = {name: await asyncio.open_connection("127.0.0.1", port) for name in piles}
        pending = 0
        for name, (_, writer) in streams.items():
            pile = b"".join(head(x_request_id=rid) for rid in piles[name])
            writer.write(head(x_request_id=f"{name}-gate") + pile)
            pending += len(pile)
        await until(lambda: sum(c.buffered for c in server.connections) == pending)
        release.set()
        for name, (reader, writer) in streams.items():
            assert await answers(reader, 201) == [f"{name}-gate", *piles[name]]
            writer.close()
        served = [rid[0] for rid in order if not rid.endswith("gate")]
        runs = [len(run.group()) for run in re.finditer(r"a+|b+", "".join(served))]
        assert max(runs) <= http_authorization.MAX_ANSWERS_PER_TURN, runs

    serve(scenario, echoing(gate))


def test_a_connection_without_a_request_for_the_idle_limit_is_closed(monkeypatch: pytest.MonkeyPatch) -> None:
    """Silent from the start or after its last answer: closed after the limit. A connection in use is
    never closed for it, nor one whose check takes longer than the limit."""
    idle = 0.4
    monkeypatch.setattr(http_authorization, "IDLE_TIMEOUT_SECONDS", idle)

    async def gate(request: HttpRequest) -> None:
        if request.request_id == "slow":
            await asyncio.sleep(2 * idle)

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        loop = asyncio.get_running_loop()

        async def closed_at(reader: asyncio.StreamReader) -> float:
            assert await closed(reader)
            return loop.time()

        opened = loop.time()
        silent_reader, silent_writer = await asyncio.open_connection("127.0.0.1", port)
        silent = asyncio.create_task(closed_at(silent_reader))
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        for i in range(10):  # in use for 2.5 times the limit
            writer.write(head(x_request_id=f"r-{i}"))
            assert await answers(reader, 1) == [f"r-{i}"]
            await asyncio.sleep(idle / 4)
        writer.write(head(x_request_id="slow"))
        assert await answers(reader, 1) == ["slow"]
        answered = loop.time()
        assert await closed(reader)
        assert loop.time() - answered >= idle * 0.9
        assert idle * 0.9 <= await silent - opened < idle + 1.0
        writer.close()
        silent_writer.close()

    serve(scenario, echoing(gate))


def test_a_head_trickling_in_is_refused_a_head_timeout_after_its_first_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """A byte every 20 ms would finish the head in seconds; it is refused when the head's time is up,
    however recently its last byte came."""
    limit = 0.5
    monkeypatch.setattr(http_authorization, "HEAD_TIMEOUT_SECONDS", limit)

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = head(authorization=f"Bearer {token(sub='u-1')}")
        assert len(request) * 0.02 > 4 * limit

        async def trickle() -> None:
            for byte in request:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.02)

        started = time.monotonic()
        trickling = asyncio.create_task(trickle())
        answer = await asyncio.wait_for(read_answer(reader), SLOW)
        took = time.monotonic() - started
        assert not trickling.done()  # still sending when refused
        trickling.cancel()
        assert (answer.status, answer.json()["error"], answer.headers["connection"]) == (400, "bad_request", "close")
        assert limit * 0.9 <= took < 3 * limit
        assert await closed(reader)
        writer.close()

    serve(scenario)


def test_at_the_cap_the_least_recently_active_connection_makes_room() -> None:
    """As many connections as Envoy's circuit breaker lets a cluster open are held; past that, a new one is
    still served and the one idle longest is closed, so whoever holds the cap can never lock Envoy out."""
    import resource

    cap = http_authorization.MAX_CONNECTIONS
    assert cap == 1024  # Envoy's default max_connections for a cluster
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * cap + 256  # both ends of each connection are in this process
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))

    async def scenario(server: HttpAuthorizationServer, port: int) -> None:
        streams = [await asyncio.open_connection("127.0.0.1", port) for _ in range(cap)]
        await until(lambda: len(server.connections) == cap)
        for i in range(1, cap):  # every connection but the first has a request answered, in this order
            reader, writer = streams[i]
            writer.write(head(x_request_id=f"open-{i}"))
            assert await answers(reader, 1) == [f"open-{i}"]
        extra = []
        for n in range(2):  # one after the other: a newcomer that has asked nothing yet is the next to go
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            extra.append((reader, writer))
            writer.write(head(x_request_id=f"extra-{n}"))
            assert await answers(reader, 1) == [f"extra-{n}"]  # a newcomer is served
        assert len(server.connections) == cap
        assert await closed(streams[0][0], within=2.0)  # idle since it opened: the first to go
        assert await closed(streams[1][0], within=2.0)  # then the one answered longest ago
        reader, writer = streams[cap - 1]
        writer.write(head(x_request_id="still"))
        assert await answers(reader, 1) == ["still"]
        for _, writer in streams + extra:
            writer.close()

    try:
        serve(scenario, echoing())
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


# --- the shipped Envoy config of this transport ----------------------------------------------


def test_the_http_config_is_the_grpc_config_but_for_the_ext_authz_transport() -> None:
    """envoy-http.yaml differs from envoy.yaml only where the transport needs it; everything else
    (listener, fail-closed settings, local replies, the ext_proc filter on gRPC) stays in step."""
    configs = {name: yaml.safe_load((ENVOY_DIR / name).read_text()) for name in ("envoy.yaml", "envoy-http.yaml")}
    authz, edge, routes = {}, {}, {}
    for name, config in configs.items():
        hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
        authz[name] = hcm["http_filters"][0]["typed_config"]
        hcm["http_filters"][0]["typed_config"] = None
        edge[name] = hcm.pop("early_header_mutation_extensions")
        route = hcm["route_config"]["virtual_hosts"][0]["routes"][0]
        routes[name] = {k: route.pop(k, None) for k in ("typed_per_filter_config", "metadata")}
        config["static_resources"]["clusters"] = [c for c in config["static_resources"]["clusters"]
                                                  if c["name"] != "extauthz_http"]
    assert configs["envoy-http.yaml"] == configs["envoy.yaml"]
    grpc, http = authz["envoy.yaml"], authz["envoy-http.yaml"]
    for setting in ("failure_mode_allow", "status_on_error", "transport_api_version", "include_peer_certificate"):
        assert http[setting] == grpc[setting]
    assert http["http_service"]["server_uri"]["timeout"] == grpc["grpc_service"]["timeout"]
    assert http["http_service"]["server_uri"]["cluster"] == "extauthz_http" and "grpc_service" not in http
    # The same proxy for the route, and the edge removal covers the gRPC config's and this transport's headers.
    assert routes["envoy-http.yaml"]["metadata"]["filter_metadata"]["extauthz"]["proxy"] == \
        routes["envoy.yaml"]["typed_per_filter_config"]["envoy.filters.http.ext_authz"]["check_settings"][
            "context_extensions"]["proxy"]
    assert edge["envoy.yaml"] == edge["envoy-http.yaml"]
    assert edge["envoy.yaml"][0]["typed_config"]["mutations"] == [
        {"remove_on_match": {"key_matcher": {"prefix": "x-extauthz-"}}}]
    # extauthz's own answer headers are refused as upstream mutations.
    refused = re.compile(http["decoder_header_mutation_rules"]["disallow_expression"]["regex"])
    for name in ("content-length", "x-extauthz-handoff", "x-extauthz-decision-id", "connection"):
        assert refused.fullmatch(name), name
    for name in ("x-extauthz-unfiltered", "authorization", "x-auth-sub", "cookie"):
        assert not refused.fullmatch(name), name


@pytest.mark.parametrize("address", ["0.0.0.0:9002", "10.0.0.7:9002", "[::]:9002"])
def test_the_listener_binds_loopback_only(address: str) -> None:
    """An allow answer carries the upstream credential; without TLS, only Envoy in the pod may ask."""
    with pytest.raises(ValueError, match="loopback only"):
        HttpAuthorizationServer(lambda: None, address)  # type: ignore[arg-type, return-value]
    HttpAuthorizationServer(lambda: None, "unix:/tmp/extauthz-http.sock")  # type: ignore[arg-type, return-value]


def serve_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    (tmp_path / "policy.yaml").write_text(
        "providers:\n  - {name: idp, issuer: https://idp.example, jwksUri: 'http://127.0.0.1:1/jwks',"
        " audiences: [api]}\nproxies:\n  - {name: api, rules: [{effect: allow}]}\n")
    return subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", str(tmp_path / "policy.yaml"),
                           "--grpc-address", "127.0.0.1:0", *args],
                          check=False, capture_output=True, text=True, timeout=30)


def test_serve_names_a_busy_or_exposed_http_address_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = serve_cli(tmp_path, "--http-address", f"127.0.0.1:{port}")
    assert done.returncode == Exit.ADDRESS and "Traceback" not in done.stderr
    assert f"cannot listen on 127.0.0.1:{port} (HTTP ext_authz" in done.stderr
    done = serve_cli(tmp_path, "--http-address", "0.0.0.0:9002")
    assert done.returncode == Exit.ADDRESS and "loopback only" in done.stderr and "Traceback" not in done.stderr


def test_sigterm_keeps_answering_through_the_drain_then_closes_the_port(tmp_path: Path) -> None:
    """As the gRPC listener: not ready at once, checks answered for server.drainSeconds, then gone."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(f"""
providers:
  - name: idp
    issuer: {ISSUER}
    audiences: [api]
    jwks: {json.dumps({"keys": [KEY.jwk]})}
proxies:
  - {{name: api, rules: [{{effect: allow}}]}}
server: {{drainSeconds: 3}}
""")
    http_port = free_port()
    log = tmp_path / "sidecar.log"
    sidecar = SidecarProcess(policy, free_port(), log_path=log, extra=["--http-address", f"127.0.0.1:{http_port}"])
    sidecar.start()
    try:
        assert sidecar.process is not None
        sidecar.process.send_signal(signal.SIGTERM)
        while '"draining"' not in log.read_text():
            assert sidecar.process.poll() is None
            time.sleep(0.05)
        with socket.create_connection(("127.0.0.1", http_port), timeout=5) as conn:
            conn.sendall(head(proxy=None, authorization=f"Bearer {token(sub='u-1')}"))
            assert conn.recv(65536).startswith(b"HTTP/1.1 200 OK\r\n")  # still answering, draining
        assert sidecar.process.wait(20) == 0
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", http_port), timeout=5)
    finally:
        sidecar.stop()
