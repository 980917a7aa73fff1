"""Relationship checks are asked only when they can change the decision, proven by counting calls.

Seed 002's two-layer pattern: organization-wide permissions in the JWT decide
without an API call; only resource-level questions go to OpenFGA. The rule
engine asks after the cheap conditions, skips lookups once the outcome is
fixed, and asks each step's conditions together (one BatchCheck).
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from extauthz.core.rules import Outcome
from extauthz.policy.model import Effect
from tests.openfga_server import OpenFgaServer, Scripted, policy_document, resolver_for

pytestmark = pytest.mark.usefixtures("fga_spec_clean")  # fga: tests/conftest.py

JOURNEY = [{"name": "journeyId", "source": "pathSegment", "index": 2}]
PATH = {"path": {"pattern": "^/v1/journeys/[^/]+$"}}


def fga(relation: str, effect: str = "allow", methods: list[str] | None = None,
        presence: str = "must_exist") -> dict[str, Any]:
    condition = {"user": "user:{{sub}}", "relation": relation, "object": "journey:{{journeyId}}",
                 "presence": presence}
    rule: dict[str, Any] = {"effect": effect, "variables": JOURNEY, "path": PATH, "fga": condition}
    if methods:
        rule["methods"] = methods
    return rule


# Seed 002's layers: the token's org-wide permission first, then the resource check.
JWT_DELETE = {"effect": "allow", "methods": ["DELETE"], "path": PATH, "priority": 10,
              "token": [{"claim": {"pattern": "^permissions$"}, "value": {"pattern": "^journey:delete$"}}],
              "notes": "organization layer (JWT): no API call"}
BLOCKED = {"effect": "deny", "token": [{"claim": {"pattern": "^blocked$"}, "value": {"pattern": "^true$"}}],
           "priority": 1}


@pytest.fixture(scope="module")
def server(fga: OpenFgaServer) -> OpenFgaServer:
    """The module's journeys server (``fga`` in tests/conftest.py), named apart from the ``fga`` rule helper."""
    return fga


def decide(doc: dict[str, Any], method: str, path: str, claims: dict[str, Any]) -> Any:
    async def run() -> Any:
        async with resolver_for(doc) as h:
            return await h.decide(method, path, claims)

    return asyncio.run(run())


def test_a_jwt_permission_that_already_allows_avoids_the_call(server: OpenFgaServer) -> None:
    doc = policy_document([JWT_DELETE, fga("can_delete", methods=["DELETE"])], [server.backend()])
    verdict = decide(doc, "DELETE", "/v1/journeys/roadmap", {"sub": "bob", "permissions": ["journey:delete"]})
    assert verdict.effect is Effect.ALLOW and verdict.rule.notes.startswith("organization layer")
    assert server.calls == []
    assert [t.outcome for t in verdict.trace if t.rule.fga] == [Outcome.SKIPPED]
    # Without the permission, the resource layer is asked: bob may not delete.
    verdict = decide(doc, "DELETE", "/v1/journeys/roadmap", {"sub": "bob", "permissions": ["journey:view"]})
    assert verdict.effect is Effect.DENY and len(server.calls) == 1


def test_a_matched_cheap_deny_skips_every_lookup(server: OpenFgaServer) -> None:
    doc = policy_document([BLOCKED, fga("viewer"), fga("owner", effect="deny")], [server.backend()])
    verdict = decide(doc, "GET", "/v1/journeys/roadmap", {"sub": "anne", "blocked": True})
    assert verdict.effect is Effect.DENY and verdict.rule.index == 0
    assert server.calls == []


def test_rules_whose_cheap_conditions_fail_are_never_asked(server: OpenFgaServer) -> None:
    doc = policy_document([fga("viewer", methods=["GET"]), fga("editor", methods=["PUT"])], [server.backend()])
    assert decide(doc, "POST", "/v1/journeys/roadmap", {"sub": "anne"}).effect is Effect.DENY
    assert decide(doc, "GET", "/v1/other/roadmap", {"sub": "anne"}).effect is Effect.DENY
    assert server.calls == []


def test_deny_lookups_are_skipped_when_nothing_can_allow(server: OpenFgaServer) -> None:
    doc = policy_document([fga("owner", effect="deny")], [server.backend()])
    verdict = decide(doc, "GET", "/v1/journeys/roadmap", {"sub": "anne"})
    assert verdict.effect is Effect.DENY and verdict.rule is None  # the default decided
    assert server.calls == []


def test_allow_lookups_are_skipped_under_a_default_allow(server: OpenFgaServer) -> None:
    doc = policy_document([fga("viewer")], [server.backend()], default="allow")
    assert decide(doc, "GET", "/v1/journeys/roadmap", {"sub": "erin"}).effect is Effect.ALLOW
    assert server.calls == []


def test_a_default_allow_still_asks_deny_rules(server: OpenFgaServer) -> None:
    doc = policy_document([fga("can_delete", effect="deny", methods=["DELETE"], presence="must_absent")],
                          [server.backend()], default="allow")
    assert decide(doc, "DELETE", "/v1/journeys/roadmap", {"sub": "bob"}).effect is Effect.DENY
    assert decide(doc, "DELETE", "/v1/journeys/roadmap", {"sub": "anne"}).effect is Effect.ALLOW
    assert len(server.calls) == 2


def test_a_failed_allow_lookup_skips_the_deny_lookups(server: OpenFgaServer) -> None:
    doc = policy_document([fga("viewer"), fga("owner", effect="deny", methods=["DELETE"]),
                           fga("can_delete", effect="deny")], [server.backend()])
    verdict = decide(doc, "GET", "/v1/journeys/roadmap", {"sub": "erin"})
    assert verdict.effect is Effect.DENY
    assert len(server.calls) == 1  # only the allow step; the deny step could not change a deny
    assert [t.outcome for t in verdict.trace][1:] == [Outcome.NOT_MATCHED, Outcome.SKIPPED]


def test_allow_then_deny_step_each_in_one_round_trip(server: OpenFgaServer) -> None:
    rules = [fga("viewer"), fga("editor"), fga("can_delete", effect="deny")]
    doc = policy_document(rules, [server.backend()])
    verdict = decide(doc, "GET", "/v1/journeys/roadmap", {"sub": "anne"})  # anne may view and delete
    assert verdict.effect is Effect.DENY and verdict.rule.index == 2
    assert [c.path.rsplit("/", 1)[1] for c in server.calls] == ["batch-check", "check"]
    server.calls.clear()
    verdict = decide(doc, "GET", "/v1/journeys/roadmap", {"sub": "bob"})  # bob may view, not delete
    assert verdict.effect is Effect.ALLOW and verdict.rule.index == 0
    assert len(server.calls) == 2


def test_a_matched_cheap_allow_asks_only_deny_rules(server: OpenFgaServer) -> None:
    doc = policy_document([JWT_DELETE, fga("viewer", methods=["DELETE"]),
                           fga("owner", effect="deny", methods=["DELETE"], presence="must_absent")],
                          [server.backend()])
    claims = {"sub": "bob", "permissions": ["journey:delete"]}
    verdict = decide(doc, "DELETE", "/v1/journeys/roadmap", claims)
    assert verdict.effect is Effect.DENY  # bob is no owner: the deny rule matched
    assert [c.body["tuple_key"]["relation"] for c in server.calls] == ["owner"]


def test_unresolved_fails_closed_in_both_directions(server: OpenFgaServer) -> None:
    # Allow rule unresolved: not matched, so the default denies.
    server.then(Scripted(500), Scripted(500))
    doc = policy_document([fga("viewer")], [server.backend()])
    assert decide(doc, "GET", "/v1/journeys/roadmap", {"sub": "anne"}).effect is Effect.DENY
    # Deny rule unresolved: matched, even though the relationship does not exist.
    server.then(Scripted(500), Scripted(500))
    doc = policy_document([{"effect": "allow"}, fga("owner", effect="deny")], [server.backend()])
    verdict = decide(doc, "GET", "/v1/journeys/roadmap", {"sub": "bob"})
    assert verdict.effect is Effect.DENY and verdict.rule.index == 1
    assert "unresolved" in next(t.reason for t in verdict.trace if t.rule.index == 1)
