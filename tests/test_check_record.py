"""The Check's record, and what the response phase makes of it behind Envoy configs that are not ours.

Every Check answer (allow or denial, gRPC or HTTP) carries a small record in
the ext_authz namespace. Without ``response.code_details`` it is how the
response phase tells "no filter applies" and "Envoy's own denial" (both pass
untouched) from "no Check decided" (blocked where a filter may apply). Also
here: proxy selection from route metadata, the loader refusing ambiguous
selection, and the one-time warnings that name a missing Envoy setting.
"""

from __future__ import annotations

import asyncio

import pytest
import structlog
from envoy.service.auth.v3 import external_auth_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from google.protobuf import struct_pb2

from extauthz.core.authorizer import AuthorizationHeaderWatch, select_proxy
from extauthz.core.decision import Code, Decision
from extauthz.core.handoff import CheckOutcome, CheckRecord, Handoff
from extauthz.core.request import HttpRequest
from extauthz.filtering.codec import BlockCode
from extauthz.filtering.scope import Action, ResponseHead, plan_response
from extauthz.policy.errors import PolicyError
from extauthz.policy.loader import parse_policy
from extauthz.policy.model import Policy
from extauthz.server import authorization as grpc_adapter
from extauthz.server import http_authorization as http_adapter
from extauthz.server import processing
from extauthz.server.handoff_header import HANDOFF_HEADER, RECORD_HEADER, encode_handoff
from extauthz.server.headers import METADATA_NAMESPACE
from extauthz.server.http1 import parse_head

POLICY_TEXT = """\
providers:
  - name: idp
    issuer: https://idp.example
    audiences: [api]
    jwksUri: https://idp.example/jwks
proxies:
  - name: orders
    hosts: [orders.example]
    rules: [{effect: allow}]
    filters:
      - methods: [GET]
        path: {pattern: "^/v1/orders"}
        defaultFilterOperation: destroy
        operations: [{effect: retain, jsonPath: {pattern: "^orders\\\\.id$"}}]
  - name: fallback
    default: true
    rules: [{effect: allow}]
"""
POLICY: Policy = parse_policy(POLICY_TEXT)
ORDERS_BODY = b'{"orders": [{"id": 1, "secret": "s-1"}, {"id": 2, "secret": "s-2"}]}'
HANDOFF = Handoff("d-1", "orders", POLICY.digest, ("GET",), ("/v1/orders",), "orders.example", ({},))
DECISION_ID = "0123e4567-e89b-12d3-a456-42661417400"[:36]


# --- the record itself --------------------------------------------------------------------------


@pytest.mark.parametrize("allowed, handed_off, outcome", [
    (True, False, CheckOutcome.ALLOWED), (True, True, CheckOutcome.FILTERED), (False, False, CheckOutcome.DENIED),
])
def test_a_record_reads_back_as_written(allowed: bool, handed_off: bool, outcome: CheckOutcome) -> None:
    record = CheckRecord.of(allowed, handed_off, DECISION_ID)
    assert record.outcome is outcome
    assert CheckRecord.decode(record.encoded()) == record


@pytest.mark.parametrize("value", [None, 1, "", "1", "1.a.", "2.a.id", "1.x.id", "1.a" + "x" * 200, "a.1.id"])
def test_anything_a_check_would_not_write_is_no_record(value: object) -> None:
    assert CheckRecord.decode(value) is None


# --- both transports write it, on allows and denials ------------------------------------------------


def allow(handed_off: bool = False) -> Decision:
    return Decision(True, 200, Code.ALLOWED, "rule #0", DECISION_ID, "orders",
                    metadata=HANDOFF.to_metadata() if handed_off else {})


DENIAL = Decision(False, 401, Code.TOKEN_MISSING, "no token", DECISION_ID, "orders",
                  www_authenticate='Bearer realm="extauthz"')


@pytest.mark.parametrize("decision, outcome", [
    (allow(), "a"), (allow(True), "f"), (DENIAL, "d"),
], ids=["allowed", "filtered", "denied"])
def test_the_grpc_check_writes_the_record_into_its_dynamic_metadata(decision: Decision, outcome: str) -> None:
    served = external_auth_pb2.CheckResponse.FromString(grpc_adapter.encode_response(decision))
    assert served == grpc_adapter.to_response(decision)  # the fast path writes the same message
    fields = served.dynamic_metadata.fields
    assert fields[RECORD_HEADER].string_value == f"1.{outcome}.{DECISION_ID}"
    assert (HANDOFF_HEADER in fields) == (outcome == "f")


@pytest.mark.parametrize("decision, outcome", [
    (allow(), "a"), (allow(True), "f"), (DENIAL, "d"),
], ids=["allowed", "filtered", "denied"])
def test_the_http_check_writes_the_record_as_an_answer_header(decision: Decision, outcome: str) -> None:
    raw = http_adapter.to_response(decision)
    head, _, _ = raw.partition(b"\r\n\r\n")
    fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n")[1:])
    assert fields[RECORD_HEADER] == f"1.{outcome}.{DECISION_ID}"
    assert (HANDOFF_HEADER in fields) == (outcome == "f")


# --- what the response phase makes of it ------------------------------------------------------------


UPSTREAM_JSON = ResponseHead(200, {"content-type": "application/json"})


def test_no_filter_applies_and_denials_pass_untouched() -> None:
    for outcome in (CheckOutcome.ALLOWED, CheckOutcome.DENIED):
        plan = plan_response(POLICY, None, UPSTREAM_JSON, CheckRecord(outcome, "d-2"))
        assert (plan.action, plan.decision_id) == (Action.PASS, "d-2")


def test_a_filtered_record_whose_handoff_did_not_arrive_is_blocked() -> None:
    plan = plan_response(POLICY, None, UPSTREAM_JSON, CheckRecord(CheckOutcome.FILTERED, "d-3"))
    assert (plan.action, plan.code) == (Action.BLOCK, BlockCode.NO_IDENTITY)


def test_the_handoff_decides_whatever_the_record_says() -> None:
    plan = plan_response(POLICY, HANDOFF, UPSTREAM_JSON, CheckRecord(CheckOutcome.ALLOWED, "d-1"))
    assert plan.action is Action.BUFFER


def test_without_any_record_a_response_a_filter_may_apply_to_is_blocked() -> None:
    assert plan_response(POLICY, None, UPSTREAM_JSON).action is Action.BLOCK
    # The path alone (request.path, without request.method) already narrows what may apply.
    assert plan_response(POLICY, None, ResponseHead(200, path="/v1/products")).action is Action.PASS
    assert plan_response(POLICY, None, ResponseHead(200, path="/v1/orders/7")).action is Action.BLOCK
    assert plan_response(POLICY, None, ResponseHead(200, method="POST", path="/v1/orders")).action is Action.PASS


def test_a_body_without_its_headers_is_filtered_as_identity_json_whatever_its_status() -> None:
    plan = plan_response(POLICY, HANDOFF, ResponseHead(0, described=False), CheckRecord(CheckOutcome.FILTERED, "x"))
    assert (plan.action, plan.encodings, plan.declared_length) == (Action.BUFFER, (), None)


def message(phase: str, metadata: dict[str, str] | None, body: bytes = b"") -> pb.ProcessingRequest:
    request = pb.ProcessingRequest()
    if phase == "response_headers":
        header = request.response_headers.headers.headers.add()
        header.key, header.raw_value = "content-type", b"application/json"
        header = request.response_headers.headers.headers.add()
        header.key, header.raw_value = ":status", b"200"
    else:
        request.response_body.body = body
        request.response_body.end_of_stream = True
    if metadata is not None:
        struct = struct_pb2.Struct()
        struct.update(metadata)
        request.metadata_context.filter_metadata[METADATA_NAMESPACE].CopyFrom(struct)
    return request


def answer(messages: list[pb.ProcessingRequest]) -> list[pb.ProcessingResponse]:
    exchange = processing._Exchange(POLICY)
    return [asyncio.run(exchange.respond(m)) for m in messages]


def test_only_a_body_is_sent_and_it_is_filtered_from_the_checks_handoff() -> None:
    metadata = {HANDOFF_HEADER: encode_handoff(HANDOFF.to_metadata()), RECORD_HEADER: "1.f.d-1"}
    (out,) = answer([message("response_body", metadata, ORDERS_BODY)])
    assert out.response_body.response.body_mutation.body == b'{"orders":[{"id":1},{"id":2}]}'


def test_only_a_body_is_sent_and_nothing_applies_it_passes_or_is_blocked_without_a_record() -> None:
    (passed,) = answer([message("response_body", {RECORD_HEADER: "1.a.d-4"}, ORDERS_BODY)])
    assert passed.HasField("response_body") and not passed.response_body.HasField("response")
    (blocked,) = answer([message("response_body", None, ORDERS_BODY)])
    assert blocked.immediate_response.status.code == 502
    assert b"s-1" not in blocked.immediate_response.body


def test_envoys_own_denial_passes_untouched() -> None:
    (out,) = answer([message("response_headers", {RECORD_HEADER: "1.d.d-5"})])
    assert out.HasField("response_headers") and not out.response_headers.HasField("response")


def test_a_missing_namespace_is_said_once_naming_the_envoy_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processing, "config_warnings", processing._ConfigWarnings())
    with structlog.testing.capture_logs() as logs:
        outs = answer([message("response_headers", None)]) + answer([message("response_headers", None)])
    assert all(o.immediate_response.status.code == 502 for o in outs)
    said = [entry for entry in logs if entry["event"] == "extproc_metadata_not_forwarded"]
    assert len(said) == 1 and "metadata_options.forwarding_namespaces.untyped" in said[0]["setting"]
    assert processing.config_warnings.said() == ["extproc_metadata_not_forwarded"]


def test_the_namespace_seen_once_silences_the_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(processing, "config_warnings", processing._ConfigWarnings())
    with structlog.testing.capture_logs() as logs:
        answer([message("response_headers", {RECORD_HEADER: "1.a.d-6"})])
        answer([message("response_headers", None)])  # e.g. a route with ext_authz disabled
    assert not [entry for entry in logs if entry["event"] == "extproc_metadata_not_forwarded"]
    assert processing.config_warnings.said() == []


# --- proxy selection without context_extensions ------------------------------------------------------


def grpc_check(context: dict[str, str] | None = None, metadata: dict[str, object] | None = None,
               host: str = "orders.example") -> HttpRequest:
    check = external_auth_pb2.CheckRequest()
    http = check.attributes.request.http
    http.method, http.path, http.host = "GET", "/v1/reports", host
    check.attributes.context_extensions.update(context or {})
    for namespace, fields in (metadata or {}).items():
        struct = struct_pb2.Struct()
        struct.update(fields)  # type: ignore[arg-type]
        check.attributes.route_metadata_context.filter_metadata[namespace].CopyFrom(struct)
    return grpc_adapter.to_request(check)


def gateway(*annotations: dict[str, object]) -> dict[str, object]:
    return {"envoy-gateway": {"resources": [
        {"kind": "HTTPRoute", "name": "r", "namespace": "default", "annotations": a} for a in annotations]}}


def selected(request: HttpRequest) -> str | None:
    proxy = select_proxy(POLICY, request)
    return proxy.name if proxy is not None else None


def test_proxy_selection_precedence_context_then_route_metadata_then_host_then_default() -> None:
    assert selected(grpc_check()) == "orders"  # the host
    assert selected(grpc_check(host="other.example")) == "fallback"  # the default
    assert selected(grpc_check(metadata={"extauthz": {"proxy": "fallback"}})) == "fallback"  # over the host
    assert selected(grpc_check({"proxy": "orders"}, {"extauthz": {"proxy": "fallback"}},
                               host="other.example")) == "orders"  # the context extension over all


def test_an_envoy_gateway_route_annotation_names_the_proxy() -> None:
    assert selected(grpc_check(metadata=gateway({"extauthz-proxy": "fallback"}))) == "fallback"
    assert selected(grpc_check(metadata=gateway({"other": "x"}))) == "orders"  # names none: the host
    # extauthz.proxy is read first.
    both = {**gateway({"extauthz-proxy": "fallback"}), "extauthz": {"proxy": "orders"}}
    assert selected(grpc_check(metadata=both, host="other.example")) == "orders"


@pytest.mark.parametrize("metadata", [
    {"extauthz": {"proxy": "no-such-proxy"}},
    {"extauthz": {"proxy": 7}},
    gateway({"extauthz-proxy": "orders"}, {"extauthz-proxy": "fallback"}),
], ids=["unknown", "not a string", "resources disagree"])
def test_a_route_that_names_no_usable_proxy_never_falls_back(metadata: dict[str, object]) -> None:
    assert selected(grpc_check(metadata=metadata)) is None


def test_the_http_transport_reads_the_route_metadata_proxy_from_its_check_header() -> None:
    raw = b"GET /v1/reports HTTP/1.1\r\nhost: orders.example\r\nx-extauthz-check: proxy=fallback;scheme=;length="
    assert selected(http_adapter.to_request(parse_head(raw))) == "fallback"


# --- ambiguous selection is refused at load ---------------------------------------------------------


def load_errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.yaml")
    return [str(issue) for issue in info.value.issues]


def test_a_host_two_proxies_claim_is_refused_where_the_second_claims_it() -> None:
    text = POLICY_TEXT + "    hosts: [api.example, ORDERS.example.:443]\n"
    assert load_errors(text) == [
        "policy.yaml:18: proxies[1].hosts[1]: host 'orders.example' is also claimed by proxy 'orders': a request "
        "to it could be decided by either (give each host to one proxy)"]


def test_a_second_default_is_refused_at_its_line() -> None:
    text = POLICY_TEXT.replace("    hosts: [orders.example]\n", "    default: true\n")
    assert load_errors(text) == [
        "policy.yaml:16: proxies[1].default: only one proxy can be the default ('orders' already is)"]


# --- the authorization header Envoy may not send --------------------------------------------------


def test_checks_without_any_authorization_header_are_said_once() -> None:
    watch = AuthorizationHeaderWatch()
    with structlog.testing.capture_logs() as logs:
        for _ in range(3 * watch.THRESHOLD):
            watch.missed(frozenset({"authorization"}), {"header1": "x"})
    said = [entry for entry in logs if entry["event"] == "authorization_header_not_forwarded"]
    assert len(said) == 1 and "headersToExtAuth" in said[0]["gateway_setting"]
    assert watch.said
    watch.missed(frozenset({"authorization"}), {"authorization": "Bearer x"})
    assert not watch.said


def test_one_check_with_the_header_ends_the_watch() -> None:
    watch = AuthorizationHeaderWatch()
    watch.saw({"authorization": "Bearer x"})
    with structlog.testing.capture_logs() as logs:
        for _ in range(3 * watch.THRESHOLD):
            watch.missed(frozenset({"authorization"}), {})
    assert not logs
    cookie_only = AuthorizationHeaderWatch()
    with structlog.testing.capture_logs() as logs:
        for _ in range(3 * cookie_only.THRESHOLD):
            cookie_only.missed(frozenset({"x-token"}), {})
    assert not logs
