"""The admin servicer: explain a request with the live policy, report which policy is live.

Bound only to loopback (``server.adminAddress``; off by default) because it has no
authentication of its own: anyone who can reach it can learn how the policy
decides. It never changes state. A real token is verified by the live verifier
(live keys, live token cache); claims are minted against a copy of the live
policy with a throwaway key, so the live verifier never trusts a new key.
"""

from __future__ import annotations

from typing import Any

import grpc
import structlog

from extauthz.admin.convert import identity_of, response_message
from extauthz.admin.v1 import admin_pb2, admin_pb2_grpc
from extauthz.server.runtime import RuntimeHolder
from extauthz.toolbox.explain import build_request, decide
from extauthz.toolbox.minting import MintError

log = structlog.get_logger("extauthz.admin")


class AdminServicer(admin_pb2_grpc.AdminServicer):  # type: ignore[misc]
    def __init__(self, sidecar: RuntimeHolder) -> None:
        self.sidecar = sidecar

    async def Explain(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.ExplainRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.ExplainResponse:
        target = request.path or "/"
        if not target.startswith("/"):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"path must start with /, found {target!r}")
        runtime = self.sidecar.runtime  # one policy for the whole call, as for a Check
        http_request = build_request(request.method or "GET", target, dict(request.headers), request.host,
                                     request.proxy)
        identity = identity_of(request)
        try:
            explanation = await decide(runtime.policy, http_request, identity, self.sidecar.http,
                                       runtime.authorizer.relationships, live=runtime.authorizer)
        except MintError as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        log.info("admin_explain", method=http_request.method, path=http_request.path, identity=identity.kind,
                 result=explanation.result, policy=explanation.policy_digest)
        return response_message(explanation)

    async def GetStatus(  # noqa: N802 - gRPC method name
        self, request: admin_pb2.GetStatusRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> admin_pb2.GetStatusResponse:
        runtime = self.sidecar.runtime
        last = self.sidecar.last_reload
        return admin_pb2.GetStatusResponse(
            ready=runtime.ready, policy_digest=runtime.policy.digest, policy_file=str(self.sidecar.path),
            loaded_at=self.sidecar.loaded_at,
            last_reload_result=last.outcome.value if last else "", last_reload_at=last.at if last else "",
            last_reload_errors=list(last.errors) if last else [],
        )


def add_admin_service(server: grpc.aio.Server, sidecar: RuntimeHolder) -> None:
    admin_pb2_grpc.add_AdminServicer_to_server(AdminServicer(sidecar), server)
