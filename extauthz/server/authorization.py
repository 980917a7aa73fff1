"""The gRPC ext_authz adapter: Envoy's CheckRequest in, Envoy's CheckResponse out.

Thin on purpose (like OPA-Envoy's): protobufs are turned into a plain
:class:`HttpRequest` once, the decision core decides, and the :class:`Decision`
is turned back into protobufs. Any exception here becomes a denial. The HTTP
transport (:mod:`extauthz.server.http_authorization`) does the same with
HTTP/1.1 messages; what both do around a Check is in :mod:`extauthz.server.checks`.

Allows, nearly every answer, are served as bytes (:func:`encode_response`): the
part that depends on the upstream mutations is serialised by protobuf once per
:class:`Mutations` and reused, and the per-request decision id and hand-off are
appended as further fields of the same message, which protobuf's wire format
merges. Building the message object on every Check cost more than deciding.

Every answer, allow or denial, carries the Check's record in its
``dynamic_metadata`` (:data:`~extauthz.server.handoff_header.RECORD_HEADER`):
Envoy writes a denial's metadata too (its ext_authz filter stores a
CheckResponse's ``dynamic_metadata`` before it acts on the status), so the
response phase knows Envoy's own reply to a denied Check without
``response.code_details``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from extauthz.core.authorizer import Authorizer
from extauthz.core.decision import DECISION_ID_LENGTH, Decision, Mutations
from extauthz.core.handoff import CheckOutcome, CheckRecord
from extauthz.core.request import HttpRequest
from extauthz.server.checks import NO_REQUEST, failed, record
from extauthz.server.handoff_header import HANDOFF_HEADER, RECORD_HEADER, encode_handoff, record_of
from extauthz.server.headers import (
    GATEWAY_METADATA_NAMESPACE,
    GATEWAY_PROXY_ANNOTATION,
    ROUTE_METADATA_NAMESPACE,
    ROUTE_METADATA_PROXY,
    header_map,
)

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})
_GRPC_CODE = {401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED, 503: code_pb2.UNAVAILABLE}


def to_request(check: external_auth_pb2.CheckRequest) -> HttpRequest:
    http = check.attributes.request.http
    # Envoy sends header_map instead of headers when encode_raw_headers is on.
    sent = http.headers
    headers = {name: sent[name] for name in sent} if sent else header_map(http.header_map)
    path, _, query = http.path.partition("?")
    # Only `proxy` is read; copying the whole protobuf map cost more than the rest of this function.
    attributes = check.attributes
    proxy = attributes.context_extensions.get("proxy")
    route = attributes.route_metadata_context.filter_metadata
    return HttpRequest(
        method=http.method.upper(),
        path=path,
        host=http.host or headers.get(":authority", ""),
        query_string=query,
        headers=headers,
        context={"proxy": proxy} if proxy is not None else _NO_CONTEXT,
        request_id=headers.get("x-request-id", http.id),
        route_proxy=route_proxy(route) if route else None,
    )


def route_proxy(metadata: Mapping[str, struct_pb2.Struct]) -> str | None:
    """The proxy a route's metadata names: ``extauthz.proxy``, else an Envoy Gateway route annotation.

    None when it names none. A name that is not a string, or Envoy Gateway
    resources that name different proxies, give ``""``: a route that names
    something no proxy is, so its Checks deny rather than guess.
    """
    ours = metadata.get(ROUTE_METADATA_NAMESPACE)
    if ours is not None and ROUTE_METADATA_PROXY in ours.fields:
        value = ours.fields[ROUTE_METADATA_PROXY]
        return value.string_value if value.WhichOneof("kind") == "string_value" else ""
    gateway = metadata.get(GATEWAY_METADATA_NAMESPACE)
    if gateway is None or "resources" not in gateway.fields:
        return None
    named: set[str] = set()
    for resource in gateway.fields["resources"].list_value.values:
        annotations = resource.struct_value.fields.get("annotations")
        if annotations is not None and GATEWAY_PROXY_ANNOTATION in annotations.struct_value.fields:
            value = annotations.struct_value.fields[GATEWAY_PROXY_ANNOTATION]
            named.add(value.string_value if value.WhichOneof("kind") == "string_value" else "")
    if not named:
        return None
    return named.pop() if len(named) == 1 else ""


def _add_header(headers: Any, name: str, value: str) -> None:
    # ext_authz reads `value`, not `raw_value`; OVERWRITE so a client copy is replaced.
    option = headers.add()
    option.header.key = name
    option.header.value = value
    option.append_action = OVERWRITE


def _allow(mutations: Mutations) -> external_auth_pb2.CheckResponse:
    """Status OK and the upstream mutations."""
    response = external_auth_pb2.CheckResponse()
    response.status.code = code_pb2.OK
    ok = response.ok_response
    for name, value in mutations.set_headers:
        _add_header(ok.headers, name, value)
    ok.headers_to_remove.extend(mutations.remove_headers)
    ok.query_parameters_to_remove.extend(mutations.remove_query_params)
    return response


def to_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    if decision.allowed:
        # Filled in place: building the same message from nested constructors cost twice as much per allow.
        response = _allow(decision.mutations)
        _add_header(response.ok_response.response_headers_to_add, "x-extauthz-decision-id", decision.decision_id)
        if decision.metadata:
            # One string, as the HTTP transport sends it: a Struct of the same fields cost ~40 µs to build
            # here and as much to read back in the response phase; this costs a few.
            response.dynamic_metadata.fields[HANDOFF_HEADER].string_value = encode_handoff(decision.metadata)
        response.dynamic_metadata.fields[RECORD_HEADER].string_value = record_of(decision)
        return response
    response = external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE.get(decision.status, code_pb2.PERMISSION_DENIED)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            body=decision.body().decode(),
        ),
    )
    headers = response.denied_response.headers
    _add_header(headers, "content-type", "application/json")
    _add_header(headers, "x-extauthz-decision-id", decision.decision_id)
    if decision.www_authenticate:
        _add_header(headers, "www-authenticate", decision.www_authenticate)
    response.dynamic_metadata.fields[RECORD_HEADER].string_value = record_of(decision)
    return response


def _around_decision_id(fill: Callable[[external_auth_pb2.CheckResponse, str], None]) -> tuple[bytes, bytes]:
    """The serialised bytes ``fill`` writes into a CheckResponse, before and after the decision id it holds.

    Every length prefix around the id is fixed when the id has its fixed length,
    so both parts are the same for every Check; protobuf writes them from a
    template, and the template's id marks where to cut.
    """
    marker = "".join(str(i % 10) for i in range(DECISION_ID_LENGTH))
    template = external_auth_pb2.CheckResponse()
    fill(template, marker)
    wire = template.SerializeToString()
    head, found, tail = wire.partition(marker.encode())
    if not found or marker.encode() in tail:
        raise AssertionError("the template does not serialise to one copy of its decision id")
    return head, tail


# The ``ok_response.response_headers_to_add`` entry of the decision id.
_DECISION_ID_HEAD, _DECISION_ID_TAIL = _around_decision_id(lambda template, marker: _add_header(
    template.ok_response.response_headers_to_add, "x-extauthz-decision-id", marker))


def _allowed_record(template: external_auth_pb2.CheckResponse, decision_id: str) -> None:
    template.dynamic_metadata.fields[RECORD_HEADER].string_value = CheckRecord(
        CheckOutcome.ALLOWED, decision_id).encoded()


# The ``dynamic_metadata`` entry of an unfiltered allow's record: two concatenations per allow.
_RECORD_HEAD, _RECORD_TAIL = _around_decision_id(_allowed_record)
_ID_TO_RECORD = _DECISION_ID_TAIL + _RECORD_HEAD
_ALLOW_HEADS: dict[Mutations, bytes] = {}
_MAX_ALLOW_HEADS = 1024  # one per distinct set of mutations (per caller when identity headers differ)


def _allow_head(mutations: Mutations) -> bytes:
    """:func:`_allow`, serialised once per distinct :class:`Mutations`."""
    head = _ALLOW_HEADS.get(mutations)
    if head is None:
        head = _allow(mutations).SerializeToString()
        if len(_ALLOW_HEADS) >= _MAX_ALLOW_HEADS:
            _ALLOW_HEADS.clear()
        _ALLOW_HEADS[mutations] = head
    return head


def encode_response(decision: Decision) -> bytes:
    """The serialised CheckResponse, the same message as ``to_response(decision)`` (a property test holds both)."""
    decision_id = decision.decision_id
    if not decision.allowed or len(decision_id) != DECISION_ID_LENGTH or not decision_id.isascii():
        return bytes(to_response(decision).SerializeToString())
    raw_id = decision_id.encode()
    if not decision.metadata:  # most allows: the decision id, then the record that repeats it
        return b"".join((_allow_head(decision.mutations), _DECISION_ID_HEAD, raw_id, _ID_TO_RECORD, raw_id,
                         _RECORD_TAIL))
    metadata = external_auth_pb2.CheckResponse()
    fields = metadata.dynamic_metadata.fields
    fields[HANDOFF_HEADER].string_value = encode_handoff(decision.metadata)
    fields[RECORD_HEADER].string_value = CheckRecord(CheckOutcome.FILTERED, decision_id).encoded()
    return (_allow_head(decision.mutations) + _DECISION_ID_HEAD + raw_id + _DECISION_ID_TAIL
            + bytes(metadata.SerializeToString()))


CHECK_PATH = "/envoy.service.auth.v3.Authorization/Check"


class AuthorizationServicer:
    """``envoy.service.auth.v3.Authorization``; the authorizer is looked up per call (hot reload).

    Registered with :func:`add_to_server`, whose handler passes :meth:`Check`'s
    bytes to gRPC as they are.
    """

    def __init__(self, authorizer: Callable[[], Authorizer]) -> None:
        self._authorizer = authorizer

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any] | None
    ) -> bytes:
        started = time.perf_counter()
        http = NO_REQUEST
        try:
            http = to_request(request)
            decision = await self._authorizer().check(http)
            response = encode_response(decision)
        except Exception as exc:  # noqa: BLE001 - logged by failed(): any error denies
            decision = failed(exc)
            response = encode_response(decision)
        record(decision, http, started)
        return response

    async def check_message(self, message: bytes) -> bytes:
        """:meth:`Check` on the serialised request, for the lean gRPC server (:mod:`extauthz.server.grpc_lean`).

        A message that does not parse raises: the call ends with INTERNAL, which Envoy answers with its
        ``status_on_error`` (503 in the shipped configs), never an allow.
        """
        return await self.Check(external_auth_pb2.CheckRequest.FromString(message), None)


def add_to_server(servicer: AuthorizationServicer, server: grpc.aio.Server) -> None:
    """As the generated ``add_AuthorizationServicer_to_server``, with the response already serialised."""
    handlers = {"Check": grpc.unary_unary_rpc_method_handler(
        servicer.Check, request_deserializer=external_auth_pb2.CheckRequest.FromString)}
    service = external_auth_pb2.DESCRIPTOR.services_by_name["Authorization"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
    server.add_registered_method_handlers(service, handlers)  # type: ignore[attr-defined]  # not in the stubs yet
