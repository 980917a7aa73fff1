"""The response phase knows the request from the Check, not from optional Envoy settings.

Three stacks run the shipped Envoy config with one ext_proc setting removed:

* ``no response_attributes``: Envoy tells ext_proc nothing about the request; the
  Check's verified hand-off alone must let every filter apply as usual;
* ``no metadata forwarding``: the Check's hand-off never reaches ext_proc; a
  response a filter could apply to must be blocked (502), never passed unfiltered;
* ``neither``: both removed; the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from tests.e2e.security.harness import (
    Stacks,
    attack,
    docs_filter_example,
    ext_proc_config,
    filtered_view,
    hcm,
    is_blocked,
    label,
    leaked_document,
    lenient_stack,
    policy,
)
from tests.e2e.security.upstream import BODY

pytestmark = pytest.mark.envoy

CLS = "3. Response phase without Envoy options"
DENYLIST = {
    "methods": ["GET"],
    "path": {"pattern": "^/v1/ledger"},
    "defaultFilterOperation": "retain",
    "operations": [{"effect": "destroy", "jsonPath": {"pattern": "^orders\\.internalRef$"}}],
}
POLICY = policy({"name": "orders-api", "defaultRuleEffect": "allow", "filters": [docs_filter_example(), DENYLIST]})
SUB = "user-123"


def _without(*fields: str) -> Callable[[dict[str, Any]], None]:
    def edit(config: dict[str, Any]) -> None:
        processor = ext_proc_config(config)
        for name in fields:
            assert name in processor, f"the shipped ext_proc config has no {name} to remove"
            del processor[name]
    return edit


def _ext_authz_off(config: dict[str, Any]) -> None:
    """A route that opts out of ext_authz (ExtAuthzPerRoute disabled): no Check, so no hand-off."""
    for route in hcm(config)["route_config"]["virtual_hosts"][0]["routes"]:
        route.setdefault("typed_per_filter_config", {})["envoy.filters.http.ext_authz"] = {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
            "disabled": True,
        }


EDITS = {
    "ext_authz off": _ext_authz_off,
    "no response_attributes": _without("response_attributes"),
    "no metadata forwarding": _without("metadata_options"),
    "neither": _without("response_attributes", "metadata_options"),
}


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stacks]:
    with ExitStack() as running:
        yield Stacks(lambda name: running.enter_context(
            lenient_stack(tmp_path_factory.mktemp("phase"), POLICY, edit_envoy=EDITS[name])))


# (config, method, target, what the caller must see)
VARIANTS: dict[str, tuple[str, str, str, str]] = {
    "no attributes: GET /v1/orders": ("no response_attributes", "GET", "/v1/orders", "filtered"),
    "no attributes: GET /v1/orders/": ("no response_attributes", "GET", "/v1/orders/", "filtered"),
    "no attributes: GET /v1/orders;x=1": ("no response_attributes", "GET", "/v1/orders;x=1", "filtered"),
    "no attributes: GET /v1/orders?page=1": ("no response_attributes", "GET", "/v1/orders?page=1", "filtered"),
    "no attributes: GET denylist": ("no response_attributes", "GET", "/v1/ledger", "filtered"),
    "no attributes: HEAD /v1/orders": ("no response_attributes", "HEAD", "/v1/orders", "no length"),
    "no metadata: GET /v1/orders": ("no metadata forwarding", "GET", "/v1/orders", "blocked"),
    "no metadata: GET /v1/orders/": ("no metadata forwarding", "GET", "/v1/orders/", "blocked"),
    "no metadata: GET /v1/orders%3B": ("no metadata forwarding", "GET", "/v1/orders%3B", "blocked"),
    "no metadata: GET denylist": ("no metadata forwarding", "GET", "/v1/ledger", "blocked"),
    "no metadata: HEAD /v1/orders": ("no metadata forwarding", "HEAD", "/v1/orders", "no length"),
    "neither: GET /v1/orders": ("neither", "GET", "/v1/orders", "blocked"),
    "neither: GET denylist": ("neither", "GET", "/v1/ledger", "blocked"),
    "neither: GET /v1/orders;x=1": ("neither", "GET", "/v1/orders;x=1", "blocked"),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_filters_hold_without_optional_envoy_settings(stacks: Stacks, record: Any, variant: str) -> None:
    config, method, target, expected = VARIANTS[variant]
    stack = stacks[config]
    seen = attack(stack, method, target, token=stack.idp.token(sub=SUB))
    view = filtered_view(SUB, allowlist=not target.startswith("/v1/ledger"))
    if method == "HEAD":
        length = seen.headers.get("content-length")
        leaked = seen.status < 300 and length == str(len(BODY))
        saw = label(seen) if seen.status >= 300 else f"{seen.status} " + (
            "unfiltered length" if leaked else "no length" if length is None else "other length")
    else:
        leaked = leaked_document(seen, view)
        saw = label(seen, view)
    record(CLS, wrongly_allowed=0, leaked=leaked, saw=saw)
    assert not leaked, (seen.status, seen.headers, seen.body[:300])
    if expected == "filtered":
        assert (seen.status, seen.json()) == (200, view), seen.body[:300]
    elif expected == "blocked":
        assert seen.status == 502 and is_blocked(seen), (seen.status, seen.body[:300])
    else:
        assert seen.status == 502 or (seen.status == 200 and "content-length" not in seen.headers), seen.headers


MARKERS = {
    "ext_authz off: client claims unfiltered": [("x-extauthz-unfiltered", "1")],
    "ext_authz off: client claims unfiltered twice": [("x-extauthz-unfiltered", "1"), ("X-Extauthz-Unfiltered", "1")],
    "ext_authz off: no marker": [],
}


@pytest.mark.parametrize("variant", MARKERS)
def test_a_client_cannot_mark_its_response_unfiltered(stacks: Stacks, record: Any, variant: str) -> None:
    """The header that lets Envoy skip ext_proc is the Check's to set: a client's copy is removed at the edge.

    On a route without ext_authz nobody sets it, so the response phase runs, finds
    no hand-off and blocks what a filter may apply to.
    """
    stack = stacks["ext_authz off"]
    seen = attack(stack, "GET", "/v1/orders", headers=MARKERS[variant])
    view = filtered_view(SUB, allowlist=True)
    leaked = leaked_document(seen, view) or (seen.status == 200 and b"internalRef" in seen.body)
    record(CLS, wrongly_allowed=0, leaked=leaked, saw=label(seen, view))
    assert not leaked, (seen.status, seen.body[:300])
    assert seen.status == 502 and is_blocked(seen), (seen.status, seen.body[:300])


def test_control_unfiltered_routes_still_pass_without_metadata(stacks: Stacks) -> None:
    """Blocking is scoped: a response no filter applies to is not blocked for lack of a hand-off."""
    stack = stacks["no metadata forwarding"]
    seen = attack(stack, "GET", "/v1/products", token=stack.idp.token(sub=SUB))
    assert seen.status == 200 and seen.json()["path"] == "/v1/products"
