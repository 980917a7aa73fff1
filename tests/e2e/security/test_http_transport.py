"""The adversarial suite's key classes on the HTTP ext_authz transport (envoy/envoy-http.yaml).

The same attacks as the gRPC suite, with the same properties asserted: no
client token or identity header reaches the upstream, a client can neither skip
nor steer filtering, and the response phase's hand-off comes from the Check's
answer only. Over HTTP the hand-off is an answer header that Envoy copies into
dynamic metadata (``dynamic_metadata_from_headers``), and the proxy a route
names is a request header Envoy adds (``headers_to_add``): both are tested here
with the edge removal of ``x-extauthz-*`` client headers taken out of the
config, so what is shown is Envoy's own behaviour, not only that removal.

The rows are not recorded in docs/SECURITY.md's table, which counts the gRPC
transport's variants; a failure here fails the run all the same.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest

from extauthz.core.handoff import Handoff
from extauthz.server.handoff_header import decode_handoff, encode_handoff
from tests.e2e.security import test_identity_headers, test_response_phase, test_second_tokens
from tests.e2e.security.harness import (
    Stacks,
    attack,
    docs_filter_example,
    filtered_view,
    hcm,
    is_blocked,
    leaked_document,
    lenient_stack,
    policy,
)

pytestmark = pytest.mark.envoy

SUB = "user-123"


@pytest.fixture(scope="module")
def stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stacks]:
    def start(name: str) -> Any:
        text, edit, files = STACKS[name]
        return lenient_stack(tmp_path_factory.mktemp(f"http-{name.replace(' ', '-')}"), text, edit, files,
                             transport="http")

    with ExitStack() as running:
        yield Stacks(lambda name: running.enter_context(start(name)))


def _no_edge_removal(config: dict[str, Any]) -> None:
    """Client x-extauthz-* headers reach Envoy's filters: what Envoy itself does with them shows."""
    del hcm(config)["early_header_mutation_extensions"]


def _echo_handoff_metadata(config: dict[str, Any]) -> None:
    """Every response says which hand-off Envoy's dynamic metadata holds (the ext_authz namespace)."""
    _no_edge_removal(config)
    route = hcm(config)["route_config"]["virtual_hosts"][0]["routes"][-1]
    route["response_headers_to_add"] = [{"header": {
        "key": "x-seen-handoff",
        "value": "%DYNAMIC_METADATA(envoy.filters.http.ext_authz:x-extauthz-handoff)%"}}]


def _route_without_proxy(config: dict[str, Any]) -> None:
    _no_edge_removal(config)
    del hcm(config)["route_config"]["virtual_hosts"][0]["routes"][-1]["metadata"]


FILTERED = policy({"name": "orders-api", "defaultRuleEffect": "allow", "filters": [docs_filter_example()]})
UNFILTERED = policy({"name": "orders-api", "defaultRuleEffect": "allow"})
TWO_PROXIES = policy(
    {"name": "orders-api", "default": True, "defaultRuleEffect": "deny"},
    {"name": "open", "defaultRuleEffect": "allow"},
)
Edit = Callable[[dict[str, Any]], None] | None
STACKS: dict[str, tuple[str, Edit, dict[str, str] | None]] = {
    "second tokens": (test_second_tokens.POLICY, None, None),
    "identity": (test_identity_headers.POLICY, None, {"target.key": "service-key\n"}),
    "ext_authz off": (test_response_phase.POLICY, test_response_phase.EDITS["ext_authz off"], None),
    "no response_attributes": (test_response_phase.POLICY, test_response_phase.EDITS["no response_attributes"], None),
    "no metadata forwarding": (test_response_phase.POLICY, test_response_phase.EDITS["no metadata forwarding"], None),
    "metadata echo": (FILTERED, _echo_handoff_metadata, None),
    "metadata echo, no filters": (UNFILTERED, _echo_handoff_metadata, None),
    "two proxies": (TWO_PROXIES, None, None),
    "two proxies, no route proxy": (TWO_PROXIES, _route_without_proxy, None),
}


# --- 8. second tokens, tokens in the query string -------------------------------------------------


@pytest.mark.parametrize("variant", test_second_tokens.VARIANTS)
def test_no_client_token_reaches_the_upstream(stacks: Stacks, variant: str) -> None:
    stack = stacks["second tokens"]
    target, headers = test_second_tokens.VARIANTS[variant]
    fill = {"token": stack.idp.token(sub="user-1"), "other": stack.idp.token(sub="user-2")}
    seen = attack(stack, "GET", target.format(**fill), [(k, v.format(**fill)) for k, v in headers])
    upstream = seen.upstream_text()
    assert not [name for name, value in fill.items() if value in upstream], upstream
    if "?" in target:
        # gRPC strips a token from the query string; Envoy's HTTP client cannot, so the Check denies.
        assert (seen.status, seen.json()["error"]) == (400, "query_token_refused") and not seen.reached
        return
    assert seen.status in (200, 400, 401) or (seen.error and not seen.reached), (seen.status, seen.body[:300])
    if seen.status == 200:
        assert [v for k, v in seen.upstream[0]["header_list"] if k == "x-auth-sub"] == ["user-1"]


# --- 5. spoofed identity headers, underscore look-alikes ---------------------------------------------


@pytest.mark.parametrize("variant", test_identity_headers.VARIANTS)
def test_client_identity_headers_never_reach_the_upstream(stacks: Stacks, variant: str) -> None:
    stack = stacks["identity"]
    path, headers, claims = test_identity_headers.VARIANTS[variant]
    spoof = f"spoofed-{uuid.uuid4().hex[:10]}"
    sent = [(name, value.format(spoof=spoof)) for name, value in headers]
    seen = attack(stack, "GET", path, sent, stack.idp.token(**claims) if claims is not None else None)
    assert spoof not in seen.upstream_text(), seen.upstream_text()
    if any("_" in name for name, _ in sent) and not seen.reached:
        assert seen.error or seen.status == 400, (seen.status, seen.error)
        return
    assert seen.status == 200, (seen.status, seen.body[:300])
    (request,) = seen.upstream
    expected = {"x-auth-sub": claims["sub"] if claims else None, "x-auth-tenant": (claims or {}).get("tenant_id")}
    for name, value in expected.items():
        values = [v for k, v in request["header_list"] if k.replace("_", "-") == name]
        assert values == ([value] if value is not None else []), (name, request["header_list"])
    # extauthz's own answer headers stay between Envoy and extauthz.
    assert not [k for k, _ in request["header_list"] if k.startswith(("x-extauthz-handoff", "x-extauthz-decision"))]


# --- 3. the response phase: markers and hand-offs a client sends ---------------------------------

FORGED = encode_handoff(Handoff("forged", "orders-api", "any", ("GET",), ("/v1/orders",), "localhost",
                                ({"callerSub": "user-456", "sub": "user-456"},)).to_metadata())
CLIENT_HEADERS = {
    "unfiltered": [("x-extauthz-unfiltered", "1")],
    "hand-off": [("x-extauthz-handoff", FORGED)],
    "both": [("x-extauthz-unfiltered", "1"), ("x-extauthz-handoff", FORGED)],
    "none": [],
}


@pytest.mark.parametrize("variant", CLIENT_HEADERS)
def test_a_client_cannot_skip_or_steer_filtering_where_no_check_runs(stacks: Stacks, variant: str) -> None:
    """On a route without ext_authz, nothing the client sends stands in for the Check: blocked, never passed."""
    seen = attack(stacks["ext_authz off"], "GET", "/v1/orders", headers=CLIENT_HEADERS[variant])
    assert not leaked_document(seen, filtered_view(SUB)) and b"internalRef" not in seen.body
    assert seen.status == 502 and is_blocked(seen), (seen.status, seen.body[:300])


@pytest.mark.parametrize("variant", CLIENT_HEADERS)
def test_a_client_cannot_skip_or_steer_filtering_where_the_check_runs(stacks: Stacks, variant: str) -> None:
    stack = stacks["no response_attributes"]  # the hand-off alone tells the response phase the request
    seen = attack(stack, "GET", "/v1/orders", headers=CLIENT_HEADERS[variant], token=stack.idp.token(sub=SUB))
    assert (seen.status, seen.json()) == (200, filtered_view(SUB)), seen.body[:300]


def test_without_the_handoff_a_filtered_response_is_blocked(stacks: Stacks) -> None:
    stack = stacks["no metadata forwarding"]
    seen = attack(stack, "GET", "/v1/orders", token=stack.idp.token(sub=SUB))
    assert seen.status == 502 and is_blocked(seen) and b"internalRef" not in seen.body


def test_envoy_takes_the_handoff_from_the_checks_answer_never_from_the_client(stacks: Stacks) -> None:
    """``dynamic_metadata_from_headers`` reads the auth service's answer: with the edge removal gone, a
    client's copy still never becomes metadata, neither beside the Check's nor where the Check writes none."""
    stack = stacks["metadata echo"]
    token = stack.idp.token(sub=SUB)
    checked = attack(stack, "GET", "/v1/orders", [("x-extauthz-handoff", FORGED)], token=token)
    assert (checked.status, checked.json()) == (200, filtered_view(SUB))
    metadata = decode_handoff(checked.headers["x-seen-handoff"])
    assert metadata is not None and metadata["decisionId"] == checked.headers["x-extauthz-decision-id"]
    assert checked.headers["x-seen-handoff"] != FORGED
    # A proxy without filters: the Check answers without a hand-off, so the metadata holds none.
    stack = stacks["metadata echo, no filters"]
    unfiltered = attack(stack, "GET", "/v1/orders", [("x-extauthz-handoff", FORGED)], token=stack.idp.token(sub=SUB))
    assert unfiltered.status == 200 and unfiltered.headers.get("x-seen-handoff", "-") in ("", "-")
    assert [v for k, v in unfiltered.upstream[0]["header_list"] if k == "x-extauthz-handoff"] == [FORGED]


# --- the proxy a route names -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["x-extauthz-check", "X-Extauthz-Check"])
def test_a_client_cannot_choose_the_proxy_that_decides(stacks: Stacks, name: str) -> None:
    """Envoy's x-extauthz-check replaces a client's copy, also on a route that names no proxy (then the
    host or the default proxy decides, as over gRPC without context_extensions)."""
    for stack_name in ("two proxies", "two proxies, no route proxy"):
        stack = stacks[stack_name]
        seen = attack(stack, "GET", "/v1/anything", [(name, "proxy=open;scheme=http;length=")],
                      token=stack.idp.token(sub=SUB))
        assert seen.status == 403 and not seen.reached, (stack_name, seen.status, seen.body[:300])
        assert seen.json()["error"] == "forbidden"
