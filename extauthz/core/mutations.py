"""Upstream header mutations on allow (docs/policy.md, ``upstream``).

Nothing the caller sent that belongs to the sidecar reaches the upstream:

* every token source of the proxy's providers is stripped, not only the one
  the token was read from (a second token in a cookie or a query parameter,
  under any spelling of its name, is a token the sidecar never verified); the
  verified token stays only when its provider forwards it;
* every identity header the sidecar owns is overwritten or removed, and so is
  any look-alike spelling of it or of a token header (``x_auth_sub`` reads as
  ``X-Auth-Sub`` to CGI/WSGI servers);
* ``Range`` and ``If-Range`` are dropped when a response filter may apply, so
  the upstream answers with a whole document that can be filtered;
* :data:`UNFILTERED_MARKER` is set when no response filter can apply and
  removed otherwise, so Envoy skips the ext_proc stream for those responses
  only; a client-sent copy can neither skip nor force one, and a request that
  lost the header is filtered (fail closed).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import cast

from extauthz.core.claims import Claims
from extauthz.core.decision import Mutations
from extauthz.core.request import HttpRequest
from extauthz.core.tokens import FoundToken, without_cookies
from extauthz.policy.model import IdentityHeader, Proxy, TokenSource, Upstream

RANGE_HEADERS = ("range", "if-range")
UNFILTERED_MARKER = "x-extauthz-unfiltered"
"""Envoy skips its ext_proc filter when this request header is ``1`` (envoy/envoy.yaml)."""


@dataclass(frozen=True)
class Stripping:
    """Per proxy, computed once per policy: what a caller may have sent that must not go upstream."""

    sources: tuple[TokenSource, ...]
    token_headers: frozenset[str]
    cookies: frozenset[str]
    """Lower case: frameworks differ on cookie-name case, so every case is removed."""
    query: frozenset[str]
    """Lower case, decoded names."""
    owned_headers: frozenset[str]
    """Header names the sidecar sets or strips; their ``_`` spellings are look-alikes."""
    upstream: Upstream
    plans: Mapping[tuple[int, bool], _Plan] = field(default_factory=dict, compare=False, repr=False)
    """By (``id`` of the forwarded token's source, or of None; filtered): see :func:`upstream_mutations`."""

    @classmethod
    def of(cls, proxy: Proxy, sources: Iterable[TokenSource]) -> Stripping:
        sources = tuple(sources)
        token_headers = frozenset(s.header for s in sources if s.header)
        owned = set(token_headers) | {h.name for h in proxy.upstream.identity_headers}
        if proxy.upstream.target_credential is not None:
            owned.add(proxy.upstream.target_credential.header)
        stripping = cls(
            sources=sources,
            token_headers=token_headers,
            cookies=frozenset(s.cookie.lower() for s in sources if s.cookie),
            query=frozenset(s.query.lower() for s in sources if s.query),
            owned_headers=frozenset(owned),
            upstream=proxy.upstream,
        )
        plans = cast(dict[tuple[int, bool], _Plan], stripping.plans)
        for kept in (None, *sources):
            for filtered in (False, True):
                plans[(id(kept), filtered)] = _Plan(stripping, kept, filtered)
        return stripping


@dataclass(frozen=True, eq=False)
class _Plan:
    """The mutations' part that depends on the policy and the claims alone, remembered per verified token."""

    stripping: Stripping
    kept: TokenSource | None
    """The token source whose token is forwarded (its provider forwards tokens), or None."""
    filtered: bool
    _shared: dict[tuple[str, ...], tuple[str, ...]] = field(default_factory=dict, repr=False)

    def shared(self, value: tuple[str, ...]) -> tuple[str, ...]:
        """An equal tuple made earlier for this plan, else ``value`` (kept when there is room)."""
        found = self._shared.get(value)
        if found is not None:
            return found
        if len(self._shared) < _MAX_SHARED:
            self._shared[value] = value
        return value


_MAX_SHARED = 64
"""Tuples kept per plan: the constant ones are a handful; a per-caller value (x-auth-sub) fills the rest once."""


def upstream_mutations(
    request: HttpRequest, claims: Claims, token: FoundToken | None, forward_token: bool,
    stripping: Stripping, filtered: bool,
) -> Mutations:
    """What to change on the way upstream; computed once per verified token when the request adds nothing.

    Only a cookie or a query parameter that may hold a token, a look-alike of
    an owned header or (when filtered) a Range header make a request's
    mutations differ from those of any other request with the same token; most
    requests have none of them and reuse the ones made for their token.
    """
    kept = token.source if token is not None and forward_token else None
    plan = stripping.plans[(id(kept), filtered)]
    headers = request.headers
    if (stripping.cookies and "cookie" in headers) or (stripping.query and request.query_string) \
            or (filtered and ("range" in headers or "if-range" in headers)) \
            or (stripping.owned_headers and "_" in "".join(headers)):
        return _mutations(plan, claims, request)
    return claims.derived(plan, _token_mutations)


def _token_mutations(plan: _Plan, claims: Claims) -> Mutations:
    return _mutations(plan, claims, None)


def _mutations(plan: _Plan, claims: Claims, request: HttpRequest | None) -> Mutations:
    """The mutations for a request (None: one that sent no cookie, query token, look-alike or Range)."""
    stripping, kept, filtered = plan.stripping, plan.kept, plan.filtered
    set_headers: dict[str, str] = {} if filtered else {UNFILTERED_MARKER: "1"}
    remove = [h for h in stripping.token_headers if kept is None or h != kept.header]
    remove_query: list[str] = []
    if request is not None:
        remove.extend(_look_alikes(request, stripping.owned_headers))
    if filtered:
        if request is not None:
            remove.extend(h for h in RANGE_HEADERS if h in request.headers)
        remove.append(UNFILTERED_MARKER)
    if request is not None:
        if stripping.cookies and "cookie" in request.headers:
            keep_cookie = kept.cookie if kept is not None else ""
            rest = without_cookies(request.headers["cookie"], stripping.cookies - {keep_cookie.lower()})
            if rest is not None:
                if rest:
                    set_headers["cookie"] = rest
                else:
                    remove.append("cookie")
        keep_query = kept.query.lower() if kept is not None else ""
        for name, spellings in (request.raw_query_names.items() if stripping.query and request.query_string else ()):
            lowered = name.lower()
            if lowered in stripping.query and lowered != keep_query:
                # Envoy removes by the name as it appears in the URL; send the decoded name too.
                remove_query.extend(dict.fromkeys((*spellings, name)))
    upstream = stripping.upstream
    credential = upstream.target_credential
    if credential is not None:
        set_headers[credential.header] = credential.prefix + credential.value
    if upstream.identity_headers:
        # Remembered per token only where the mutations themselves are not (a request with its own additions).
        values = _identity_values(upstream, claims) if request is None else claims.derived(upstream, _identity_values)
        for name, value in values:
            if value is None:
                remove.append(name)
            else:
                set_headers[name] = value
    # A header being set is overwritten; removing it as well could drop the new value.
    if len(remove) > 1 or (remove and remove[0] in set_headers):
        remove = [h for h in dict.fromkeys(remove) if h not in set_headers]
    if request is not None:
        return Mutations(tuple(set_headers.items()), tuple(remove), tuple(remove_query))
    # Kept with the token for as long as it is cached: what every token of the plan has in common
    # (the headers removed, the marker, the credential) is kept once, not once per token.
    pairs = cast(tuple[tuple[str, str], ...], tuple(plan.shared(item) for item in set_headers.items()))
    return Mutations(pairs, plan.shared(tuple(remove)))


def _identity_values(upstream: Upstream, claims: Claims) -> tuple[tuple[str, str | None], ...]:
    return tuple((header.name, _rendered(header, claims)) for header in upstream.identity_headers)


def _rendered(header: IdentityHeader, claims: Claims) -> str | None:
    """The header's value for these claims; None (remove the header) when a claim is missing or unsafe."""
    claim_values = {n: v for n in header.value.variables if (v := claims.lookup(n)) is not None}
    value = header.value.render(claim_values)
    return value if value is not None and _safe_header_value(value) else None


def _look_alikes(request: HttpRequest, owned: frozenset[str]) -> list[str]:
    """Request headers that differ from an owned name only by ``_`` for ``-``."""
    if not owned:
        return []
    return [name for name in request.headers if "_" in name and name.replace("_", "-") in owned]


# Anything but tab, printable ASCII and non-control, non-surrogate Unicode: never put into a header.
_UNSAFE_IN_HEADER = re.compile("[^\t\x20-\x7e\xa0-\ud7ff\ue000-\U0010ffff]")


def _safe_header_value(value: str) -> bool:
    return _UNSAFE_IN_HEADER.search(value) is None
