"""Range, partial responses and HEAD on filtered routes, through real Envoy and a Range-honouring upstream.

The proxy has the allowlist filter of docs/response-filtering.md on ``/v1/orders``
(as written there: GET, status 200) and a denylist filter on ``/v1/ledger``
(everything but ``orders.internalRef``). The upstream honours ``Range`` and
answers HEAD with the full ``content-length``, so a ``Range`` that reached it, or
a partial answer that reached the client, would show the unfiltered document or
its size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.security.harness import (
    Seen,
    attack,
    docs_filter_example,
    filtered_view,
    is_blocked,
    label,
    leaked_document,
    lenient_stack,
    policy,
)
from tests.e2e.stack import Stack

pytestmark = pytest.mark.envoy

DENYLIST = {
    "methods": ["GET"],
    "path": {"pattern": "^/v1/ledger"},
    "defaultFilterOperation": "retain",
    "operations": [{"effect": "destroy", "jsonPath": {"pattern": "^orders\\.internalRef$"}}],
}
POLICY = policy({"name": "orders-api", "defaultRuleEffect": "allow", "filters": [docs_filter_example(), DENYLIST]})
SUB = "user-123"
VIEWS = {"/v1/orders": filtered_view(SUB), "/v1/ledger": filtered_view(SUB, allowlist=False)}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with lenient_stack(tmp_path_factory.mktemp("partial"), POLICY) as running:
        yield running


@pytest.fixture(scope="module")
def token(stack: Stack) -> str:
    return stack.idp.token(sub=SUB)


def _view(target: str) -> dict[str, Any]:
    return VIEWS["/v1/ledger" if target.startswith("/v1/ledger") else "/v1/orders"]


def _range_reached(seen: Seen) -> bool:
    return any(name in ("range", "if-range") for r in seen.upstream for name, _ in r["header_list"])


# --- 1. Range and partial responses -------------------------------------------------------------

RANGE = "1. Range / partial responses"

# (target, request headers, how the upstream misbehaves, what the caller must see)
PARTIAL: dict[str, tuple[str, list[tuple[str, str]], str, str]] = {
    "allowlist bytes=0-": ("/v1/orders", [("range", "bytes=0-")], "", "filtered"),
    "allowlist bytes=10-50": ("/v1/orders", [("range", "bytes=10-50")], "", "filtered"),
    "allowlist suffix bytes=-20": ("/v1/orders", [("range", "bytes=-20")], "", "filtered"),
    "allowlist multi-range": ("/v1/orders", [("range", "bytes=0-10,20-30,40-")], "", "filtered"),
    "allowlist If-Range with Range": ("/v1/orders", [("if-range", '"v1"'), ("range", "bytes=0-20")], "",
                                      "filtered"),
    "allowlist If-Range alone": ("/v1/orders", [("if-range", "Wed, 21 Oct 2015 07:28:00 GMT")], "", "filtered"),
    "allowlist two Range lines": ("/v1/orders", [("range", "bytes=0-5"), ("Range", "bytes=6-40")], "",
                                  "filtered"),
    "allowlist Range on /v1/orders/": ("/v1/orders/", [("RANGE", "bytes=0-30")], "", "filtered"),
    "allowlist upstream 206 unasked": ("/v1/orders", [], "206", "blocked"),
    "allowlist upstream content-range on 200": ("/v1/orders", [], "content-range", "blocked"),
    "allowlist upstream 206 with Range": ("/v1/orders", [("range", "bytes=0-")], "206", "blocked"),
    "denylist bytes=0-": ("/v1/ledger", [("range", "bytes=0-")], "", "filtered"),
    "denylist bytes=10-50": ("/v1/ledger", [("range", "bytes=10-50")], "", "filtered"),
    "denylist multi-range": ("/v1/ledger", [("range", "bytes=0-10,200-")], "", "filtered"),
    "denylist If-Range": ("/v1/ledger", [("if-range", '"v1"'), ("range", "bytes=100-")], "", "filtered"),
    "denylist upstream 206 unasked": ("/v1/ledger", [], "206", "blocked"),
    "denylist upstream content-range on 200": ("/v1/ledger", [], "content-range", "blocked"),
}


@pytest.mark.parametrize("variant", PARTIAL)
def test_partial_responses_are_never_passed_on(stack: Stack, token: str, record: Any, variant: str) -> None:
    target, headers, behaviour, expected = PARTIAL[variant]
    if behaviour:
        headers = [*headers, ("x-test-upstream", behaviour)]
    seen = attack(stack, "GET", target, headers, token)
    view = _view(target)
    leaked = leaked_document(seen, view)
    record(RANGE, wrongly_allowed=0, leaked=leaked, saw=label(seen, view))
    assert not leaked, (seen.status, seen.headers, seen.body[:300])
    if expected == "filtered":
        assert (seen.status, seen.json()) == (200, view), seen.body[:300]
        assert not _range_reached(seen), "Range/If-Range reached the upstream of a filtered route"
    else:
        assert seen.status == 502 and is_blocked(seen), (seen.status, seen.body[:300])
        assert seen.headers.get("content-type") == "application/json"


# --- 2. HEAD --------------------------------------------------------------------------------------

HEAD = "2. HEAD"

HEADS: dict[str, tuple[str, str, list[tuple[str, str]]]] = {
    "HEAD allowlist": ("HEAD", "/v1/orders", []),
    "HEAD allowlist trailing slash": ("HEAD", "/v1/orders/", []),
    "HEAD allowlist ;params": ("HEAD", "/v1/orders;v=1", []),
    "HEAD allowlist %6F spelling": ("HEAD", "/v1/%6Frders", []),
    "HEAD allowlist with Range": ("HEAD", "/v1/orders", [("range", "bytes=0-10")]),
    "HEAD allowlist upstream content-range": ("HEAD", "/v1/orders", [("x-test-upstream", "content-range")]),
    "HEAD denylist": ("HEAD", "/v1/ledger", []),
    "HEAD denylist query": ("HEAD", "/v1/ledger?page=1", []),
    "OPTIONS allowlist (GET handler)": ("OPTIONS", "/v1/orders", []),
    "OPTIONS denylist (GET handler)": ("OPTIONS", "/v1/ledger", []),
}


@pytest.fixture(scope="module")
def filtered_lengths(stack: Stack, token: str) -> dict[str, int]:
    """The length of each filtered GET body: the only length a HEAD may tell."""
    out = {}
    for target, view in VIEWS.items():
        seen = attack(stack, "GET", target, token=token)
        assert seen.status == 200 and seen.json() == view, seen.body[:300]
        out[target] = len(seen.body)
    return out


@pytest.mark.parametrize("variant", HEADS)
def test_head_and_options_are_filtered_as_get(
    stack: Stack, token: str, filtered_lengths: dict[str, int], record: Any, variant: str
) -> None:
    method, target, headers = HEADS[variant]
    seen = attack(stack, method, target, headers, token)
    view = _view(target)
    allowed_length = filtered_lengths["/v1/ledger" if target.startswith("/v1/ledger") else "/v1/orders"]
    length = seen.headers.get("content-length")
    tells_size = seen.status < 300 and length not in (None, "0", str(allowed_length)) if method == "HEAD" else False
    leaked = tells_size or leaked_document(seen, view)
    if method != "HEAD":
        saw = label(seen, view)
    elif seen.status >= 300 or seen.error:
        saw = label(seen)
    else:
        saw = f"{seen.status} " + ("unfiltered length" if tells_size else "no length" if length is None
                                   else "filtered length")
    record(HEAD, wrongly_allowed=0, leaked=leaked, saw=saw)
    assert not leaked, (seen.status, seen.headers)
    if "x-test-upstream" in dict(headers):
        assert seen.status == 502 or (seen.status == 200 and length in (None, str(allowed_length)))
    elif method == "HEAD":
        assert seen.status == 200 and seen.body == b""
    else:
        assert (seen.status, seen.json()) == (200, view)


def test_control_the_upstream_honours_range_where_no_filter_applies(stack: Stack, token: str) -> None:
    """Without this, a filtered 200 above could just mean the upstream ignores Range."""
    seen = attack(stack, "GET", "/v1/orders", [("range", "bytes=0-9"), ("x-test-upstream", "")], token)
    assert seen.status == 200  # filtered route: Range dropped
    unfiltered = attack(stack, "GET", "/v1/products", [("range", "bytes=0-9")], token)
    assert unfiltered.status == 206 and len(unfiltered.body) == 10
    assert _range_reached(unfiltered)
