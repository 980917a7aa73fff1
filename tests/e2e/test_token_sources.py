"""Tokens from a cookie or a query parameter: verified, then never forwarded upstream.

On both ext_authz transports. Envoy's HTTP ext_authz client cannot remove query
parameters, so where gRPC strips a token from the query string the HTTP
transport denies the request (400 ``query_token_refused``): either way the token
never reaches the upstream.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.e2e.stack import TRANSPORTS, Stack, running_stack

POLICY = """
providers:
  - name: idp
    issuer: ISSUER
    jwksUri: JWKS_URI
    audiences: [orders-api]
    from:
      - {header: x-api-token}
      - {cookie: session}
      - {query: access_token}
  - name: forwarded
    issuer: https://forwarding.example
    jwksUri: JWKS_URI
    audiences: [orders-api]
    forwardToken: true
proxies:
  - name: orders-api
    providers: [idp]
    rules:
      - {effect: allow, token: [{claim: {pattern: "^sub$"}, value: {pattern: "^user-"}}]}
"""


@pytest.fixture(scope="module", params=TRANSPORTS)
def stack(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp(f"sources-{request.param}"), POLICY, transport=request.param) as s:
        yield s


def query_refused(stack: Stack) -> bool:
    """Must a request whose query string holds a token be denied rather than stripped?"""
    return stack.transport == "http"


def test_header_without_prefix(stack: Stack) -> None:
    token = stack.idp.token(sub="user-1")
    assert stack.request("GET", "/x", headers={"x-api-token": token}).status == 200
    assert "x-api-token" not in stack.last_upstream_request()["headers"]


def test_cookie_token_is_removed_and_other_cookies_kept(stack: Stack) -> None:
    token = stack.idp.token(sub="user-1")
    r = stack.request("GET", "/x", headers={"cookie": f"theme=dark; session={token}; lang=en"})
    assert r.status == 200
    assert stack.last_upstream_request()["headers"]["cookie"] == "theme=dark; lang=en"


def test_cookie_only_token_removes_the_cookie_header(stack: Stack) -> None:
    r = stack.request("GET", "/x", headers={"cookie": f"session={stack.idp.token(sub='user-1')}"})
    assert r.status == 200
    assert "cookie" not in stack.last_upstream_request()["headers"]


def test_query_token_is_removed_from_the_upstream_url(stack: Stack) -> None:
    token = stack.idp.token(sub="user-1")
    before = len(stack.upstream.requests)
    r = stack.request("GET", f"/x?page=2&access_token={token}")
    if query_refused(stack):
        assert (r.status, r.json()["error"]) == (400, "query_token_refused")
        assert len(stack.upstream.requests) == before
        return
    assert r.status == 200
    assert stack.last_upstream_request()["path"] == "/x?page=2"


def test_a_query_string_without_a_token_reaches_the_upstream_as_sent(stack: Stack) -> None:
    r = stack.request("GET", "/x?page=2&sort=asc", headers={"x-api-token": stack.idp.token(sub="user-1")})
    assert r.status == 200
    assert stack.last_upstream_request()["path"] == "/x?page=2&sort=asc"


def test_authorization_header_is_not_a_source_here(stack: Stack) -> None:
    assert stack.request("GET", "/x", stack.idp.token(sub="user-1")).status == 401


def test_untrusted_provider_of_another_proxy_is_refused(stack: Stack) -> None:
    token = stack.idp.token(sub="user-1", iss="https://forwarding.example")
    assert stack.request("GET", "/x", headers={"x-api-token": token}).status == 401


@pytest.mark.parametrize("target, headers", [
    ("/x?access_token={other}", {"x-api-token": "{token}"}),
    ("/x?access%5Ftoken={other}&keep=1", {"x-api-token": "{token}"}),
    ("/x?%61ccess_token={other}&ACCESS_TOKEN={other}", {"x-api-token": "{token}"}),
    ("/x?access_token={token}&access_token={other}", {}),
    ("/x", {"x-api-token": "{token}", "cookie": "session={other}; Session={other}; theme=dark"}),
    ("/x", {"cookie": "session={token}", "x_api_token": "{other}"}),
])
def test_every_token_source_is_stripped_not_only_the_one_used(
    stack: Stack, target: str, headers: dict[str, str],
) -> None:
    """A second token (any source, any spelling of its name) is one the sidecar never verified."""
    token, other = stack.idp.token(sub="user-1"), stack.idp.token(sub="user-2")
    fill = {"token": token, "other": other}
    before = len(stack.upstream.requests)
    r = stack.request("GET", target.format(**fill), headers={k: v.format(**fill) for k, v in headers.items()})
    if "?" in target and query_refused(stack):
        assert (r.status, r.json()["error"]) == (400, "query_token_refused"), r.body
        assert len(stack.upstream.requests) == before
        return
    assert r.status == 200, r.body
    seen = stack.last_upstream_request()
    upstream_bytes = seen["path"] + repr(seen["headers"])
    assert token not in upstream_bytes and other not in upstream_bytes, seen
    if "keep=1" in target:
        assert "keep=1" in seen["path"]
    if "theme=dark" in headers.get("cookie", ""):
        assert seen["headers"]["cookie"] == "theme=dark"


def test_a_token_signed_by_a_key_published_since_start_is_verified_at_once(stack: Stack) -> None:
    """The Check fetches the key set itself when a token names a key it has not seen (a rotation at the
    IdP): on every transport, not only once the periodic refresh has run. The HTTP transport, whose Check
    starts outside a task, used to fail that fetch and answer 401 until the refresh."""
    new_key = stack.idp.rotate()  # the old key stays published: the module's other tests are unaffected
    r = stack.request("GET", "/v1/orders", headers={"x-api-token": stack.idp.token(sub="user-1", key=new_key)})
    assert r.status == 200, r.body
    assert "jwks_fetch_failed" not in (stack.workdir / "sidecar.log").read_text()
