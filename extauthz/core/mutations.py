"""Upstream header mutations on allow (POLICY §5).

The caller's token is removed (unless the provider forwards it), the target
credential is set, identity headers are set from verified claims, and every
identity header the sidecar owns is overwritten or removed, so a client-sent copy
can never reach the upstream.
"""

from __future__ import annotations

from extauthz.core.claims import Claims
from extauthz.core.decision import Mutations
from extauthz.core.request import HttpRequest
from extauthz.identity.tokens import FoundToken, without_cookie
from extauthz.policy.model import Proxy


def upstream_mutations(
    proxy: Proxy, request: HttpRequest, claims: Claims, token: FoundToken | None, forward_token: bool
) -> Mutations:
    set_headers: dict[str, str] = {}
    remove: list[str] = []
    remove_query: list[str] = []
    if token is not None and not forward_token:
        source = token.source
        if source.header:
            remove.append(source.header)
        elif source.cookie:
            rest = without_cookie(request.headers.get("cookie", ""), source.cookie)
            if rest:
                set_headers["cookie"] = rest
            else:
                remove.append("cookie")
        elif source.query:
            remove_query.append(source.query)
    credential = proxy.upstream.target_credential
    if credential is not None:
        set_headers[credential.header] = credential.prefix + credential.value
    for header in proxy.upstream.identity_headers:
        claim_values = {n: v for n in header.value.variables if (v := claims.lookup(n)) is not None}
        value = header.value.render(claim_values)
        if value is None or not _safe_header_value(value):
            remove.append(header.name)
        else:
            set_headers[header.name] = value
    # A header being set is overwritten; removing it as well could drop the new value.
    remove = [h for h in dict.fromkeys(remove) if h not in set_headers]
    return Mutations(tuple(set_headers.items()), tuple(remove), tuple(remove_query))


def _safe_header_value(value: str) -> bool:
    return all(c == "\t" or 0x20 <= ord(c) < 0x7F or ord(c) > 0x9F for c in value)
