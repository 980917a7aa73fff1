"""``extauthz explain``: how a policy decides one request, rule by rule.

The decision comes from the very :meth:`Authorizer.check` the server runs; this
module only builds the request, supplies the identity and renders the
:class:`Decision` with its rule trace. The identity is either a real token
(verified with the provider's real keys: fetched offline, the live key sets over
the admin service) or claims, minted by :mod:`extauthz.toolbox.minting` against a
variant of the policy that differs only in its key source.

Nothing secret is printed: the target credential and forwarded cookies are
shown as placeholders, tokens never.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import httpx

from extauthz.core.authorizer import Authorizer
from extauthz.core.decision import Decision
from extauthz.core.request import HttpRequest
from extauthz.core.rules import Outcome, RelationshipResolver
from extauthz.identity.verifier import TokenCache, Verifier
from extauthz.policy.model import Policy
from extauthz.toolbox.minting import LocalIssuer, provider_for, with_token

HIDDEN_CREDENTIAL = "<targetCredential, hidden>"
HIDDEN_COOKIE = "<caller's other cookies, hidden>"


@dataclass(frozen=True)
class Identity:
    """Who the request is from: a real ``token``, ``claims`` to mint, or nobody."""

    token: str = ""
    claims: Mapping[str, Any] | None = None
    provider: str = ""
    expires_in: int = 3600

    @property
    def kind(self) -> str:
        return "claims" if self.claims is not None else ("token" if self.token else "none")


@dataclass(frozen=True)
class TraceLine:
    index: int
    effect: str
    priority: int
    outcome: str
    reason: str
    notes: str = ""


@dataclass(frozen=True)
class Explanation:
    allowed: bool
    status: int
    code: str
    reason: str
    proxy: str
    monitored: bool
    rule: int | None
    trace: tuple[TraceLine, ...]
    policy_digest: str
    sub: str | None
    provider: str
    upstream_headers: tuple[tuple[str, str], ...]
    removed_headers: tuple[str, ...]
    identity: str
    """none | token | claims"""

    @classmethod
    def of(cls, decision: Decision, policy: Policy, identity: str) -> Explanation:
        proxy = policy.proxy_named(decision.proxy)
        credential = proxy.upstream.target_credential if proxy else None
        headers = []
        for name, value in decision.mutations.set_headers:
            if credential is not None and name == credential.header:
                headers.append((name, HIDDEN_CREDENTIAL))
            elif name == "cookie":
                headers.append((name, HIDDEN_COOKIE))
            else:
                headers.append((name, value))
        return cls(
            allowed=decision.allowed, status=decision.status, code=decision.code, reason=decision.reason,
            proxy=decision.proxy, monitored=decision.monitored,
            rule=decision.rule.index if decision.rule else None,
            trace=tuple(
                TraceLine(t.rule.index, t.rule.effect.value, t.rule.priority, t.outcome.value, t.reason, t.rule.notes)
                for t in decision.trace
            ),
            policy_digest=decision.policy or policy.digest, sub=decision.sub, provider=decision.claims.provider,
            upstream_headers=tuple(headers) if decision.allowed else (),
            removed_headers=decision.mutations.remove_headers if decision.allowed else (),
            identity=identity,
        )

    @property
    def result(self) -> str:
        return "allow" if self.allowed else "deny"

    def summary(self) -> str:
        """``deny 403 forbidden rule #1``: what a test compares and prints."""
        rule = f"rule #{self.rule}" if self.rule is not None else ("default" if self.trace else "no rule")
        monitored = " (monitor mode: would deny)" if self.monitored else ""
        return f"{self.result} {self.status} {self.code} {rule}{monitored}"

    def render(self) -> str:
        verdict = "ALLOW" if self.allowed else "DENY"
        lines = [
            f"decision  {verdict} {self.status} {self.code}"
            + ("  (monitor mode: enforcement would deny)" if self.monitored else ""),
            f"reason    {self.reason}",
            f"proxy     {self.proxy or '-'}  (policy {self.policy_digest})",
        ]
        how = {"claims": "token minted from the given claims with a local key, then verified",
               "token": "the given token, verified with the provider's keys",
               "none": "no token given"}[self.identity]
        who = f"sub={self.sub}" if self.sub else "no sub"
        lines.append(f"identity  {who}" + (f" via provider {self.provider}" if self.provider else "") + f"  ({how})")
        if self.trace:
            lines.append("rules     in evaluation order (priority, then file order):")
            width = max(len(f"#{t.index}") for t in self.trace)
            for t in self.trace:
                mark = "->" if t.index == self.rule else "  "
                outcome = t.outcome.upper() if t.outcome == Outcome.MATCHED else t.outcome
                number = f"#{t.index}"
                lines.append(f"  {mark} {number:<{width}} {t.effect:<5} p{t.priority:<4} {outcome:<12} {t.reason}")
                if t.notes:
                    lines.append(f"     {'':<{width}} {'':<5} {'':<5} {'':<12} ({t.notes})")
            if self.rule is None:
                lines.append("          no rule decided: the proxy's defaultRuleEffect applies")
        else:
            lines.append("rules     not evaluated (" + (
                "public path" if self.allowed else "the request stopped before authorization") + ")")
        if self.allowed:
            for name, value in self.upstream_headers:
                lines.append(f"upstream  set    {name}: {value}")
            for name in self.removed_headers:
                lines.append(f"upstream  remove {name}")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        document = dataclasses.asdict(self)
        document["result"] = self.result
        document["upstream_headers"] = dict(self.upstream_headers)
        document["removed_headers"] = list(self.removed_headers)
        return document


def build_request(
    method: str, target: str, headers: Mapping[str, str] | None = None, host: str = "", proxy: str = "",
) -> HttpRequest:
    """The request as Envoy would hand it over: lower-case header names, ``proxy`` as context."""
    sent = {k.lower(): v for k, v in (headers or {}).items()}
    host = host or sent.get("host", sent.get(":authority", ""))
    return HttpRequest.from_target(
        method, target, host=host, headers=MappingProxyType(sent),
        context=MappingProxyType({"proxy": proxy} if proxy else {}),
    )


def parse_headers(values: Sequence[str]) -> dict[str, str]:
    """``-H 'name: value'`` arguments, curl style."""
    headers: dict[str, str] = {}
    for raw in values:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"a header is 'name: value', found {raw!r}")
        headers[name.strip().lower()] = value.strip()
    return headers


async def decide(
    policy: Policy,
    request: HttpRequest,
    identity: Identity,
    http: httpx.AsyncClient,
    relationships: RelationshipResolver | None = None,
    live: Authorizer | None = None,
) -> Explanation:
    """Decide ``request`` as the sidecar would and explain it.

    ``live`` is the running sidecar's authorizer (admin service): a real token is
    then verified with the live key sets. Claims always go through a variant of
    ``policy`` with a local key, so the live verifier is never taught a new key.
    """
    if identity.claims is not None or (not identity.token and live is None):
        # Claims, or no token at all: no key is needed from the network (offline, CI).
        issuer = LocalIssuer()
        variant = issuer.variant(policy)
        provider = provider_for(variant, request, identity.provider) if identity.claims is not None else None
        if provider is not None and identity.claims is not None:
            request = with_token(request, provider, issuer.mint(provider, identity.claims, identity.expires_in))
        return Explanation.of(await _offline_check(variant, request, http, relationships), policy, identity.kind)
    if identity.token:
        provider = provider_for(policy, request, identity.provider)
        if provider is not None:
            request = with_token(request, provider, identity.token)
    if live is not None:
        return Explanation.of(await live.check(request, explain=True), policy, identity.kind)
    return Explanation.of(await _offline_check(policy, request, http, relationships), policy, identity.kind)


async def _offline_check(
    policy: Policy, request: HttpRequest, http: httpx.AsyncClient, relationships: RelationshipResolver | None
) -> Decision:
    """One Check with a verifier of its own (no token cache: every explanation verifies afresh)."""
    verifier = Verifier(policy.providers, http, TokenCache(0, 0))
    try:  # closed however the check ends, a failed or cancelled start included
        await verifier.start()
        return await Authorizer(policy, verifier, relationships).check(request, explain=True)
    finally:
        await verifier.close()
