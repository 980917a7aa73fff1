"""OpenID AuthZEN Access Evaluation (``POST {pdp}/access/v1/evaluation``) with the API-gateway profile.

The profile (docs/relationships.md, as the AuthZEN interop gateways send it): the subject is
``{type: identity, id: <verified sub>}``, the action is ``{name: <HTTP method>}``
and the resource is ``{type: route, id: <route template>, properties}``. The PDP
decides on the route template (``/todos/{todoId}``), never the concrete URL, so
its policy is written once per API operation; the concrete path and the
template's parameter values travel in ``properties`` for attribute checks.

Only ``{"decision": true}`` allows and only ``{"decision": false}`` is a clean
no; anything else (another type, a missing field, an error status) leaves the
condition unresolved, which fails closed just the same.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

import orjson
import re2

from extauthz.core.claims import Claims
from extauthz.core.request import HttpRequest
from extauthz.policy.model import AuthzenBackend, RouteTemplate
from extauthz.relationships.base import Answer, Cause, Failure, Unresolvable
from extauthz.relationships.transport import Transport

_PARAM = re.compile(r"\{([^{}/]+)\}")  # the loader's route template syntax


@dataclass(frozen=True, slots=True)
class EvaluationQuery:
    body: dict[str, Any]
    key: str


class _Route:
    __slots__ = ("names", "regex", "route")

    def __init__(self, route: RouteTemplate) -> None:
        self.route = route
        parts, last = [], 0
        for match in _PARAM.finditer(route.template):
            parts.append(re.escape(route.template[last:match.start()]))
            parts.append("([^/]+)")
            last = match.end()
        parts.append(re.escape(route.template[last:]))
        self.names = tuple(m.group(1) for m in _PARAM.finditer(route.template))
        self.regex: Any = re2.compile("".join(parts))

    @property
    def specificity(self) -> tuple[int, int]:
        """OpenAPI matches concrete paths before templated ones: fewer parameters, then longer literals."""
        literal = len(_PARAM.sub("", self.route.template))
        return (len(self.names), -literal)


class AuthzenPlan:
    """One AuthZEN backend's routes, ordered for matching once per loaded policy."""

    def __init__(self, backend: AuthzenBackend) -> None:
        self.backend = backend
        routes = [_Route(r) for r in backend.routes]
        self._routes = sorted(routes, key=lambda r: r.specificity)  # stable: file order breaks ties
        self._key_prefix = backend.url.encode()

    def match(self, path: str) -> tuple[RouteTemplate, dict[str, str]] | None:
        for candidate in self._routes:
            found = candidate.regex.fullmatch(path)
            if found is not None:
                return candidate.route, dict(zip(candidate.names, found.groups(), strict=True))
        return None

    def query(self, request: HttpRequest, claims: Claims) -> EvaluationQuery:
        """The evaluation request for this request; raises Unresolvable without a sub or a route."""
        if not claims.sub:
            raise Unresolvable(Cause.NO_SUBJECT, "the verified token has no 'sub' to name the subject")
        matched = self.match(request.path)
        if matched is None:
            raise Unresolvable(Cause.NO_ROUTE, "the path matches no route template of this backend")
        route, params = matched
        if route.methods is not None and request.method not in route.methods:
            # The most specific matching path lacks this operation: no other template may stand in.
            raise Unresolvable(Cause.NO_ROUTE, f"{route.template} declares no {request.method} operation")
        body = {
            "subject": {"type": "identity", "id": claims.sub},
            "action": {"name": request.method},
            "resource": {
                "type": "route",
                "id": route.template,
                "properties": {"path": request.path, "hostname": request.host, "params": params},
            },
        }
        digest = hashlib.blake2b(self._key_prefix, digest_size=16)
        digest.update(orjson.dumps(body, option=orjson.OPT_SORT_KEYS))
        return EvaluationQuery(body, "az:" + digest.hexdigest())


class AuthzenClient:
    def __init__(self, backend: AuthzenBackend, transport: Transport) -> None:
        self.backend = backend
        self.transport = transport
        self._url = f"{backend.url}/access/v1/evaluation"

    async def evaluate(self, query: EvaluationQuery) -> Answer:
        answer = await self.transport.post(self._url, query.body, "evaluation")
        if isinstance(answer, Failure):
            return answer
        decision = answer.get("decision") if isinstance(answer, dict) else None
        if not isinstance(decision, bool):
            return Failure(Cause.MALFORMED, "evaluation answer has no boolean 'decision'")
        return decision
