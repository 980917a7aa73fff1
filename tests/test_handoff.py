"""The Check's hand-off to the response phase: compact, bounded, and failing closed when it is not one.

A peer chooses the length of its paths, and an allow waits in memory until
Envoy takes it, so the hand-off must cost about one copy of the path: each
reading once, further readings as edits, nothing repeated per filter. Past
its bound the Check is denied (414 ``uri_too_long``) on both transports,
never allowed without a hand-off. Anything the Check did not write reads as
no hand-off, and the response phase then blocks what a filter may apply to.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import orjson
import pytest
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from google.rpc import code_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.core.authorizer import Authorizer
from extauthz.core.decision import Code, Decision
from extauthz.core.handoff import MAX_ENCODED_BYTES, MAX_READINGS, Handoff, decode, encode
from extauthz.core.normalize import path_views
from extauthz.core.request import HttpRequest
from extauthz.demo.idp import SigningKey
from extauthz.identity.verifier import TokenCache, Verifier
from extauthz.policy.loader import parse_policy
from extauthz.policy.model import Policy
from extauthz.server.authorization import AuthorizationServicer
from extauthz.server.handoff_header import HANDOFF_HEADER, decode_handoff, encode_handoff
from extauthz.server.headers import METADATA_NAMESPACE
from extauthz.server.http1 import parse_head
from extauthz.server.http_authorization import HttpAuthorizationServer
from extauthz.server.processing import ExternalProcessorServicer, to_handoff

KEY = SigningKey()
ISSUER = "https://idp.test"
FILTER = ('{path: {pattern: "^/v1/orders"}, variables: [{name: callerSub, source: jwtClaim, key: sub}], '
          'defaultFilterOperation: destroy, operations: [{effect: retain, jsonPath: {pattern: "^orders$"}, '
          'matchField: {pattern: "^userId$"}, matchValue: {pattern: "^{{callerSub}}$"}}]}')


def policy(filters: int = 1) -> Policy:
    """Orders (filtered from ``/v1/orders`` on, by ``filters`` filters alike) and reports (never filtered)."""
    return parse_policy(f"""
providers:
  - name: idp
    issuer: {ISSUER}
    audiences: [api]
    jwks: {json.dumps({"keys": [KEY.jwk]})}
proxies:
  - name: orders
    upstream:
      identityHeaders: {{x-auth-sub: "{{{{sub}}}}"}}
    rules: [{{effect: allow, path: {{path: {{pattern: "^/v1/(orders|reports)"}}}}}}]
    filters: [{", ".join([FILTER] * filters)}]
""")


POLICY = policy()
BEARER = "Bearer " + KEY.sign({"iss": ISSUER, "aud": "api", "exp": int(time.time()) + 3600, "sub": "user-3"})
T = TypeVar("T")


def with_authorizer(scenario: Callable[[Authorizer], Awaitable[T]], chosen: Policy = POLICY) -> T:
    async def main() -> T:
        async with httpx.AsyncClient() as client:
            return await scenario(Authorizer(chosen, Verifier(chosen.providers, client, TokenCache(10, 60))))

    return asyncio.run(main())


def check(path: str, chosen: Policy = POLICY) -> Decision:
    request = HttpRequest(method="GET", path=path, host="api.example", headers={"authorization": BEARER},
                          context={"proxy": "orders"})

    async def scenario(authorizer: Authorizer) -> Decision:
        return await authorizer.check(request)

    return with_authorizer(scenario, chosen)


def handoff_text(decision: Decision) -> str:
    assert decision.allowed and decision.metadata, decision
    return encode_handoff(decision.metadata)


def handoff(paths: tuple[str, ...], values: tuple[dict[str, str], ...] = ({"callerSub": "u-1"},)) -> Handoff:
    return Handoff("d-1", "orders", POLICY.digest, ("GET",), paths, "api.example", values)


def forwarded(value: str) -> pb.ProcessingRequest:
    """A response-headers message carrying ``value`` where Envoy forwards the Check's hand-off."""
    struct = struct_pb2.Struct()
    struct.update({HANDOFF_HEADER: value})
    message = pb.ProcessingRequest(response_headers=pb.HttpHeaders(headers=base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":status", raw_value=b"200"),
        base_pb2.HeaderValue(key="content-type", raw_value=b"application/json")])))
    message.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(struct)
    return message


def response_phase(message: pb.ProcessingRequest) -> pb.ProcessingResponse:
    async def stream() -> Any:
        yield message

    async def run() -> list[pb.ProcessingResponse]:
        servicer = ExternalProcessorServicer(lambda: POLICY)
        return [r async for r in servicer.Process(stream(), None)]  # type: ignore[arg-type]

    (answer,) = asyncio.run(run())
    return answer


SHORT = handoff_text(check("/v1/orders/o-17"))
"""A typical request's hand-off: what every hand-off costs besides its path."""


# --- every reading once ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/v1/orders/o-17",  # one reading
    "/v1/orders/o-17/",  # and without the trailing slash
    "/v1/orders/a%20b;v=1/x/",  # decoded, parameters cut, each without the slash
    "/v1/orders/x/..;/y\\z%2e%2e/w",
])
def test_a_checks_readings_reach_the_response_phase_as_they_were(path: str) -> None:
    readings = path_views(path)
    assert readings is not None
    decision = check(path)
    assert decision.allowed
    found = to_handoff(forwarded(handoff_text(decision)))
    assert found is not None and found.paths == readings and found.decision_id == decision.decision_id
    assert found.filter_values == ({"callerSub": "user-3", "sub": "user-3", "method": "GET", "host": "api.example",
                                    **({"path": path} if len(readings) == 1 else {})},)


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab/%2F5C;.\\é"), max_size=24))
def test_property_the_readings_of_any_path_round_trip(tail: str) -> None:
    readings = path_views("/v1/" + tail)
    if readings is not None:
        sent = handoff(readings)
        assert Handoff.from_metadata(decode(encode(sent.to_metadata())) or {}) == sent


@settings(max_examples=300, deadline=None)
@given(st.lists(st.text(max_size=8), min_size=1, max_size=MAX_READINGS),
       st.lists(st.sampled_from([{}, {"a": "1"}, {"a": "2", "b": ""}]), max_size=4))
def test_property_any_readings_and_values_round_trip_equal_ones_included(
    paths: list[str], values: list[dict[str, str]],
) -> None:
    sent = handoff(tuple(paths), tuple(values))
    encoded = sent.encoded()
    assert encoded is not None
    assert Handoff.from_metadata(decode(encode_handoff(encoded)) or {}) == sent


@pytest.mark.parametrize("tail", ["", "/", "%20y", ";jsessionid=0123456789/", "/%2e%2e/x", "\\y/"])
def test_a_long_path_travels_once_whatever_its_further_readings(tail: str) -> None:
    """Readings that differ from another in a few characters cost those characters, not a copy."""
    path = "/v1/orders/" + "x" * 20_000 + tail
    text = handoff_text(check(path))
    assert orjson.dumps(decode(text)).count(b"x" * 20_000) == 1
    # Base64 makes four characters of three bytes: one copy of the path, beside a typical hand-off.
    assert len(text) <= len(path) * 4 / 3 + len(SHORT) + 64


def test_filters_alike_share_their_values_and_a_long_value_is_not_handed_over() -> None:
    """A value too long to bind (an unresolved variable either way) is left out, not repeated per filter."""
    path = "/v1/orders/" + "x" * 20_000
    text = handoff_text(check(path, policy(filters=5)))
    fields = decode(text)
    assert fields is not None and fields["filterValues"] == [
        {"callerSub": "user-3", "sub": "user-3", "method": "GET", "host": "api.example"}, 0, 0, 0, 0]
    assert len(text) <= len(path) * 4 / 3 + len(SHORT) + 64
    found = Handoff.from_metadata(fields)
    assert found is not None and len(found.filter_values) == 5 and len(set(map(id, found.filter_values))) == 1


# --- anything else is no hand-off ----------------------------------------------------------------

VALID = handoff(("/v1/orders/a%20b/", "/v1/orders/a b/", "/v1/orders/a%20b", "/v1/orders/a b"),
                ({"callerSub": "u-1"}, {"callerSub": "u-1"})).to_metadata()


def test_the_valid_form_the_malformed_ones_are_made_from() -> None:
    assert VALID["paths"][1:] == [[0, 12, 2, " "], [0, 16, 0, ""], [1, 14, 0, ""]]
    assert VALID["filterValues"] == [{"callerSub": "u-1"}, 0]
    assert Handoff.from_metadata(VALID) is not None


@pytest.mark.parametrize("changes", [
    {"v": "1"},  # the previous format
    {"v": 2},
    {"paths": []},
    {"paths": [7]},
    {"paths": ["/v1/orders", "/v1/orders/"]},  # a further reading spelled out whole is not this format
    {"paths": ["/v1/orders", [1, 0, 0, ""]]},  # its own index
    {"paths": ["/v1/orders", [-1, 0, 0, ""]]},
    {"paths": ["/v1/orders", [0, -1, 0, ""]]},
    {"paths": ["/v1/orders", [0, 5, 6, ""]]},  # prefix and suffix overlap
    {"paths": ["/v1/orders", [0, True, 0, ""]]},
    {"paths": ["/v1/orders", [0, 1.0, 0, ""]]},
    {"paths": ["/v1/orders", [0, 1, 0]]},
    {"paths": ["/v1/orders", [0, 1, 0, "", ""]]},
    {"paths": ["/v1/orders", [0, 1, 0, None]]},
    {"paths": ["/v1/orders", *[[0, 1, 0, "x"]] * MAX_READINGS]},  # more readings than a path has
    {"filterValues": [0]},
    {"filterValues": [{"a": "1"}, 1]},
    {"filterValues": [{"a": "1"}, -1]},
    {"filterValues": [{"a": 1}]},
    {"filterValues": [{"a": None}]},
    {"filterValues": [["a"]]},
    {"filterValues": {"a": "1"}},
    {"methods": []},
    {"proxy": ""},
    {"host": None},
])
def test_a_malformed_handoff_is_none_and_the_response_is_blocked(changes: dict[str, Any]) -> None:
    fields = {**VALID, **changes}
    assert Handoff.from_metadata(fields) is None
    blocked = response_phase(forwarded(encode(fields))).immediate_response
    assert blocked.status.code == 502 and json.loads(blocked.body)["error"] == "no_identity"
    assert response_phase(forwarded(encode(VALID))).WhichOneof("response") == "response_headers"  # the control


def test_a_handoff_in_the_previous_format_blocks_what_a_filter_may_apply_to() -> None:
    """The format changed: a hand-off written before the change reads as none, never as a guess."""
    old = {"v": "1", "decisionId": "d-1", "proxy": "orders", "policy": POLICY.digest, "methods": ["GET"],
           "paths": ["/v1/orders/", "/v1/orders"], "host": "api.example", "filterValues": [{"callerSub": "u-1"}]}
    blocked = response_phase(forwarded(encode(old))).immediate_response
    assert blocked.status.code == 502 and json.loads(blocked.body)["error"] == "no_identity"


@pytest.mark.parametrize("value", [
    encode(VALID)[:-3],  # cut short
    encode(VALID) + "!",
    base64.urlsafe_b64encode(b'["v", "2"]').decode(),
    encode({**VALID, "paths": ["/v1/orders/" + "x" * MAX_ENCODED_BYTES]}),  # longer than any Check writes
])
def test_a_string_that_is_not_an_encoded_handoff_is_none(value: str) -> None:
    assert decode_handoff(value) is None
    assert to_handoff(forwarded(value)) is None


# --- the bound --------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/v1/orders/" + "x" * 60_000,  # longer than the bound alone
    "/v1/orders/" + "x" * 36_700,  # over it with the rest of the hand-off
    "/v1/orders/" + "a%41" * 8_000 + "/",  # four readings, two of them no edit of another
])
def test_a_check_whose_handoff_would_exceed_the_bound_is_denied(path: str) -> None:
    decision = check(path)
    assert (decision.allowed, decision.status, decision.code) == (False, 414, Code.URI_TOO_LONG)
    assert not decision.metadata and decision.proxy == "orders"
    assert json.loads(decision.body())["error"] == "uri_too_long"


def test_the_longest_handoff_is_under_the_bound_and_allowed() -> None:
    path = "/v1/orders/" + "x" * (MAX_ENCODED_BYTES * 3 // 4 - len(orjson.dumps(decode(SHORT))) - 16)
    text = handoff_text(check(path))
    assert MAX_ENCODED_BYTES - 64 <= len(text) <= MAX_ENCODED_BYTES


def test_a_long_path_no_filter_applies_to_carries_no_handoff_and_no_bound() -> None:
    decision = check("/v1/reports/" + "x" * 60_000)
    assert decision.allowed and not decision.metadata


def grpc_check(path: str) -> bytes:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="GET", path=path, host="api.example", headers={"authorization": BEARER})
    request = external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http), context_extensions={"proxy": "orders"}))

    async def scenario(authorizer: Authorizer) -> bytes:
        return await AuthorizationServicer(lambda: authorizer).Check(request, None)

    return with_authorizer(scenario)


def test_over_grpc_a_check_past_the_bound_is_a_small_414() -> None:
    wire = grpc_check("/v1/orders/" + "x" * 60_000)
    answer = external_auth_pb2.CheckResponse.FromString(wire)
    assert answer.status.code == code_pb2.PERMISSION_DENIED and answer.denied_response.status.code == 414
    assert json.loads(answer.denied_response.body)["error"] == "uri_too_long"
    # Only the Check record (the response phase passes Envoy's own 414): never a hand-off.
    assert HANDOFF_HEADER not in answer.dynamic_metadata.fields and len(wire) < 400


def test_over_grpc_an_allow_writes_its_handoff_once() -> None:
    path = "/v1/orders/" + "x" * 30_000 + "/"
    wire = grpc_check(path)
    answer = external_auth_pb2.CheckResponse.FromString(wire)
    text = answer.dynamic_metadata.fields[HANDOFF_HEADER].string_value
    assert answer.status.code == code_pb2.OK and decode_handoff(text) is not None
    assert wire.count(b"x" * 1000) == 0  # the path itself only travels inside the hand-off's base64
    assert len(wire) <= len(text) + len(SHORT) and len(text) <= len(path) * 4 / 3 + len(SHORT) + 64


def http_check(path: str) -> bytes:
    raw = (f"GET {path} HTTP/1.1\r\nhost: api.example\r\ncontent-length: 0\r\nauthorization: {BEARER}\r\n"
           "x-extauthz-check: proxy=orders;scheme=http;length=").encode()

    async def scenario(authorizer: Authorizer) -> bytes:
        server = HttpAuthorizationServer(lambda: authorizer, "127.0.0.1:0")
        payload, _ = await server.answer(parse_head(raw), time.perf_counter())
        return payload

    return with_authorizer(scenario)


def test_over_http_a_check_past_the_bound_is_the_same_414() -> None:
    denied = http_check("/v1/orders/" + "x" * 60_000)
    head, _, body = denied.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 414 ") and json.loads(body)["error"] == "uri_too_long"
    assert HANDOFF_HEADER.encode() not in head and len(denied) < 400
    allowed = http_check("/v1/orders/" + "x" * 30_000)
    assert allowed.startswith(b"HTTP/1.1 200 ") and allowed.count(HANDOFF_HEADER.encode()) == 1
    assert len(allowed) <= 30_011 * 4 / 3 + 2 * len(SHORT)
