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
from collections.abc import Iterable
from dataclasses import dataclass

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

    @classmethod
    def of(cls, proxy: Proxy, sources: Iterable[TokenSource]) -> Stripping:
        sources = tuple(sources)
        token_headers = frozenset(s.header for s in sources if s.header)
        owned = set(token_headers) | {h.name for h in proxy.upstream.identity_headers}
        if proxy.upstream.target_credential is not None:
            owned.add(proxy.upstream.target_credential.header)
        return cls(
            sources=sources,
            token_headers=token_headers,
            cookies=frozenset(s.cookie.lower() for s in sources if s.cookie),
            query=frozenset(s.query.lower() for s in sources if s.query),
            owned_headers=frozenset(owned),
        )


def upstream_mutations(
    proxy: Proxy, request: HttpRequest, claims: Claims, token: FoundToken | None, forward_token: bool,
    stripping: Stripping, filtered: bool,
) -> Mutations:
    set_headers: dict[str, str] = {} if filtered else {UNFILTERED_MARKER: "1"}
    kept = token.source if token is not None and forward_token else None
    remove = [h for h in stripping.token_headers if kept is None or h != kept.header]
    remove.extend(_look_alikes(request, stripping.owned_headers))
    if filtered:
        remove.extend((*(h for h in RANGE_HEADERS if h in request.headers), UNFILTERED_MARKER))
    if stripping.cookies and "cookie" in request.headers:
        keep_cookie = kept.cookie if kept is not None else ""
        rest = without_cookies(request.headers["cookie"], stripping.cookies - {keep_cookie.lower()})
        if rest is not None:
            if rest:
                set_headers["cookie"] = rest
            else:
                remove.append("cookie")
    remove_query: list[str] = []
    keep_query = kept.query.lower() if kept is not None else ""
    for name, spellings in (request.raw_query_names.items() if stripping.query and request.query_string else ()):
        lowered = name.lower()
        if lowered in stripping.query and lowered != keep_query:
            # Envoy removes by the name as it appears in the URL; send the decoded name too.
            remove_query.extend(dict.fromkeys((*spellings, name)))
    credential = proxy.upstream.target_credential
    if credential is not None:
        set_headers[credential.header] = credential.prefix + credential.value
    upstream = proxy.upstream
    if upstream.identity_headers:
        for name, value in claims.derived(upstream, _identity_values):
            if value is None:
                remove.append(name)
            else:
                set_headers[name] = value
    # A header being set is overwritten; removing it as well could drop the new value.
    if len(remove) > 1 or (remove and remove[0] in set_headers):
        remove = [h for h in dict.fromkeys(remove) if h not in set_headers]
    return Mutations(tuple(set_headers.items()), tuple(remove), tuple(remove_query))


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
