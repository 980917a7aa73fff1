"""The pipeline (proxy -> identity -> authorization -> response) on the pure core."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import pytest

from extauthz.core.authorizer import Authorizer
from extauthz.core.decision import Decision
from extauthz.core.request import HttpRequest
from extauthz.demo.idp import SigningKey
from extauthz.identity.verifier import TokenCache, Verifier
from extauthz.policy.loader import parse_policy

KEY = SigningKey()
ISSUER = "https://idp.test"

POLICY = f"""
providers:
  - name: idp
    issuer: {ISSUER}
    audiences: [api]
    jwks: {json.dumps({"keys": [KEY.jwk]})}
proxies:
  - name: orders
    hosts: [orders.example.com]
    publicPaths: [{{pattern: "^/healthz$", methods: [GET]}}]
    upstream:
      targetCredential: {{header: x-api-key, env: EXTAUTHZ_TEST_KEY}}
      identityHeaders: {{x-auth-sub: "{{{{sub}}}}", x-auth-org: "{{{{org.id}}}}"}}
    rules: [{{effect: allow, path: {{path: {{pattern: "^/orders"}}}}}}]
  - name: billing
    default: true
    mode: monitor
    rules: [{{effect: deny, path: {{path: {{pattern: "^/secret"}}}}}}, {{effect: allow}}]
"""


def token(**claims: Any) -> str:
    return KEY.sign({"iss": ISSUER, "aud": "api", "exp": int(time.time()) + 60, **claims})


def check(method: str, target: str, headers: dict[str, str] | None = None,
          context: dict[str, str] | None = None, host: str = "", explain: bool = True,
          policy: str = POLICY) -> Decision:
    import os
    os.environ["EXTAUTHZ_TEST_KEY"] = "k-123"
    parsed = parse_policy(policy)

    async def main() -> Decision:
        async with httpx.AsyncClient() as client:
            verifier = Verifier(parsed.providers, client, TokenCache(10, 60))
            return await Authorizer(parsed, verifier).check(
                HttpRequest.from_target(method, target, headers=headers or {}, context=context or {}, host=host),
                explain=explain)

    return asyncio.run(main())


def bearer(**claims: Any) -> dict[str, str]:
    return {"authorization": f"Bearer {token(**claims)}"}


def test_context_extension_picks_the_proxy() -> None:
    d = check("GET", "/orders", bearer(sub="u"), {"proxy": "orders"})
    assert (d.allowed, d.proxy) == (True, "orders")


def test_unknown_context_proxy_never_falls_back() -> None:
    d = check("GET", "/orders", bearer(sub="u"), {"proxy": "nope"})
    assert (d.allowed, d.status, d.code) == (False, 403, "no_policy")


def test_host_then_default_picks_the_proxy() -> None:
    assert check("GET", "/orders", bearer(sub="u"), host="orders.example.com:443").proxy == "orders"
    assert check("GET", "/orders", bearer(sub="u"), host="other.example.com").proxy == "billing"


def test_public_path_skips_authentication_but_not_method_scope() -> None:
    d = check("GET", "/healthz", {"x-auth-sub": "spoof"}, {"proxy": "orders"})
    assert d.allowed and d.code == "allowed"
    assert "x-auth-sub" in d.mutations.remove_headers
    assert check("POST", "/healthz", context={"proxy": "orders"}).status == 401


def test_allow_mutations() -> None:
    d = check("GET", "/orders", bearer(sub="u-1", org={"id": "o-9"}), {"proxy": "orders"})
    assert dict(d.mutations.set_headers) == {
        "x-api-key": "k-123", "x-auth-sub": "u-1", "x-auth-org": "o-9",
        "x-extauthz-unfiltered": "1",  # no filter applies: Envoy opens no ext_proc stream
    }
    assert d.mutations.remove_headers == ("authorization",)
    assert d.metadata == {}  # no filter anywhere in the policy: the response phase has nothing to look up


def test_the_handoff_carries_the_request_view_filters_need_never_the_claims() -> None:
    policy = POLICY.replace("    rules: [{effect: allow, path: {path: {pattern: \"^/orders\"}}}]",
                            "    rules: [{effect: allow, path: {path: {pattern: \"^/orders\"}}}]\n"
                            "    filters: [{path: {pattern: \"^/orders/reports\"}, defaultFilterOperation: retain}]", 1)
    assert policy != POLICY
    d = check("GET", "/orders/reports", bearer(sub="u-1"), {"proxy": "orders"}, policy=policy)
    assert d.metadata["proxy"] == "orders" and d.metadata["paths"] == ["/orders/reports"]
    assert d.metadata["decisionId"] == d.decision_id
    assert "claims" not in d.metadata  # the response phase gets resolved values, never the claim set
    assert "x-extauthz-unfiltered" in d.mutations.remove_headers  # a filter applies: Envoy runs ext_proc


def test_no_handoff_where_no_filter_applies() -> None:
    """The response phase is skipped for such requests (the marker), so nothing is handed to it."""
    policy = POLICY.replace("    rules: [{effect: allow, path: {path: {pattern: \"^/orders\"}}}]",
                            "    rules: [{effect: allow, path: {path: {pattern: \"^/orders\"}}}]\n"
                            "    filters: [{path: {pattern: \"^/orders/reports\"}, defaultFilterOperation: retain}]", 1)
    d = check("GET", "/orders", bearer(sub="u-1"), {"proxy": "orders"}, policy=policy)
    assert d.allowed and d.metadata == {}
    assert dict(d.mutations.set_headers)["x-extauthz-unfiltered"] == "1"


def test_identity_header_with_unsafe_value_is_removed_not_forwarded() -> None:
    d = check("GET", "/orders", bearer(sub="u\r\nx-admin: 1"), {"proxy": "orders"})
    assert "x-auth-sub" in d.mutations.remove_headers
    assert "x-auth-sub" not in dict(d.mutations.set_headers)


def test_monitor_mode_allows_what_it_would_deny_and_says_so() -> None:
    d = check("GET", "/secret", bearer(sub="u"), {"proxy": "billing"})
    assert d.allowed and d.monitored and d.rule is not None and d.rule.index == 0


def test_monitor_mode_still_requires_a_valid_token() -> None:
    assert check("GET", "/secret", context={"proxy": "billing"}).status == 401


def test_trace_explains_each_rule() -> None:
    d = check("GET", "/nope", bearer(sub="u"), {"proxy": "orders"})
    assert not d.allowed and d.reason == "default deny"
    (entry,) = d.trace
    assert entry.outcome.value == "not matched" and "does not match '^/orders'" in entry.reason


@pytest.mark.parametrize(("target", "context"), [("/nope", "orders"), ("/orders/1", "orders"), ("/secret", "billing")])
def test_serving_decides_as_explain_does_without_formatting_a_trace(target: str, context: str) -> None:
    explained = check("GET", target, bearer(sub="u"), {"proxy": context})
    served = check("GET", target, bearer(sub="u"), {"proxy": context}, explain=False)
    assert explained.trace and not served.trace
    assert (served.allowed, served.status, served.code, served.reason, served.rule, served.monitored) == \
        (explained.allowed, explained.status, explained.code, explained.reason, explained.rule, explained.monitored)


def test_look_alike_spellings_of_owned_headers_are_stripped() -> None:
    """``x_auth_sub`` reads as ``X-Auth-Sub`` to CGI/WSGI servers, even where Envoy lets it through."""
    headers = {**bearer(sub="u-1"), "x_auth_sub": "admin", "x_api_key": "mine", "x_other": "kept"}
    d = check("GET", "/orders", headers, {"proxy": "orders"})
    assert d.allowed
    assert {"x_auth_sub", "x_api_key"} <= set(d.mutations.remove_headers)
    assert "x_other" not in d.mutations.remove_headers


@pytest.mark.parametrize("host", ["ORDERS.example.com", "orders.example.com.", "orders.example.com.:8443"])
def test_host_spellings_pick_the_same_proxy(host: str) -> None:
    assert check("GET", "/orders", bearer(sub="u"), host=host).proxy == "orders"


@pytest.mark.parametrize("host", ["orders.example.com@evil", "orders..example.com", "orders.example.com:x"])
def test_a_host_without_a_single_reading_is_refused(host: str) -> None:
    d = check("GET", "/orders", bearer(sub="u"), host=host)
    assert (d.allowed, d.status, d.code) == (False, 400, "bad_request")


@pytest.mark.parametrize("method, target, status", [
    ("TRACE", "/orders", 405), ("PROPFIND", "/orders", 405), ("GET", "/orders%00", 400),
    ("POST", "/orders?_method=TRACE", 405), ("GET", "/healthz%2F..%2Forders", 403),
])
def test_methods_and_paths_that_cannot_be_decided_safely_are_refused(method: str, target: str, status: int) -> None:
    d = check(method, target, bearer(sub="u"), {"proxy": "orders"})
    assert (d.allowed, d.status) == (False, status)
