"""The request pipeline: admission -> identity -> authorization -> response.

Shaped like Authorino's auth pipeline, one phase per step, each a small method:
``_admit`` (which proxy, and can the request be read unambiguously), ``_identify``
(a public path or a verified token), :func:`~extauthz.core.rules.evaluate` and
``_respond`` (Envoy's answer, with the upstream mutations and the hand-off).
This module knows nothing about gRPC or protobuf: the ext_authz servicer, the CLI
(`extauthz explain`) and the tests all call :meth:`Authorizer.check` with a plain
:class:`HttpRequest` and get a plain :class:`Decision` back.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import structlog

from extauthz.core.claims import ANONYMOUS, Claims
from extauthz.core.decision import Code, Decision, Mutations, new_decision_id
from extauthz.core.handoff import MAX_ENCODED_BYTES, Handoff
from extauthz.core.identity import TokenError, TokenVerifier
from extauthz.core.mutations import Stripping, upstream_mutations
from extauthz.core.normalize import REFUSED_METHODS, STANDARD_METHODS, method_matches
from extauthz.core.request import HttpRequest
from extauthz.core.rules import CompiledRule, NoRelationships, RelationshipResolver, Verdict, compile_rules, evaluate
from extauthz.core.scope import request_in_scope
from extauthz.core.tokens import FoundToken, find_token
from extauthz.core.variables import resolve
from extauthz.policy.model import Effect, Mode, Policy, Proxy
from extauthz.policy.patterns import MAX_VALUE_LENGTH

_NO_METADATA: Mapping[str, Any] = MappingProxyType({})
_NO_MUTATIONS = Mutations()
FILTERED: Mapping[str, Any] = MappingProxyType({"filtered": True})
"""A judging authorizer's metadata where a response filter applies and no sample of the hand-off was asked for."""
_NO_VALUES: Mapping[str, str] = MappingProxyType({})

log = structlog.get_logger("extauthz.authz")


class AuthorizationHeaderWatch:
    """Says once when Envoy seems to send the sidecar no ``authorization`` header at all.

    Envoy's ``allowed_headers`` (Envoy Gateway's ``headersToExtAuth``, Istio's
    ``includeRequestHeadersInCheck``) is a list of what reaches the Check: set
    without ``authorization``, every Check lacks the token and answers 401, and
    nothing else says why. After :data:`THRESHOLD` Checks whose proxy reads a
    token from that header arrived without it, and none with it, one warning
    names the setting. A Check that carries the header ends the watch.
    """

    THRESHOLD = 20

    def __init__(self) -> None:
        self.seen = False
        self.missing = 0

    @property
    def said(self) -> bool:
        """The warning was logged and no Check has carried the header since."""
        return not self.seen and self.missing >= self.THRESHOLD

    def saw(self, headers: Mapping[str, str]) -> None:
        if "authorization" in headers:
            self.seen = True

    def missed(self, expected: frozenset[str], headers: Mapping[str, str]) -> None:
        if self.seen or "authorization" not in expected:
            return
        if "authorization" in headers:
            self.seen = True
            return
        self.missing += 1
        if self.missing == self.THRESHOLD:
            log.warning("authorization_header_not_forwarded", checks=self.missing,
                        setting="ext_authz allowed_headers (gRPC) / http_service.authorization_request."
                                "allowed_headers must include authorization",
                        gateway_setting="SecurityPolicy extAuth.headersToExtAuth must include authorization",
                        hint="no Check so far carried an authorization header though the policy reads tokens "
                             "from it: every such Check answers 401")


authorization_header = AuthorizationHeaderWatch()


def select_proxy(policy: Policy, request: HttpRequest) -> Proxy | None:
    """The proxy that decides: named by the route, else by the host, else the default.

    In this order (docs/policy.md): Envoy's per-route ``context_extensions``
    ``proxy`` (also what an Envoy Gateway SecurityPolicy's ``contextExtensions``
    sets), then the route's metadata (``extauthz.proxy``, or an Envoy Gateway
    route's ``gateway.envoyproxy.io/extauthz-proxy`` annotation), then the host
    (``:authority``), then the proxy marked ``default`` (or the only one). A
    route that names a proxy the policy lacks never falls back: its Checks
    deny. Hosts compare after normalisation (case, port, trailing dot), so
    ``ADMIN.example.test.:443`` picks the same proxy as ``admin.example.test``;
    the loader refuses a host two proxies claim, and two defaults.
    """
    named = request.context.get("proxy")
    if named:
        return policy.proxy_named(named)  # a named but unknown proxy never falls back
    if request.route_proxy is not None:
        return policy.proxy_named(request.route_proxy)
    host = request.host_name
    for proxy in policy.proxies:
        if host and host in proxy.hosts:
            return proxy
    for proxy in policy.proxies:
        if proxy.default:
            return proxy
    return policy.proxies[0] if len(policy.proxies) == 1 else None


@dataclass(frozen=True)
class _ProxyFacts:
    """Per-proxy lookups computed once per policy, so a Check only reads them."""

    stripping: Stripping
    """The proxy's token sources and the headers it owns."""
    named_methods: frozenset[str]
    """Methods outside the standard set that some rule or public path names explicitly."""
    rules: tuple[CompiledRule, ...]
    """The rules as compiled tests (the serving path of policies without relationship conditions)."""
    static_scopes: bool
    """No filter's path scope has variables: whether one may apply is known before any value is resolved."""
    reasons: Mapping[int | None, str]
    """What a decision says: by rule index (``rule #2 (allow): notes``), and under None the default's."""

    @classmethod
    def of(cls, policy: Policy, proxy: Proxy) -> _ProxyFacts:
        sources = tuple(s for name in proxy.providers for s in policy.providers[name].sources)
        named: set[str] = set()
        for methods in (*(r.methods for r in proxy.rules), *(p.methods for p in proxy.public_paths)):
            named.update(methods or ())
        reasons: dict[int | None, str] = {
            r.index: f"rule #{r.index} ({r.effect.value})" + (f": {r.notes}" if r.notes else "") for r in proxy.rules}
        reasons[None] = f"default {proxy.default_effect.value}"
        return cls(Stripping.of(proxy, sources), frozenset(named - STANDARD_METHODS), compile_rules(proxy),
                   all(f.path is None or not f.path.variables for f in proxy.filters),
                   MappingProxyType(reasons))


@dataclass(frozen=True, slots=True)
class Verified:
    """Claims verified for one request, and the proxies (of the policy deciding again) they hold for: those
    that find the same token (the same token sources) and trust its provider, declared identically."""

    claims: Claims
    proxies: frozenset[str]


@dataclass(frozen=True)
class _Check:
    """One request admitted to the pipeline: its readings, decision id and the proxy that decides."""

    request: HttpRequest
    views: tuple[HttpRequest, ...]
    decision_id: str
    proxy: Proxy
    facts: _ProxyFacts


class Authorizer:
    def __init__(
        self, policy: Policy, verifier: TokenVerifier,
        relationships: RelationshipResolver | None = None, *,
        judge_only: Callable[[], bool] | None = None,
    ) -> None:
        """``judge_only``: this authorizer's answers never reach Envoy (a shadow policy's), so its allows skip
        the upstream mutations and the encoded hand-off: where a filter applies they carry :data:`FILTERED`,
        or the hand-off's plain fields when ``judge_only()`` asks for a sample of the response phase."""
        self.policy = policy
        self.verifier = verifier
        self.relationships = relationships or NoRelationships()
        self._judge_only = judge_only
        self._facts: Mapping[str, _ProxyFacts] = {p.name: _ProxyFacts.of(policy, p) for p in policy.proxies}
        self.observer: Callable[[HttpRequest, Decision], None] | None = None
        """Sees every serving decision before it is answered (the shadow policy schedules its own check)."""

    async def check(self, request: HttpRequest, explain: bool = False) -> Decision:
        """Decide one request; the decision names this authorizer's policy digest.

        With ``explain`` the decision carries every rule's outcome and reason
        (``extauthz explain``); serving traffic skips formatting them. Once
        decided, a serving decision is shown to :attr:`observer` (the shadow
        policy), which must not block: the answer has not been sent yet.
        """
        decision = await self._decide(request, explain, new_decision_id())
        if self.observer is not None and not explain:
            self.observer(request, decision)
        return decision

    def judge(self, request: HttpRequest, decision_id: str, verified: Verified | None = None,
              ) -> Coroutine[Any, Any, Decision]:
        """Decide ``request`` again, as the decision ``decision_id`` (a shadow policy beside the active one).

        ``verified``: the claims the active policy verified for this request,
        used as they are by a proxy whose token sources and trusted providers
        they were verified under (no second token lookup or verification).
        """
        return self._decide(request, False, decision_id, verified)

    async def _decide(self, request: HttpRequest, explain: bool, decision_id: str,
                      verified: Verified | None = None) -> Decision:
        check = self._admit(request, decision_id)
        if isinstance(check, Decision):
            return check
        identity = await self._identify(check, verified)
        if isinstance(identity, Decision):
            return identity
        claims, found = identity
        verdict = await evaluate(check.proxy, request, claims, self.relationships, explain, check.facts.rules)
        if not explain and verdict.trace:
            verdict = Verdict(verdict.effect, verdict.rule, ())
        return self._respond(check, claims, found, verdict)

    def _admit(self, request: HttpRequest, decision_id: str) -> _Check | Decision:
        """Admission: which proxy decides, and can the request be read unambiguously at all."""
        if request.host_name is None:
            return Decision(False, 400, Code.BAD_REQUEST, f"host {request.host!r} has no single reading", decision_id,
                            policy=self.policy.digest)
        proxy = select_proxy(self.policy, request)
        if proxy is None:
            return Decision(False, 403, Code.NO_POLICY, "no proxy matches this request "
                            f"(context proxy={request.context.get('proxy')!r}, route proxy={request.route_proxy!r}, "
                            f"host={request.host!r})",
                            decision_id, policy=self.policy.digest)
        views = request.views
        if views is None:
            return Decision(False, 400, Code.BAD_REQUEST, "the path or a method override has no single reading "
                            f"({request.method} {request.path!r})", decision_id, proxy.name,
                            policy=self.policy.digest)
        facts = self._facts[proxy.name]
        for view in views:
            if view.method in REFUSED_METHODS or (
                view.method not in STANDARD_METHODS and view.method not in facts.named_methods
            ):
                return Decision(False, 405, Code.METHOD_NOT_ALLOWED,
                                f"method {view.method} is refused unless a rule names it", decision_id, proxy.name,
                                policy=self.policy.digest)
        return _Check(request, views, decision_id, proxy, facts)

    async def _identify(self, check: _Check, verified: Verified | None = None,
                        ) -> tuple[Claims, FoundToken | None] | Decision:
        """Identity: a public path (anonymous, but the sidecar's headers still enforced) or a verified token."""
        proxy = check.proxy
        for public in proxy.public_paths:
            if all((public.methods is None or method_matches(public.methods, v.method)) and public.path.search(v.path)
                   for v in check.views):
                return self._allow(check, ANONYMOUS, None, f"public path {public.path.source!r}", forward_token=True)
        if verified is not None and proxy.name in verified.proxies:
            return verified.claims, None
        found = find_token(check.request, check.facts.stripping.sources)
        if found is None:
            authorization_header.missed(check.facts.stripping.token_headers, check.request.headers)
            return self._unauthenticated(check, TokenError(Code.TOKEN_MISSING, "no token in request"))
        if not authorization_header.seen:
            authorization_header.saw(check.request.headers)
        try:
            return await self.verifier.verify(found.token, proxy.providers), found
        except TokenError as error:
            return self._unauthenticated(check, error)

    def _respond(self, check: _Check, claims: Claims, found: FoundToken | None, verdict: Verdict) -> Decision:
        """Response: the verdict as Envoy's answer (a monitored deny is an allow that says so)."""
        proxy, rule = check.proxy, verdict.rule
        why = check.facts.reasons[rule.index if rule else None]
        if verdict.effect is Effect.DENY and proxy.mode is not Mode.MONITOR:
            return Decision(False, 403, Code.FORBIDDEN, why, check.decision_id, proxy.name, rule, claims,
                            trace=verdict.trace, policy=self.policy.digest)
        # Monitor mode: a deny is allowed, but counted and logged as would_deny.
        return self._allow(check, claims, found, why,
                           forward_token=self.policy.providers[claims.provider].forward_token, verdict=verdict)

    def _allow(
        self, check: _Check, claims: Claims, found: FoundToken | None, why: str, forward_token: bool,
        verdict: Verdict | None = None,
    ) -> Decision:
        proxy = check.proxy
        metadata: Mapping[str, Any] = _NO_METADATA
        filtered = False
        if proxy.filters and (not check.facts.static_scopes or any(
                request_in_scope(f, *self._scope(check), _NO_VALUES) for f in proxy.filters)):
            # A filter may apply: the response phase needs the hand-off. Otherwise Envoy skips it (no metadata).
            sample = self._judge_only
            if sample is not None and check.facts.static_scopes:  # judging: in scope is all there is to know
                return self._judged(check, claims, why, verdict, sample)
            handoff = self._handoff(check, claims)
            filtered = any(request_in_scope(f, handoff.methods, handoff.paths, handoff.filter_values[f.index])
                           for f in proxy.filters)
            if filtered and sample is not None:
                return self._judged(check, claims, why, verdict, sample, handoff)
            if filtered:
                encoded = handoff.encoded()
                if encoded is None:
                    # Never allowed without it: the response phase would block the answer (no verified
                    # request) only after the upstream had acted on the request.
                    return Decision(False, 414, Code.URI_TOO_LONG,
                                    f"{why}, but the response phase's hand-off would exceed {MAX_ENCODED_BYTES} "
                                    f"bytes (path of {len(check.request.path)} characters, "
                                    f"{len(handoff.paths)} readings)", check.decision_id, proxy.name,
                                    verdict.rule if verdict else None, claims, policy=self.policy.digest)
                metadata = encoded
        mutations = (upstream_mutations(check.request, claims, found, forward_token, check.facts.stripping, filtered)
                     if self._judge_only is None else _NO_MUTATIONS)
        monitored = verdict is not None and verdict.effect is Effect.DENY
        return Decision(True, 200, Code.WOULD_DENY if monitored else Code.ALLOWED, why, check.decision_id,
                        proxy.name, verdict.rule if verdict else None, claims, mutations,
                        metadata=metadata, monitored=monitored,
                        trace=verdict.trace if verdict else (), policy=self.policy.digest)

    def _judged(self, check: _Check, claims: Claims, why: str, verdict: Verdict | None,
                sample: Callable[[], bool], handoff: Handoff | None = None) -> Decision:
        """A judging authorizer's allow where a filter applies: the hand-off's fields only if sampled."""
        metadata = FILTERED
        if sample():
            metadata = (handoff or self._handoff(check, claims)).to_metadata()
        monitored = verdict is not None and verdict.effect is Effect.DENY
        return Decision(True, 200, Code.WOULD_DENY if monitored else Code.ALLOWED, why, check.decision_id,
                        check.proxy.name, verdict.rule if verdict else None, claims, metadata=metadata,
                        monitored=monitored, policy=self.policy.digest)

    @staticmethod
    def _scope(check: _Check) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The request's methods and paths over all its readings, as filter scopes see them."""
        views = check.views
        if len(views) == 1:
            return (views[0].method,), (views[0].path,)
        return tuple(dict.fromkeys(v.method for v in views)), tuple(dict.fromkeys(v.path for v in views))

    def _handoff(self, check: _Check, claims: Claims) -> Handoff:
        """What the response phase needs: the request's readings and each filter's variables.

        A variable whose value differs between readings of the request is left
        out (unresolved), so the filter resolves towards showing less; so is one
        too long to bind, which a pattern reads as unresolved all the same.
        """
        views = check.views
        values: list[dict[str, str]] = []
        for flt in check.proxy.filters:
            # A value over MAX_VALUE_LENGTH binds as unresolved: handing it over would only repeat the path.
            if len(views) == 1:  # most requests: nothing to compare
                values.append({k: v for k, v in resolve(flt.variables, views[0], claims).items()
                               if len(v) <= MAX_VALUE_LENGTH})
                continue
            per_view = [resolve(flt.variables, view, claims) for view in views]
            values.append({k: v for k, v in per_view[0].items()
                           if len(v) <= MAX_VALUE_LENGTH and all(o.get(k) == v for o in per_view[1:])})
        methods, paths = self._scope(check)
        return Handoff(
            decision_id=check.decision_id, proxy=check.proxy.name, policy=self.policy.digest,
            methods=methods, paths=paths, host=check.request.host_name or "", filter_values=tuple(values),
        )

    def _unauthenticated(self, check: _Check, error: TokenError) -> Decision:
        decision_id, proxy = check.decision_id, check.proxy
        if error.status != 401:
            return Decision(False, error.status, error.code, error.reason, decision_id, proxy.name,
                            policy=self.policy.digest)
        challenge = 'Bearer realm="extauthz"'
        if error.rfc6750_error:
            challenge += f', error="{error.rfc6750_error}"'
        code = Code.TOKEN_MISSING if error.code == Code.TOKEN_MISSING else Code.INVALID_TOKEN
        return Decision(False, 401, code, f"{error.code}: {error.reason}", decision_id, proxy.name,
                        www_authenticate=challenge, mutations=Mutations(), policy=self.policy.digest)
