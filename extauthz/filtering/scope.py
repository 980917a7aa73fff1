"""Decide at response headers what happens to a body: stream it, buffer and filter it, or block it.

Deciding on headers is what keeps buffering rare: only a response that a
filter applies to is buffered (the adapter asks Envoy for the body with a
``mode_override``); everything else streams through untouched. Responses that
a filter applies to but that could never be filtered (not JSON, an unknown
content-encoding, a declared length over the limit) are blocked here, before a
single body byte is buffered.

Identity comes only from the Check phase (ext_authz dynamic metadata, which a
client cannot write), never from response or request headers.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

from extauthz.core.claims import Claims
from extauthz.filtering.codec import content_encodings, unsupported
from extauthz.filtering.engine import BoundFilter, bind
from extauthz.policy.model import Filter, Policy, VariableSource

_EMPTY: Mapping[str, str] = MappingProxyType({})

# Headers that describe the upstream's bytes and would be wrong (or tell-tale) after filtering.
REPRESENTATION_HEADERS = ("content-encoding", "etag", "content-md5", "digest", "content-digest", "repr-digest")


@dataclass(frozen=True)
class Caller:
    """The verified identity the Check phase handed over through Envoy dynamic metadata."""

    decision_id: str
    proxy: str
    policy_digest: str
    claims: Mapping[str, Any]
    filter_variables: tuple[Mapping[str, str], ...] = ()

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any]) -> Caller | None:
        """Read the authorizer's metadata (see ``Authorizer._metadata``); None when it is not there.

        Numbers went through a protobuf Struct (all doubles), so integral floats
        are turned back into ints: a claim ``"tier": 2`` must still spell ``2``.
        """
        proxy = data.get("proxy")
        if not isinstance(proxy, str) or not proxy:
            return None
        raw_claims = data.get("claims")
        claims = _ints(raw_claims) if isinstance(raw_claims, Mapping) else {}
        variables: list[Mapping[str, str]] = []
        raw_variables = data.get("filterVariables")
        for entry in raw_variables if isinstance(raw_variables, list) else []:
            values = entry if isinstance(entry, Mapping) else {}
            variables.append(MappingProxyType({str(k): v for k, v in values.items() if isinstance(v, str)}))
        return cls(
            decision_id=str(data.get("decisionId") or ""),
            proxy=proxy,
            policy_digest=str(data.get("policy") or ""),
            claims=claims,
            filter_variables=tuple(variables),
        )


def _ints(value: Any) -> Any:
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, Mapping):
        return {str(k): _ints(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_ints(v) for v in value]
    return value


@dataclass(frozen=True)
class ResponseHead:
    """What the response-headers message tells about one exchange (all from Envoy, none from the client)."""

    method: str
    path: str
    """Without the query string, as rules and filter scopes match it."""
    status: int
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    """Lower-case names."""
    host: str = ""
    end_of_stream: bool = False
    from_upstream: bool = True
    """False for a reply Envoy generated itself (a denial, an error): it holds no upstream data."""


class Action(StrEnum):
    PASS = "pass"  # noqa: S105 - an action, not a password
    """Not ours to filter: headers and body stream through unbuffered."""
    BUFFER = "buffer"
    """Ask Envoy for the whole body, then filter it."""
    BLOCK = "block"
    """A filter applies but the response cannot be filtered: 502, nothing of it reaches the client."""
    STRIP_LENGTH = "strip_length"
    """A body-less response (HEAD) whose content-length would tell the unfiltered size."""


@dataclass(frozen=True)
class Plan:
    action: Action
    proxy: str = ""
    decision_id: str = ""
    filters: tuple[BoundFilter, ...] = ()
    encodings: tuple[str, ...] = ()
    limit: int = 0
    declared_length: int | None = None
    """The upstream's content-length (already checked against the limit), None for chunked bodies."""
    code: str = ""
    detail: str = ""


def filter_values(flt: Filter, caller: Caller | None, policy: Policy, head: ResponseHead) -> Mapping[str, str]:
    """The variable values the Check phase resolved for this filter.

    If the policy was reloaded since that Check (the digest differs), the old
    values may belong to a different filter at this index, so they are rebuilt
    from what is still trustworthy: ``jwtClaim`` variables from the verified
    claims, the built-ins ``sub``/``method``/``host``/``path`` from the claims and
    Envoy's view of the request. Header, query and path-segment variables stay
    unresolved, which makes the operations that use them restrictive.
    """
    if caller is None:
        return _EMPTY
    if caller.policy_digest == policy.digest and flt.index < len(caller.filter_variables):
        return caller.filter_variables[flt.index]
    claims = Claims.of(caller.claims)
    values = {"method": head.method, "host": head.host, "path": head.path}
    if claims.sub is not None:
        values["sub"] = claims.sub
    for variable in flt.variables:
        value = claims.lookup(variable.key) if variable.source is VariableSource.JWT_CLAIM else None
        if value is None:
            values.pop(variable.name, None)
        else:
            values[variable.name] = value
    return values


def in_scope(flt: Filter, head: ResponseHead, values: Mapping[str, str]) -> bool:
    """Does this filter apply to this response? A path scope with an unresolved variable does (fail closed)."""
    if flt.methods is not None and head.method not in flt.methods:
        return False
    if flt.statuses is not None and head.status not in flt.statuses:
        return False
    if flt.path is not None:
        compiled = flt.path.bind(values)
        if compiled is not None and compiled.search(head.path) is None:
            return False
    return True


def is_json(content_type: str | None) -> bool:
    """``application/json`` or any ``+json`` media type, parameters ignored."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def plan(policy: Policy, caller: Caller | None, head: ResponseHead) -> Plan:
    """What to do with this response, decided on its headers alone."""
    if not head.from_upstream:
        return Plan(Action.PASS)
    proxy = policy.proxy_named(caller.proxy) if caller is not None else None
    if proxy is None:
        # No verified identity for this exchange (ext_authz did not run, or its proxy
        # is gone after a reload): any filter that might apply blocks it.
        for candidate in (f for p in policy.proxies for f in p.filters):
            if in_scope(candidate, head, _EMPTY):
                return Plan(Action.BLOCK, caller.proxy if caller else "", caller.decision_id if caller else "",
                            code="no_identity", detail="no verified identity for a filtered response")
        return Plan(Action.PASS)
    filters: list[BoundFilter] = []
    for flt in proxy.filters:
        values = filter_values(flt, caller, policy, head)
        if in_scope(flt, head, values):
            filters.append(bind(flt, values))
    assert caller is not None
    base = Plan(Action.PASS, proxy.name, caller.decision_id)
    if not filters:
        return base
    limit = policy.server.max_body_bytes
    if head.end_of_stream:
        if head.method == "HEAD" and "content-length" in head.headers:
            return Plan(Action.STRIP_LENGTH, proxy.name, caller.decision_id)
        return base
    encodings = content_encodings(head.headers.get("content-encoding"))
    bad = unsupported(encodings)
    if bad is not None:
        return Plan(Action.BLOCK, proxy.name, caller.decision_id, code="unsupported_encoding",
                    detail=f"content-encoding {bad!r} cannot be decoded")
    if not is_json(head.headers.get("content-type")):
        return Plan(Action.BLOCK, proxy.name, caller.decision_id, code="not_json",
                    detail=f"content-type {head.headers.get('content-type')!r} is not JSON")
    declared = head.headers.get("content-length", "").strip()
    length = int(declared) if declared.isdigit() else None
    if length is not None and length > limit:
        return Plan(Action.BLOCK, proxy.name, caller.decision_id, code="too_large",
                    detail=f"content-length {declared} exceeds the limit of {limit}")
    return Plan(Action.BUFFER, proxy.name, caller.decision_id, tuple(filters), encodings, limit, length)
