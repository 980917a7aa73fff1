"""A shadow policy through the real Envoy and the shipped config, under mixed traffic.

The active policy decides every answer; the candidate beside it tightens one
rule (products are no longer readable) and changes one filter (the order amount
is no longer shown). The logs and metrics must show exactly those differences,
no others, while every client gets the active policy's answer. Relationship
conditions go to the local OpenFGA server (tests/openfga_server.py).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.demo.upstream import ORDERS
from tests.e2e.ops_stack import OpsStack, ops_stack, wait_until
from tests.openfga_server import OpenFgaServer

pytestmark = pytest.mark.envoy

JOURNEY_RULE = {
    "effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/journeys/[^/]+$"}},
    "variables": [{"name": "journeyId", "source": "pathSegment", "index": 2}],
    "fga": {"user": "user:{{sub}}", "relation": "viewer", "object": "journey:{{journeyId}}"},
}
ORDERS_FILTER = {
    "methods": ["GET"], "path": {"pattern": "^/v1/orders"}, "defaultFilterOperation": "destroy",
    "variables": [{"name": "callerSub", "source": "jwtClaim", "key": "sub"}],
    "operations": [
        {"effect": "retain", "jsonPath": {"pattern": "^orders$"}, "matchField": {"pattern": "^userId$"},
         "matchValue": {"pattern": "^{{callerSub}}$"}, "priority": 10},
        {"effect": "retain", "jsonPath": {"pattern": "^orders\\.(orderId|userId|amount|status)$"}, "priority": 5},
    ],
}


def active_document(fga: OpenFgaServer) -> dict[str, Any]:
    return {
        "providers": [{"name": "idp", "issuer": "ISSUER", "jwksUri": "JWKS_URI", "audiences": ["orders-api"]}],
        "relationships": {"openfga": [fga.backend(timeout_ms=500)],
                          "cache": {"allowedTtlSeconds": 300, "deniedTtlSeconds": 300}},
        "proxies": [{
            "name": "orders-api",
            "rules": [
                {"effect": "deny", "path": {"path": {"pattern": "^/v1/users/"}},
                 "token": [{"claim": {"pattern": "^sub$"}, "value": {"pattern": "^svc-"}}]},
                {"effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/(products|orders)/?"}}},
                {"effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/users/"}}},
                JOURNEY_RULE,
            ],
            "filters": [ORDERS_FILTER],
        }],
        "server": {"shadow": {"file": "candidate.yaml", "responseSampleRate": 1}},
    }


def candidate_document(fga: OpenFgaServer) -> dict[str, Any]:
    document = copy.deepcopy(active_document(fga))
    del document["server"]
    proxy = document["proxies"][0]
    proxy["rules"][1]["path"]["path"]["pattern"] = "^/v1/orders/?"  # products: no longer readable
    proxy["filters"][0]["operations"][1]["jsonPath"]["pattern"] = "^orders\\.(orderId|userId|status)$"  # no amount
    return document


def text(document: dict[str, Any]) -> str:
    return yaml.safe_dump(document, sort_keys=False)


@pytest.fixture
def stack(tmp_path: Path, fga: OpenFgaServer) -> Iterator[OpsStack]:
    def policy(idp: Any, metrics_port: int) -> str:
        candidate = text(candidate_document(fga)).replace("JWKS_URI", idp.jwks_uri).replace("ISSUER", idp.issuer)
        (tmp_path / "candidate.yaml").write_text(candidate)
        return text(active_document(fga))

    with ops_stack(tmp_path, policy) as running:
        yield running
    assert fga.invalid == [], fga.invalid


def settled(stack: OpsStack, checks: int) -> dict[str, Any]:
    """/readyz's shadow section once the candidate has evaluated ``checks`` Checks."""
    wait_until(lambda: stack.readyz()["shadow"]["checks"] >= checks, f"{checks} shadow evaluations")
    shadow: dict[str, Any] = stack.readyz()["shadow"]
    return shadow


def test_mixed_traffic_shows_exactly_the_expected_differences(stack: OpsStack, fga: OpenFgaServer) -> None:
    fga.calls.clear()
    idp = stack.idp
    user, service, bob = idp.token(sub="user-123"), idp.token(sub="svc-batch"), idp.token(sub="bob")
    rounds = 3
    answers: dict[str, list[int]] = {}
    orders_bodies = []
    for _ in range(rounds):
        orders = stack.request("GET", "/v1/orders", user)  # allowed and filtered (the filter changes)
        orders_bodies.append(orders.json())
        for name, method, path, token in (
            ("products", "GET", "/v1/products", user),         # allowed; the candidate denies it
            ("user", "GET", "/v1/users/7", user),              # allowed by both
            ("service", "GET", "/v1/users/7", service),        # denied by both
            ("anonymous", "GET", "/v1/orders", None),          # unauthenticated under both
            ("journey", "GET", "/v1/journeys/roadmap", bob),   # relationship: bob views roadmap
            ("journey-denied", "GET", "/v1/journeys/launch", bob),  # relationship: bob does not view launch
        ):
            answers.setdefault(name, []).append(stack.request(method, path, token).status)
        answers.setdefault("orders", []).append(orders.status)

    # Every answer is the active policy's: products still readable, the amount still shown.
    assert answers == {"products": [200] * rounds, "user": [200] * rounds, "service": [403] * rounds,
                       "anonymous": [401] * rounds, "journey": [200] * rounds, "journey-denied": [403] * rounds,
                       "orders": [200] * rounds}
    mine = [{k: o[k] for k in ("orderId", "userId", "amount", "status")} for o in ORDERS["orders"]
            if o["userId"] == "user-123"]
    assert orders_bodies == [{"orders": mine}] * rounds

    checks = rounds * 7
    shadow = settled(stack, checks)
    assert shadow["checks"] == checks and shadow["undecided"] == 0 and shadow["skipped"] == 0
    assert shadow["differences"] == rounds  # the products reads, nothing else
    assert shadow["agreement"] == round(1 - rounds / checks, 6)
    wait_until(lambda: stack.readyz()["shadow"]["responsesCompared"] >= rounds, "the sampled responses compared")
    shadow = stack.readyz()["shadow"]
    assert shadow["responsesCompared"] == rounds and shadow["responseDifferences"] == rounds

    logs = stack.logs()
    diffs = [e for e in logs if e.get("event") == "shadow_diff"]
    assert len(diffs) == rounds
    assert {(d["method"], d["path"], d["sub"]) for d in diffs} == {("GET", "/v1/products", "user-123")}
    assert all(d["active"]["code"] == "allowed" and d["active"]["rule"] == 1 and
               d["shadow"]["code"] == "forbidden" and d["shadow"]["status"] == 403 and d["shadow"]["rule"] is None
               for d in diffs)
    decisions = stack.decisions()
    assert {decisions[d["decision_id"]]["path"] for d in diffs} == {"/v1/products"}  # pairs with the decision line
    bodies = [e for e in logs if e.get("event") == "shadow_response_diff"]
    assert len(bodies) == rounds and all(b["kind"] == "body" and b["proxy"] == "orders-api" for b in bodies)
    assert all(b["shadow_values"] == b["active_values"] - 2 for b in bodies)  # two orders, one amount each fewer

    metric = stack.metric
    assert metric("extauthz_shadow_decisions_total", proxy="orders-api", active="allowed",
                  shadow="forbidden") == rounds
    assert metric("extauthz_shadow_decisions_total", proxy="orders-api", active="allowed",
                  shadow="allowed") == rounds * 3  # orders, user, journey
    assert metric("extauthz_shadow_decisions_total", proxy="orders-api", active="forbidden",
                  shadow="forbidden") == rounds * 2
    assert metric("extauthz_shadow_decisions_total", proxy="orders-api", active="token_missing",
                  shadow="token_missing") == rounds
    assert metric("extauthz_shadow_differences_total", proxy="orders-api", active="allowed",
                  shadow="forbidden") == rounds
    assert metric("extauthz_shadow_responses_total", proxy="orders-api", result="different") == rounds
    assert metric("extauthz_shadow_responses_total", proxy="orders-api", result="same") is None
    assert metric("extauthz_shadow_policy_info", digest=shadow["digest"]) == 1
    # One call per journey for both policies: the candidate reads the active resolver's cache.
    assert len(fga.calls) == 2, [(c.body["tuple_key"], c.path) for c in fga.calls]


def test_a_broken_candidate_is_rejected_by_line_and_the_active_policy_keeps_serving(
    stack: OpsStack, fga: OpenFgaServer,
) -> None:
    user = stack.idp.token(sub="user-123")
    good = stack.readyz()["shadow"]["digest"]
    candidate = stack.workdir / "candidate.yaml"
    broken = candidate.read_text().replace("effect: deny", "effect: forbid", 1)
    candidate.write_text(broken)
    wait_until(lambda: stack.readyz()["shadow"]["lastReload"]["result"] == "invalid", "the candidate refused")
    shadow = stack.readyz()["shadow"]
    line = next(n for n, t in enumerate(broken.splitlines(), 1) if "effect: forbid" in t)
    assert shadow["lastReload"]["errors"] == [
        f"{candidate}:{line}: proxies[0].rules[0].effect: must be one of allow, deny, found 'forbid'"]
    assert shadow["digest"] == good  # the last good candidate still runs
    assert stack.metric("extauthz_shadow_file_rejected") == 1
    assert stack.metric("extauthz_policy_file_rejected") == 0
    assert stack.request("GET", "/v1/products", user).status == 200  # the active policy is untouched

    # The active policy reloads (one more readable path); the candidate stays as it was.
    policy = stack.workdir / "policy.yaml"
    active = policy.read_text()
    policy.write_text(active.replace("^/v1/(products|orders)/?", "^/v1/(products|orders|carts)/?"))
    wait_until(lambda: stack.request("GET", "/v1/carts", user).status == 200, "the active policy reloaded")
    assert stack.readyz()["shadow"]["digest"] == good
    time.sleep(0.5)
    assert stack.readyz()["shadow"]["lastReload"]["result"] == "invalid"  # still reported, still the old candidate
