"""Calls to a running sidecar's admin service (``extauthz explain --admin``)."""

from __future__ import annotations

import grpc

from extauthz.admin.convert import explanation_of, request_message
from extauthz.admin.v1 import admin_pb2, admin_pb2_grpc
from extauthz.core.request import HttpRequest
from extauthz.toolbox.explain import Explanation, Identity


def explain_remote(address: str, request: HttpRequest, identity: Identity, timeout: float = 10.0) -> Explanation:
    """Explain ``request`` with the live policy at ``address``; ConnectionError when it cannot answer."""
    with grpc.insecure_channel(address) as channel:
        stub = admin_pb2_grpc.AdminStub(channel)
        try:
            response = stub.Explain(request_message(request, identity), timeout=timeout)
        except grpc.RpcError as exc:
            raise ConnectionError(f"admin service at {address}: {exc.code().name}: {exc.details()}") from None
    return explanation_of(response)


def status_remote(address: str, timeout: float = 5.0) -> admin_pb2.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        try:
            response: admin_pb2.GetStatusResponse = admin_pb2_grpc.AdminStub(channel).GetStatus(
                admin_pb2.GetStatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise ConnectionError(f"admin service at {address}: {exc.code().name}: {exc.details()}") from None
    return response
