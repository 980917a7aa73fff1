"""The ext_authz adapter: Envoy's CheckRequest in, Envoy's CheckResponse out.

Thin on purpose (like OPA-Envoy's): protobufs are turned into a plain
:class:`HttpRequest` once, the decision core decides, and the :class:`Decision`
is turned back into protobufs. Any exception here becomes a denial.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2
from google.rpc import code_pb2, status_pb2

from extauthz.core.authorizer import Authorizer
from extauthz.core.decision import Code, Decision
from extauthz.core.request import HttpRequest
from extauthz.observability import metrics
from extauthz.observability.logging import log_decision
from extauthz.server.headers import header_map

log = structlog.get_logger("extauthz.authz")

OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
_GRPC_CODE = {401: code_pb2.UNAUTHENTICATED, 403: code_pb2.PERMISSION_DENIED, 503: code_pb2.UNAVAILABLE}


def to_request(check: external_auth_pb2.CheckRequest) -> HttpRequest:
    http = check.attributes.request.http
    # Envoy sends header_map instead of headers when encode_raw_headers is on.
    headers = dict(http.headers) if http.headers else header_map(http.header_map)
    path, _, query = http.path.partition("?")
    return HttpRequest(
        method=http.method.upper(),
        path=path,
        host=http.host or headers.get(":authority", ""),
        query_string=query,
        headers=headers,
        context=dict(check.attributes.context_extensions),
        request_id=headers.get("x-request-id", http.id),
    )


def _header(name: str, value: str) -> base_pb2.HeaderValueOption:
    # ext_authz reads `value`, not `raw_value`; OVERWRITE so a client copy is replaced.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, value=value), append_action=OVERWRITE
    )


def to_response(decision: Decision) -> external_auth_pb2.CheckResponse:
    decision_header = _header("x-extauthz-decision-id", decision.decision_id)
    if decision.allowed:
        m = decision.mutations
        response = external_auth_pb2.CheckResponse(
            status=status_pb2.Status(code=code_pb2.OK),
            ok_response=external_auth_pb2.OkHttpResponse(
                headers=[_header(k, v) for k, v in m.set_headers],
                headers_to_remove=list(m.remove_headers),
                query_parameters_to_remove=list(m.remove_query_params),
                response_headers_to_add=[decision_header],
            ),
        )
        if decision.metadata:
            metadata = struct_pb2.Struct()
            metadata.update(decision.metadata)
            response.dynamic_metadata.CopyFrom(metadata)
        return response
    headers = [_header("content-type", "application/json"), decision_header]
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


def internal_error(reason: str) -> Decision:
    return Decision(False, 500, Code.INTERNAL_ERROR, reason, str(uuid.uuid4()))


class AuthorizationServicer(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    """``envoy.service.auth.v3.Authorization``; the authorizer is looked up per call (hot reload)."""

    def __init__(self, authorizer: Callable[[], Authorizer]) -> None:
        self._authorizer = authorizer

    async def Check(  # noqa: N802 - gRPC method name
        self, request: external_auth_pb2.CheckRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> external_auth_pb2.CheckResponse:
        started = time.perf_counter()
        http = HttpRequest(method="", path="")
        try:
            http = to_request(request)
            decision = await self._authorizer().check(http)
            response = to_response(decision)
        except Exception as exc:
            log.exception("check_failed", error=f"{type(exc).__name__}: {exc}")
            decision = internal_error(f"{type(exc).__name__}: {exc}")
            response = to_response(decision)
        elapsed = time.perf_counter() - started
        metrics.check_latency.observe(elapsed)
        metrics.decisions.labels(
            decision.proxy, "allow" if decision.allowed else "deny", decision.code,
            str(decision.rule.index) if decision.rule else "default",
        ).inc()
        log_decision(decision, http, int(elapsed * 1_000_000))
        return response
