"""Response filtering through a real Envoy on the shipped config (docs/response-filtering.md).

One stack serves most cases: the sample policy (seed 003's filter on GET
/v1/orders) with a 256 KiB body limit. Responses come from the sample upstream
(orders of three users) or, for chunked and odd responses, from a small case
server in this module that Envoy reaches through an extra route selected by a
request header. Envoy's own buffer is its default (1 MiB).

The stack runs on both ext_authz transports: the Check's hand-off reaches the
response phase as dynamic metadata either way (a Struct over gRPC, one header's
value over HTTP), so every journey must end the same, filtered bodies included.
"""

from __future__ import annotations

import copy
import gzip
import json
import threading
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import brotli
import pytest
import yaml

from extauthz.demo.processes import free_port
from extauthz.demo.upstream import ORDERS
from tests.e2e.stack import TRANSPORTS, Response, Stack, TransportStacks, running_stack, transport_stacks

pytestmark = pytest.mark.envoy

Headers = dict[str, str] | list[tuple[str, str]]
LIMIT = 256 * 1024
SECRET = b"SECRET-ORDER-OF-ANOTHER-USER"


def policy_text(limit: int) -> str:
    """The sample policy (seed 003's filter as shipped), with HEAD allowed and filtered too, and a body limit."""
    policy = yaml.safe_load((Path(__file__).resolve().parents[2] / "extauthz/examples/policy.yaml").read_text())
    policy["providers"][0].update(issuer="ISSUER", jwksUri="JWKS_URI")
    del policy["providers"][0]["discovery"]
    proxy = policy["proxies"][0]
    for rule in proxy["rules"]:
        if rule.get("methods") == ["GET"]:
            rule["methods"] = ["GET", "HEAD"]
    proxy["filters"][0]["methods"] = ["GET", "HEAD"]
    policy["server"] = {"maxBodyBytes": limit}
    return str(yaml.safe_dump(policy, sort_keys=False))


POLICY = policy_text(LIMIT)
USER_123_VIEW = {"orders": [
    {"orderId": "o-1", "userId": "user-123", "amount": 42, "status": "paid"},
    {"orderId": "o-3", "userId": "user-123", "amount": 13, "status": "open"},
]}


class CaseServer:
    """Serves ``cases[x-case]`` as (status, headers, body, chunked); chunked bodies go out in 64 KiB chunks."""

    def __init__(self) -> None:
        self.cases: dict[str, tuple[int, Headers, bytes, bool]] = {}
        cases = self.cases

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                status, headers, body, chunked = cases[self.headers.get("x-case", "")]
                self.send_response(status)
                for name, value in headers.items() if isinstance(headers, dict) else headers:
                    self.send_header(name, value)
                if chunked:
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for start in range(0, len(body), 65536):
                        chunk = body[start:start + 65536]
                        self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # Envoy resets the upstream when it blocks a response mid-body

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def add_route(config: dict[str, Any], header_value: str, cluster: str | None, port: int | None,
              per_route: dict[str, Any] | None = None) -> None:
    """A route for requests with ``x-upstream: <header_value>``, placed before the catch-all."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    route = copy.deepcopy(routes[-1])
    route["match"] = {"prefix": "/", "headers": [{"name": "x-upstream", "string_match": {"exact": header_value}}]}
    if cluster is not None:
        route["route"]["cluster"] = cluster
    route.setdefault("typed_per_filter_config", {}).update(per_route or {})
    routes.insert(0, route)
    if cluster is not None and port is not None:
        clusters = config["static_resources"]["clusters"]
        copied = copy.deepcopy(next(c for c in clusters if c["name"] == "app"))
        copied["name"] = copied["load_assignment"]["cluster_name"] = cluster
        copied["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
            "port_value"] = port
        clusters.append(copied)


def ext_proc_filter(config: dict[str, Any]) -> dict[str, Any]:
    """The ext_proc filter itself, inside the matcher that runs it only for filtered responses."""
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    wrapper = next(f for f in hcm["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    found: dict[str, Any] = wrapper["typed_config"]["extension_config"]
    return found


@pytest.fixture(scope="module")
def cases() -> Iterator[CaseServer]:
    server = CaseServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory, cases: CaseServer) -> Iterator[TransportStacks]:
    with transport_stacks(lambda transport: running_stack(
            tmp_path_factory.mktemp(f"extproc-{transport}"), POLICY, files={"upstream-api-key.txt": "k"},
            edit_envoy=lambda c: add_route(c, "cases", "cases", cases.port), transport=transport)) as running:
        yield running


@pytest.fixture(scope="module", params=TRANSPORTS)
def stack(stacks: TransportStacks, request: pytest.FixtureRequest) -> Stack:
    return stacks[request.param]


@pytest.fixture(scope="module")
def token(stack: Stack) -> Callable[[str], str]:
    return lambda sub: stack.idp.token(sub=sub)


def get_case(stack: Stack, cases: CaseServer, token: str, status: int, headers: Headers, body: bytes,
             chunked: bool = False) -> Response:
    name = f"case-{len(cases.cases)}"
    cases.cases[name] = (status, headers, body, chunked)
    return stack.request("GET", "/v1/orders", token, headers={"x-upstream": "cases", "x-case": name})


def ext_proc_messages(stack: Stack) -> int:
    return stack.envoy.stats().get("http.ingress.ext_proc.stream_msgs_sent", 0)


def orders_with_secret() -> bytes:
    data = copy.deepcopy(ORDERS)
    data["orders"][1]["internalRef"] = SECRET.decode()
    return json.dumps(data).encode()


# --- the seed 003 acceptance --------------------------------------------------------------


def test_user_123_receives_only_their_orders_with_only_the_retained_fields(stack: Stack, token: Any) -> None:
    r = stack.request("GET", "/v1/orders", token("user-123"))
    assert r.status == 200
    assert r.json() == USER_123_VIEW
    assert r.headers["content-length"] == str(len(r.body))
    assert b"user-456" not in r.body and b"internalRef" not in r.body


def test_a_caller_with_no_orders_gets_an_empty_list(stack: Stack, token: Any) -> None:
    r = stack.request("GET", "/v1/orders", token("user-999"))
    assert (r.status, r.json()) == (200, {"orders": []})
    assert r.headers["content-length"] == str(len(r.body))


def test_a_non_matching_route_arrives_byte_identical_and_unbuffered(stack: Stack, token: Any) -> None:
    # Three times Envoy's 1 MiB buffer, oddly formatted: buffering or re-serialising would show.
    body = b'{ "orders" :[' + b",\n ".join(b'{"userId": "user-456", "n": %d}' % i for i in range(100_000)) + b"]}"
    assert len(body) > 3 << 20
    stack.upstream.routes["/v1/products/export"] = (200, {"content-type": "application/json"}, body)
    before = ext_proc_messages(stack)
    r = stack.request("GET", "/v1/products/export", token("user-123"))
    assert r.status == 200 and r.body == body
    assert ext_proc_messages(stack) - before == 0  # no filter applies: no ext_proc stream at all


def test_only_filtered_responses_open_an_ext_proc_stream(stack: Stack, token: Any) -> None:
    """A client cannot skip filtering by sending the marker header the Check sets or removes."""
    before = ext_proc_messages(stack)
    r = stack.request("GET", "/v1/orders", token("user-123"), headers={"x-extauthz-unfiltered": "1"})
    assert r.json() == USER_123_VIEW
    assert ext_proc_messages(stack) - before == 2  # response headers, then the body
    assert "x-extauthz-unfiltered" not in stack.last_upstream_request()["headers"]


def test_filtered_responses_end_their_ext_proc_stream_cleanly(stack: Stack, token: Any) -> None:
    """Envoy resets an ext_proc stream unless the shipped runtime flag makes it close gracefully; each reset
    leaves native memory behind in grpc.aio (the sidecar's RSS climbed with every filtered response)."""
    resets, started = "cluster.extauthz.upstream_rq_tx_reset", "http.ingress.ext_proc.streams_started"
    before = stack.envoy.stats()
    for _ in range(5):
        assert stack.request("GET", "/v1/orders", token("user-123")).json() == USER_123_VIEW
    after = stack.envoy.stats()
    assert after.get(started, 0) - before.get(started, 0) == 5
    assert after.get(resets, 0) == before.get(resets, 0)


def test_head_does_not_tell_the_unfiltered_size(stack: Stack, token: Any) -> None:
    r = stack.request("HEAD", "/v1/orders", token("user-123"))
    assert r.status == 200 and r.body == b""
    assert "content-length" not in r.headers


def test_envoy_local_replies_are_not_filtered(stack: Stack) -> None:
    r = stack.request("GET", "/v1/orders")
    assert r.status == 401 and r.json()["error"] == "token_missing"


def test_a_client_cannot_hand_the_response_phase_an_identity(stack: Stack, token: Any) -> None:
    """The hand-off comes from the Check's answer only: a client's copy of its header changes nothing."""
    forged = stacks_handoff_for("user-456")
    r = stack.request("GET", "/v1/orders", token("user-123"), headers={"x-extauthz-handoff": forged})
    assert r.json() == USER_123_VIEW and "x-extauthz-handoff" not in r.headers
    r = stack.request("GET", "/v1/products/1", token("user-123"), headers={"x-extauthz-handoff": forged})
    assert r.status == 200 and "x-extauthz-handoff" not in r.headers
    if stack.transport == "http":
        # Neither the client's copy (removed at the edge) nor the Check's (kept for Envoy) goes upstream.
        assert "x-extauthz-handoff" not in r.json()["headers"]  # the sample upstream echoes what it received


def stacks_handoff_for(sub: str) -> str:
    """A well-formed hand-off, in the HTTP transport's header form, naming another caller."""
    from extauthz.core.handoff import Handoff
    from extauthz.server.handoff_header import encode_handoff

    return encode_handoff(Handoff("forged", "orders-api", "any", ("GET",), ("/v1/orders",), "localhost",
                                  ({"callerSub": sub, "sub": sub},)).to_metadata())


def test_every_transport_filters_to_the_same_bytes(stacks: TransportStacks, cases: CaseServer) -> None:
    bodies = {}
    for transport in TRANSPORTS:
        stack = stacks[transport]
        token = stack.idp.token(sub="user-123")
        plain = stack.request("GET", "/v1/orders", token)
        gzipped = get_case(stack, cases, token, 200, {"content-type": "application/json", "content-encoding": "gzip"},
                           gzip.compress(orders_with_secret()))
        empty = stack.request("GET", "/v1/orders", stack.idp.token(sub="user-999"))
        bodies[transport] = [(r.status, r.headers.get("cache-control"), r.body) for r in (plain, gzipped, empty)]
    assert bodies["http"] == bodies["grpcio"] == bodies["grpc"]
    assert bodies["grpc"][0][2] == json.dumps(USER_123_VIEW, separators=(",", ":")).encode() or \
        json.loads(bodies["grpc"][0][2]) == USER_123_VIEW


# --- encodings and framing ------------------------------------------------------------------


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize("encoding, encode", [
    ("gzip", gzip.compress), ("deflate", zlib.compress), ("deflate", _raw_deflate), ("br", brotli.compress),
])
def test_compressed_json_is_decoded_filtered_and_sent_plain(
    stack: Stack, cases: CaseServer, token: Any, encoding: str, encode: Callable[[bytes], bytes]
) -> None:
    headers = {"content-type": "application/json", "content-encoding": encoding, "etag": '"v1"',
               "cache-control": "public, max-age=600"}
    r = get_case(stack, cases, token("user-123"), 200, headers, encode(orders_with_secret()))
    assert r.status == 200 and r.json() == USER_123_VIEW
    assert "content-encoding" not in r.headers and "etag" not in r.headers
    assert r.headers["cache-control"] == "private, no-store"  # one caller's view, never in a shared cache
    assert r.headers["content-length"] == str(len(r.body))


def test_stacked_encodings_on_separate_header_lines_are_all_undone(
    stack: Stack, cases: CaseServer, token: Any
) -> None:
    headers = [("content-type", "application/json"), ("content-encoding", "gzip"), ("content-encoding", "br")]
    r = get_case(stack, cases, token("user-123"), 200, headers, brotli.compress(gzip.compress(orders_with_secret())))
    assert r.status == 200 and r.json() == USER_123_VIEW


def test_chunked_json_is_filtered_and_stays_chunked(stack: Stack, cases: CaseServer, token: Any) -> None:
    r = get_case(stack, cases, token("user-123"), 200, {"content-type": "application/json"}, orders_with_secret(),
                 chunked=True)
    assert r.status == 200 and r.json() == USER_123_VIEW
    assert "content-length" not in r.headers and r.headers.get("transfer-encoding") == "chunked"


# --- fail closed: a JSON error, never the original bytes -----------------------------------------


def _padded(size: int) -> bytes:
    return json.dumps({"orders": [{"userId": "user-456", "note": SECRET.decode() + "x" * 1000}] * (size // 1060)}
                      ).encode()


FAIL_CLOSED = {
    "not JSON": ({"content-type": "text/html"}, b"<html>" + SECRET + b"</html>", False, "not_json"),
    "no content-type": ({}, orders_with_secret(), False, "not_json"),
    "unknown encoding": ({"content-type": "application/json", "content-encoding": "zstd"}, orders_with_secret(),
                         False, "unsupported_encoding"),
    "gzip that is not gzip": ({"content-type": "application/json", "content-encoding": "gzip"},
                              orders_with_secret(), False, "bad_encoding"),
    "invalid JSON": ({"content-type": "application/json"}, b'{"orders": [' + SECRET, False, "invalid_json"),
    "declared length over the limit": ({"content-type": "application/json"}, _padded(LIMIT + 50_000), False,
                                       "too_large"),
    "chunked body over the limit": ({"content-type": "application/json"}, _padded(LIMIT + 50_000), True,
                                    "too_large"),
    "chunked body over Envoy's buffer": ({"content-type": "application/json"}, _padded(3 << 20), True,
                                         "too_large"),
    "gzip over the limit once decoded": ({"content-type": "application/json", "content-encoding": "gzip"},
                                         gzip.compress(_padded(LIMIT * 4)), False, "too_large"),
}


@pytest.mark.parametrize("name", FAIL_CLOSED)
def test_unfilterable_responses_are_blocked_with_a_json_502(
    stack: Stack, cases: CaseServer, token: Any, name: str
) -> None:
    headers, body, chunked, code = FAIL_CLOSED[name]
    r = get_case(stack, cases, token("user-123"), 200, headers, body, chunked)
    assert r.status == 502
    assert r.headers["content-type"] == "application/json"
    assert r.json()["error"] == code and r.json()["decisionId"]
    assert SECRET not in r.body and b"user-456" not in r.body


# --- processor errors and timeouts (a second stack with a broken ext_proc) -------------------------


def test_processor_errors_and_timeouts_never_leak_the_body(tmp_path: Path) -> None:
    dead_port = free_port()  # nothing listens here

    def edit(config: dict[str, Any]) -> None:
        ext_proc_filter(config)["typed_config"]["message_timeout"] = "0.001s"
        clusters = config["static_resources"]["clusters"]
        gone = copy.deepcopy(next(c for c in clusters if c["name"] == "extauthz"))
        gone["name"] = gone["load_assignment"]["cluster_name"] = "processor-gone"
        gone["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"][
            "port_value"] = dead_port
        clusters.append(gone)
        # Same app upstream, but this route's ext_proc service is unreachable.
        add_route(config, "dead-processor", None, None, per_route={"envoy.filters.http.ext_proc": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_proc.v3.ExtProcPerRoute",
            "overrides": {"grpc_service": {"envoy_grpc": {"cluster_name": "processor-gone"}}},
        }})

    big = _padded(900_000)  # takes the processor far longer than 1 ms to filter
    with running_stack(tmp_path, policy_text(1 << 20),
                       files={"upstream-api-key.txt": "k"}, edit_envoy=edit) as stack:
        stack.upstream.routes["/v1/orders"] = (200, {"content-type": "application/json"}, big)
        token = stack.idp.token(sub="user-123")
        timed_out = stack.request("GET", "/v1/orders", token)
        unreachable = stack.request("GET", "/v1/orders", token, headers={"x-upstream": "dead-processor"})
    for r in (timed_out, unreachable):
        # One documented answer for "extauthz could not answer": 503, JSON, retry-after.
        assert r.status == 503 and r.json()["error"] == "authorization_unavailable", r.body
        assert r.headers["retry-after"] == "1" and b"user-456" not in r.body


def test_a_path_too_long_to_hand_to_the_response_phase_is_refused_before_the_upstream(
        stack: Stack, token: Any) -> None:
    """A filtered route's path whose hand-off would exceed its bound is denied 414 through the real Envoy on
    every transport, never allowed without a hand-off (the upstream would act before the answer is blocked)."""
    path = "/v1/orders/" + "a" * 50_000  # under Envoy's 60 KiB of request headers, over the hand-off's 48 KiB
    before = len(stack.upstream.requests)
    r = stack.request("GET", path, token("user-123"))
    assert r.status == 414 and r.json()["error"] == "uri_too_long"
    assert len(stack.upstream.requests) == before
