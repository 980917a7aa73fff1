"""The gRPC adapters in-process, without Envoy: protobufs in, plain objects, protobufs out.

As OPA-Envoy tests its request/response conversion: the ext_authz adapter's
``to_request``/``to_response``, the shared header decoder, and the ext_proc
exchange (mode overrides, content-length, HEAD, blocking) driven message by
message through the real servicer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.core.decision import Code, Decision, Mutations, new_decision_id
from extauthz.core.handoff import Handoff
from extauthz.policy.loader import parse_policy
from extauthz.server.authorization import OVERWRITE, encode_response, to_request, to_response
from extauthz.server.handoff_header import HANDOFF_HEADER, encode_handoff
from extauthz.server.headers import METADATA_NAMESPACE, header_map
from extauthz.server.processing import ExternalProcessorServicer, to_handoff

Http = attribute_context_pb2.AttributeContext.HttpRequest


def check_request(http: Any, context: dict[str, str] | None = None) -> external_auth_pb2.CheckRequest:
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http), context_extensions=context or {}))


# --- ext_authz ------------------------------------------------------------------------------


def test_to_request_splits_the_query_and_reads_envoys_fields() -> None:
    http = Http(method="get", path="/v1/orders?page=2&x=%20", host="api.example",
                headers={"x-request-id": "r-1", "authorization": "Bearer t"})
    request = to_request(check_request(http, {"proxy": "orders"}))
    assert (request.method, request.path, request.query_string) == ("GET", "/v1/orders", "page=2&x=%20")
    assert request.host == "api.example" and request.request_id == "r-1"
    assert request.context == {"proxy": "orders"} and request.headers["authorization"] == "Bearer t"


def test_to_request_reads_raw_header_maps_and_falls_back_to_authority() -> None:
    raw = base_pb2.HeaderMap(headers=[
        base_pb2.HeaderValue(key=":authority", raw_value=b"api.example:8443"),
        base_pb2.HeaderValue(key="Accept", raw_value=b"a"),
        base_pb2.HeaderValue(key="accept", raw_value=b"b"),
    ])
    request = to_request(check_request(Http(method="GET", path="/", header_map=raw)))
    assert request.host == "api.example:8443"
    assert request.headers["accept"] == "a, b"  # repeated lines join as an HTTP list


def test_header_map_prefers_raw_values_and_lower_cases_names() -> None:
    headers = base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key="Content-Type", raw_value=b"application/json"),
                                          base_pb2.HeaderValue(key="x-old", value="v")])
    assert header_map(headers) == {"content-type": "application/json", "x-old": "v"}


def test_an_allow_becomes_overwriting_header_mutations_and_the_handoff() -> None:
    handoff = Handoff("d-1", "orders", "digest", ("GET",), ("/v1/orders",), "api", ({"sub": "u-1"},))
    decision = Decision(True, 200, Code.ALLOWED, "rule #1", "d-1", "orders",
                        mutations=Mutations(set_headers=(("x-auth-sub", "u-1"),), remove_headers=("authorization",),
                                            remove_query_params=("access_token",)),
                        metadata=handoff.to_metadata())
    response = to_response(decision)
    ok = response.ok_response
    assert response.status.code == 0
    assert [(h.header.key, h.header.value, h.append_action) for h in ok.headers] == [("x-auth-sub", "u-1", OVERWRITE)]
    assert list(ok.headers_to_remove) == ["authorization"]
    assert list(ok.query_parameters_to_remove) == ["access_token"]
    assert ok.response_headers_to_add[0].header.key == "x-extauthz-decision-id"
    # What Envoy forwards to ext_proc (metadata_options) reads back as the same hand-off.
    forwarded = pb.ProcessingRequest()
    forwarded.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(response.dynamic_metadata)
    assert to_handoff(forwarded) == handoff


def test_a_denial_is_a_status_with_a_json_body_and_its_challenge() -> None:
    decision = Decision(False, 401, Code.INVALID_TOKEN, "token_expired: ...", "d-2", "orders",
                        www_authenticate='Bearer realm="extauthz", error="invalid_token"')
    denied = to_response(decision).denied_response
    assert denied.status.code == 401
    headers = {h.header.key: h.header.value for h in denied.headers}
    assert headers["www-authenticate"].endswith('error="invalid_token"')
    assert headers["content-type"] == "application/json" and headers["x-extauthz-decision-id"] == "d-2"
    assert json.loads(denied.body) == {"error": "invalid_token", "message": "the access token is not valid",
                                       "decisionId": "d-2"}  # the reason stays in the log


_text = st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
_names = st.from_regex(r"\A[a-z][a-z0-9-]{0,20}\Z")


@settings(max_examples=300, deadline=None)
@given(
    allowed=st.booleans(),
    decision_id=st.one_of(st.builds(lambda _: new_decision_id(), st.none()), _text),
    set_headers=st.lists(st.tuples(_names, _text), max_size=4),
    remove_headers=st.lists(_names, max_size=3),
    remove_query=st.lists(_names, max_size=2),
    filter_values=st.none() | st.dictionaries(_names, _text, max_size=3),
)
def test_the_served_bytes_are_the_message_to_response_builds(
    allowed: bool, decision_id: str, set_headers: list[tuple[str, str]], remove_headers: list[str],
    remove_query: list[str], filter_values: dict[str, str] | None,
) -> None:
    """Allows are served from cached bytes plus appended fields; they must parse to exactly ``to_response``'s
    message, or Envoy would get other headers than the decision says."""
    mutations = Mutations(tuple(set_headers), tuple(remove_headers), tuple(remove_query))
    metadata = {} if filter_values is None else Handoff(
        decision_id, "orders", "digest", ("GET",), ("/v1/orders",), "api", (filter_values,)).to_metadata()
    decision = Decision(allowed, 200 if allowed else 403, Code.ALLOWED if allowed else Code.FORBIDDEN, "why",
                        decision_id, "orders", mutations=mutations, metadata=metadata)
    for _ in range(2):  # the first call fills the cache of serialised mutations, the second reads it
        served = external_auth_pb2.CheckResponse.FromString(encode_response(decision))
        assert served == to_response(decision)


# --- ext_proc -------------------------------------------------------------------------------

POLICY = parse_policy("""
providers:
  - {name: idp, issuer: https://idp.example, jwksUri: "https://idp.example/jwks", audiences: [api]}
proxies:
  - name: api
    filters:
      - methods: [GET]
        path: {pattern: "^/v1/orders"}
        defaultFilterOperation: retain
        operations: [{effect: destroy, jsonPath: {pattern: "^orders\\\\.secret$"}}]
server: {maxBodyBytes: 1000}
""")
BODY = json.dumps({"orders": [{"id": 1, "secret": "s"}]}).encode()
FILTERED = b'{"orders":[{"id":1}]}'


def headers_message(status: int, headers: dict[str, str], method: str = "GET",
                    end_of_stream: bool = False) -> pb.ProcessingRequest:
    handoff = Handoff("d-1", "api", POLICY.digest, (method,), ("/v1/orders",), "api", ({},))
    metadata = struct_pb2.Struct()  # as the gRPC Check writes it
    metadata.fields[HANDOFF_HEADER].string_value = encode_handoff(handoff.to_metadata())
    message = pb.ProcessingRequest(response_headers=pb.HttpHeaders(
        headers=base_pb2.HeaderMap(headers=[base_pb2.HeaderValue(key=k, raw_value=v.encode())
                                            for k, v in {":status": str(status), **headers}.items()]),
        end_of_stream=end_of_stream))
    message.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(metadata)
    return message


def body_message(body: bytes) -> pb.ProcessingRequest:
    return pb.ProcessingRequest(response_body=pb.HttpBody(body=body, end_of_stream=True))


def exchange(*messages: pb.ProcessingRequest) -> list[pb.ProcessingResponse]:
    async def stream() -> AsyncIterator[pb.ProcessingRequest]:
        for message in messages:
            yield message

    async def run() -> list[pb.ProcessingResponse]:
        servicer = ExternalProcessorServicer(lambda: POLICY)
        return [r async for r in servicer.Process(stream(), None)]  # type: ignore[arg-type]

    return asyncio.run(run())


def set_headers(mutation: pb.HeaderMutation) -> dict[str, str]:
    return {h.header.key: h.header.raw_value.decode() for h in mutation.set_headers}


def test_the_stream_ends_once_the_response_is_answered() -> None:
    """Envoy needs nothing after the last answer: the call ends with OK rather than waiting for Envoy's close
    (messages after it get no answer; Envoy sends none in the shipped config)."""
    blocked = exchange(headers_message(200, {"content-type": "text/plain"}), body_message(BODY))
    assert [a.WhichOneof("response") for a in blocked] == ["immediate_response"]  # not JSON: refused at once
    buffered = headers_message(200, {"content-type": "application/json", "content-length": str(len(BODY))})
    answers = exchange(buffered, body_message(BODY), body_message(BODY))
    assert [a.WhichOneof("response") for a in answers] == ["response_headers", "response_body"]


def test_a_sized_body_is_buffered_and_its_length_replaced() -> None:
    head, body = exchange(headers_message(200, {"content-type": "application/json",
                                                 "content-length": str(len(BODY)), "etag": '"x"'}),
                          body_message(BODY))
    assert head.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED
    common = body.response_body.response
    assert common.body_mutation.body == FILTERED
    assert set_headers(common.header_mutation) == {"content-length": str(len(FILTERED)),
                                                   "cache-control": "private, no-store"}
    assert "etag" in common.header_mutation.remove_headers  # it described the unfiltered bytes


def test_a_chunked_body_is_buffered_partially_and_stays_chunked() -> None:
    head, body = exchange(headers_message(200, {"content-type": "application/json"}), body_message(BODY))
    assert head.mode_override.response_body_mode == processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
    common = body.response_body.response
    assert common.body_mutation.body == FILTERED
    assert "content-length" in common.header_mutation.remove_headers
    assert "content-length" not in set_headers(common.header_mutation)


def test_head_loses_the_length_that_would_tell_the_unfiltered_size() -> None:
    (head,) = exchange(headers_message(200, {"content-type": "application/json", "content-length": "5000"},
                                       method="HEAD", end_of_stream=True))
    assert not head.HasField("mode_override")
    assert "content-length" in head.response_headers.response.header_mutation.remove_headers


def test_partial_and_unfilterable_responses_are_blocked_with_a_json_502() -> None:
    for headers, status, code in (({"content-type": "application/json", "content-range": "bytes 0-9/99"}, 206,
                                   "partial_content"),
                                  ({"content-type": "text/html"}, 200, "not_json"),
                                  ({"content-type": "application/json", "content-length": "1001"}, 200, "too_large")):
        (answer,) = exchange(headers_message(status, headers))
        immediate = answer.immediate_response
        assert immediate.status.code == 502
        assert json.loads(immediate.body) == {"error": code, "message": json.loads(immediate.body)["message"],
                                              "decisionId": "d-1"}


def test_a_response_without_the_checks_handoff_is_blocked_when_a_filter_may_apply() -> None:
    message = headers_message(200, {"content-type": "application/json"})
    message.metadata_context.filter_metadata.clear()
    (answer,) = exchange(message)
    assert json.loads(answer.immediate_response.body)["error"] == "no_identity"
