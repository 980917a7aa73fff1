"""Explanations to and from the admin service's messages, so live and offline output are identical."""

from __future__ import annotations

from typing import Any

from google.protobuf import json_format, struct_pb2

from extauthz.admin.v1 import admin_pb2
from extauthz.core.request import HttpRequest
from extauthz.toolbox.explain import Explanation, Identity, TraceLine


def request_message(request: HttpRequest, identity: Identity) -> admin_pb2.ExplainRequest:
    target = request.path + (f"?{request.query_string}" if request.query_string else "")
    message = admin_pb2.ExplainRequest(
        method=request.method, path=target, host=request.host, headers=dict(request.headers),
        proxy=request.context.get("proxy", ""), provider=identity.provider, expires_in=identity.expires_in,
    )
    if identity.claims is not None:
        claims = struct_pb2.Struct()
        claims.update(dict(identity.claims))
        message.claims.CopyFrom(claims)
    elif identity.token:
        message.token = identity.token
    return message


def _integral(value: Any) -> Any:
    """Struct numbers are doubles; claims such as ``exp`` or ``level: 3`` are integers again."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_integral(v) for v in value]
    return value


def identity_of(message: admin_pb2.ExplainRequest) -> Identity:
    which = message.WhichOneof("identity")
    claims = _integral(json_format.MessageToDict(message.claims)) if which == "claims" else None
    return Identity(token=message.token if which == "token" else "", claims=claims,
                    provider=message.provider, expires_in=message.expires_in or 3600)


def response_message(e: Explanation) -> admin_pb2.ExplainResponse:
    message = admin_pb2.ExplainResponse(
        allowed=e.allowed, status=e.status, code=e.code, reason=e.reason, proxy=e.proxy, monitored=e.monitored,
        trace=[admin_pb2.RuleTrace(index=t.index, effect=t.effect, priority=t.priority, outcome=t.outcome,
                                   reason=t.reason, notes=t.notes) for t in e.trace],
        policy_digest=e.policy_digest, sub=e.sub or "", provider=e.provider,
        upstream_headers=[admin_pb2.Header(name=n, value=v) for n, v in e.upstream_headers],
        removed_headers=list(e.removed_headers), identity=e.identity,
    )
    if e.rule is not None:
        message.rule = e.rule
    return message


def explanation_of(m: admin_pb2.ExplainResponse) -> Explanation:
    return Explanation(
        allowed=m.allowed, status=m.status, code=m.code, reason=m.reason, proxy=m.proxy, monitored=m.monitored,
        rule=m.rule if m.HasField("rule") else None,
        trace=tuple(TraceLine(t.index, t.effect, t.priority, t.outcome, t.reason, t.notes) for t in m.trace),
        policy_digest=m.policy_digest, sub=m.sub or None, provider=m.provider,
        upstream_headers=tuple((h.name, h.value) for h in m.upstream_headers),
        removed_headers=tuple(m.removed_headers), identity=m.identity or "none",
    )
