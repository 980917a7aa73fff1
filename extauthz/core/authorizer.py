"""The request pipeline: proxy -> identity -> authorization -> response.

Shaped like Authorino's auth pipeline, one phase per step, each a small function.
This module knows nothing about gRPC or protobuf: the ext_authz servicer, the CLI
(`extauthz explain`) and the tests all call :meth:`Authorizer.check` with a plain
:class:`HttpRequest` and get a plain :class:`Decision` back.
"""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

from extauthz.core.claims import ANONYMOUS, Claims
from extauthz.core.decision import Decision, Mutations
from extauthz.core.mutations import upstream_mutations
from extauthz.core.request import HttpRequest
from extauthz.core.rules import NoRelationships, RelationshipResolver, evaluate
from extauthz.core.variables import resolve
from extauthz.identity.tokens import find_token
from extauthz.identity.verifier import TokenError, Verifier
from extauthz.policy.model import Effect, Mode, Policy, Proxy

METADATA_NAMESPACE = "envoy.filters.http.ext_authz"


def select_proxy(policy: Policy, request: HttpRequest) -> Proxy | None:
    """Envoy's per-route ``context_extensions[proxy]``, else the host, else the default."""
    named = request.context.get("proxy")
    if named:
        return policy.proxy_named(named)  # a named but unknown proxy never falls back
    host = request.host.lower().rsplit(":", 1)[0] if request.host else ""
    for proxy in policy.proxies:
        if host and host in proxy.hosts:
            return proxy
    for proxy in policy.proxies:
        if proxy.default:
            return proxy
    return policy.proxies[0] if len(policy.proxies) == 1 else None


class Authorizer:
    def __init__(
        self, policy: Policy, verifier: Verifier,
        relationships: RelationshipResolver | None = None,
    ) -> None:
        self.policy = policy
        self.verifier = verifier
        self.relationships = relationships or NoRelationships()

    async def check(self, request: HttpRequest) -> Decision:
        """Decide one request; the decision names this authorizer's policy digest."""
        return replace(await self._decide(request), policy=self.policy.digest)

    async def _decide(self, request: HttpRequest) -> Decision:
        decision_id = str(uuid.uuid4())
        proxy = select_proxy(self.policy, request)
        if proxy is None:
            return Decision(False, 403, "no_policy", "no proxy matches this request "
                            f"(context proxy={request.context.get('proxy')!r}, host={request.host!r})",
                            decision_id)
        # Public paths skip authentication, but the sidecar's headers are still enforced.
        for public in proxy.public_paths:
            if (public.methods is None or request.method in public.methods) and public.path.search(request.path):
                return self._allow(proxy, request, ANONYMOUS, None, decision_id,
                                   f"public path {public.path.source!r}", forward_token=True)

        # Identity phase.
        providers = [self.policy.providers[name] for name in proxy.providers]
        found = find_token(request, (s for p in providers for s in p.sources))
        if found is None:
            return self._unauthenticated(proxy, decision_id, TokenError("token_missing", "no token in request"))
        try:
            claims = await self.verifier.verify(found.token, proxy.providers)
        except TokenError as error:
            return self._unauthenticated(proxy, decision_id, error)

        # Authorization phase.
        verdict = await evaluate(proxy, request, claims, self.relationships)
        rule = verdict.rule
        why = f"rule #{rule.index} ({rule.effect.value})" + (f": {rule.notes}" if rule.notes else "") \
            if rule else f"default {proxy.default_effect.value}"
        if verdict.effect is Effect.DENY:
            if proxy.mode is Mode.MONITOR:
                decision = self._allow(proxy, request, claims, found, decision_id, why,
                                       forward_token=self.policy.providers[claims.provider].forward_token)
                # Allowed, but counted and logged apart from real allows (code would_deny).
                return replace(decision, code="would_deny", rule=rule, monitored=True, trace=verdict.trace)
            return Decision(False, 403, "forbidden", why, decision_id, proxy.name, rule, claims,
                            trace=verdict.trace)

        # Response phase.
        decision = self._allow(proxy, request, claims, found, decision_id, why,
                               forward_token=self.policy.providers[claims.provider].forward_token)
        return replace(decision, rule=rule, trace=verdict.trace)

    def _allow(
        self, proxy: Proxy, request: HttpRequest, claims: Claims, found: Any,
        decision_id: str, why: str, forward_token: bool,
    ) -> Decision:
        mutations = upstream_mutations(proxy, request, claims, found, forward_token)
        return Decision(
            True, 200, "allowed", why, decision_id, proxy.name, None, claims, mutations,
            metadata=self._metadata(proxy, request, claims, decision_id),
        )

    def _metadata(self, proxy: Proxy, request: HttpRequest, claims: Claims, decision_id: str) -> dict[str, Any]:
        """What the response phase needs: the verified identity and each filter's variables."""
        return {
            "decisionId": decision_id,
            "proxy": proxy.name,
            "policy": self.policy.digest,
            "sub": claims.sub or "",
            "claims": dict(claims.payload),
            "filterVariables": [resolve(f.variables, request, claims) for f in proxy.filters],
        }

    def _unauthenticated(self, proxy: Proxy, decision_id: str, error: TokenError) -> Decision:
        if error.status != 401:
            return Decision(False, error.status, error.code, error.reason, decision_id, proxy.name)
        challenge = 'Bearer realm="extauthz"'
        if error.rfc6750_error:
            challenge += f', error="{error.rfc6750_error}"'
        code = "token_missing" if error.code == "token_missing" else "invalid_token"
        return Decision(False, 401, code, f"{error.code}: {error.reason}", decision_id, proxy.name,
                        www_authenticate=challenge, mutations=Mutations())
