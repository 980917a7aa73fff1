"""The gRPC ext_authz adapter: Envoy's CheckRequest in, Envoy's CheckResponse out.

Thin on purpose (like OPA-Envoy's): protobufs are turned into a plain
:class:`HttpRequest` once, the decision core decides, and the :class:`Decision`
is turned back into protobufs. Any exception here becomes a denial. The HTTP
transport (:mod:`extauthz.server.http_authorization`) does the same with
HTTP/1.1 messages; what both do around a Check is in :mod:`extauthz.server.checks`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.rpc import code_pb2, status_pb2

from extauthz.core.authorizer import Authorizer
from extauthz.core.decision import Decision
from extauthz.core.request import HttpRequest
from extauthz.server.checks import NO_REQUEST, failed, record
from extauthz.server.handoff_header import HANDOFF_HEADER, encode_handoff
from extauthz.server.headers import header_map

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
    proxy = check.attributes.context_extensions.get("proxy")
    return HttpRequest(
        method=http.method.upper(),
        path=path,
        host=http.host or headers.get(":authority", ""),
        query_string=query,
        headers=headers,
        context={"proxy": proxy} if proxy is not None else _NO_CONTEXT,
        request_id=headers.get("x-request-id", http.id),
    )


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    # ext_authz reads `value`, not `raw_value`; OVERWRITE so a client copy is replaced.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=OVERWRITE
    )


def _add_header(headers: Any, name: str, value: str) -> None:
    # ext_authz reads `value`, not `raw_value`; OVERWRITE so a client copy is replaced.
    option = headers.add()
    option.header.key = name
    option.header.value = value
    option.append_action = OVERWRITE


def to_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    if decision.allowed:
        # Filled in place: building the same message from nested constructors cost twice as much per allow.
        m = decision.mutations
        response = external_auth_pb2.CheckResponse()
        response.status.code = code_pb2.OK
        ok = response.ok_response
        for name, value in m.set_headers:
            _add_header(ok.headers, name, value)
        if m.remove_headers:
            ok.headers_to_remove.extend(m.remove_headers)
        if m.remove_query_params:
            ok.query_parameters_to_remove.extend(m.remove_query_params)
        _add_header(ok.response_headers_to_add, "x-extauthz-decision-id", decision.decision_id)
        if decision.metadata:
            # One string, as the HTTP transport sends it: a Struct of the same fields cost ~40 µs to build
            # here and as much to read back in the response phase; this costs a few.
            response.dynamic_metadata.fields[HANDOFF_HEADER].string_value = encode_handoff(decision.metadata)
        return response
    headers = [_header("content-type", "application/json"), _header("x-extauthz-decision-id", decision.decision_id)]
    if decision.www_authenticate:
        headers.append(_header("www-authenticate", decision.www_authenticate))
    return external_auth_pb2.CheckResponse(
        status=status_pb2.Status(code=_GRPC_CODE.get(decision.status, code_pb2.PERMISSION_DENIED)),
        denied_response=external_auth_pb2.DeniedHttpResponse(
            status=http_status_pb2.HttpStatus(code=decision.status),
            headers=headers,
            body=decision.body().decode(),
        ),
    )


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``envoy.service.auth.v3.Authorization``; the authorizer is looked up per call (hot reload)."""

    def __init__(self, authorizer: Callable[[], Authorizer]) -> None:
        self._authorizer = authorizer

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        http = NO_REQUEST
        try:
            http = to_request(request)
            decision = await self._authorizer().check(http)
            response = to_response(decision)
        except Exception as exc:  # noqa: BLE001 - logged by failed(): any error denies
            decision = failed(exc)
            response = to_response(decision)
        record(decision, http, started)
        return response
