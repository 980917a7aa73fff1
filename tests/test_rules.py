"""Rule semantics of docs/policy.md, one behaviour per test, on the pure decision core."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.core.claims import Claims
from extauthz.core.request import HttpRequest
from extauthz.core.rules import NoRelationships, evaluate
from extauthz.policy.loader import load_rule
from extauthz.policy.model import Effect, Proxy


def decide(rules: list[dict[str, Any]], method: str = "GET", target: str = "/",
           claims: Mapping[str, Any] | None = None, default: str = "deny",
           headers: dict[str, str] | None = None) -> tuple[Effect, int | None]:
    parsed = sorted((load_rule(r, i) for i, r in enumerate(rules)), key=lambda r: (r.priority, r.index))
    proxy = Proxy(name="p", providers=(), default_effect=Effect(default), rules=tuple(parsed))
    request = HttpRequest.from_target(method, target, headers=headers or {})
    verdict = asyncio.run(evaluate(proxy, request, Claims.of(claims or {}), NoRelationships()))
    # The serving path (rules compiled at load, no trace) must decide exactly as the traced one.
    served = asyncio.run(evaluate(proxy, request, Claims.of(claims or {}), NoRelationships(), explain=False))
    assert (served.effect, served.rule) == (verdict.effect, verdict.rule), "compiled rules disagree"
    return verdict.effect, (verdict.rule.index if verdict.rule else None)


STRINGS = st.sampled_from(["user-1", "svc-2", "admin", "", "a.b"])
CLAIM_VALUES = st.one_of(STRINGS, STRINGS, STRINGS, st.integers(-2, 2), st.booleans(),
                         st.none(), st.lists(st.sampled_from(["admin", "user-1", "x"]), max_size=3),
                         st.dictionaries(st.sampled_from(["b", "sub"]), st.sampled_from(["user-1", "admin"]),
                                         max_size=2))
PATTERNS = st.sampled_from(["^sub$", "^roles$", "^a$", "^a.b$", "^(sub|roles)$", "sub", "^user-", "admin$", "^admin$",
                            "^[a-z]+-1$", "^true$", "^1$", "^null$", "b", "^a\\.b$", ".*"])


@settings(max_examples=600, deadline=None)
@given(
    claims=st.dictionaries(st.sampled_from(["sub", "sub", "roles", "a", "a.b", "n"]), CLAIM_VALUES, max_size=4),
    conditions=st.lists(st.tuples(PATTERNS, st.one_of(st.none(), PATTERNS), st.booleans()), max_size=3),
    methods=st.one_of(st.none(), st.sets(st.sampled_from(["GET", "POST", "DELETE"]), min_size=1)),
    method=st.sampled_from(["GET", "HEAD", "OPTIONS", "POST", "DELETE"]),
    path=st.one_of(st.none(), st.tuples(PATTERNS, st.booleans())),
    effect=st.sampled_from(["allow", "deny"]),
)
def test_compiled_rules_decide_as_the_traced_path(
    claims: dict[str, Any], conditions: list[tuple[str, str | None, bool]], methods: set[str] | None, method: str,
    path: tuple[str, bool] | None, effect: str,
) -> None:
    """Generated claims (strings, numbers, lists, objects, dotted names) against generated rules: same verdicts."""
    rule: dict[str, Any] = {"effect": effect, "token": [
        {"claim": {"pattern": name}, **({"value": {"pattern": value}} if value else {}),
         "presence": "must_exist" if exists else "must_absent"} for name, value, exists in conditions]}
    if methods:
        rule["methods"] = sorted(methods)
    if path:
        rule["path"] = {"path": {"pattern": path[0]}, "presence": "must_exist" if path[1] else "must_absent"}
    decide([rule, {"effect": "deny", "token": [{"claim": {"pattern": "^n$"}}]}], method, "/sub/user-1",
           claims)


ALLOW_ALL = {"effect": "allow"}


def test_empty_rule_matches_everything() -> None:
    assert decide([ALLOW_ALL]) == (Effect.ALLOW, 0)


def test_default_effect_decides_when_nothing_matches() -> None:
    assert decide([]) == (Effect.DENY, None)
    assert decide([], default="allow") == (Effect.ALLOW, None)


def test_methods_restrict_a_rule() -> None:
    rule = {"effect": "allow", "methods": ["GET"]}
    assert decide([rule], "GET") == (Effect.ALLOW, 0)
    assert decide([rule], "DELETE") == (Effect.DENY, None)


def test_path_pattern_is_a_search_and_ignores_the_query() -> None:
    rule = {"effect": "allow", "path": {"path": {"pattern": "orders"}, "presence": "must_exist"}}
    assert decide([rule], target="/v1/orders/7")[0] is Effect.ALLOW
    assert decide([rule], target="/v1/users?next=orders")[0] is Effect.DENY


def test_anchored_path_pattern() -> None:
    rule = {"effect": "allow", "path": {"path": {"pattern": "^/v1/(products|orders)/?"}}}
    assert decide([rule], target="/v1/orders")[0] is Effect.ALLOW
    assert decide([rule], target="/api/v1/orders")[0] is Effect.DENY


def test_path_must_absent_matches_paths_outside_the_pattern() -> None:
    rule = {"effect": "allow", "path": {"path": {"pattern": "^/admin"}, "presence": "must_absent"}}
    assert decide([rule], target="/public")[0] is Effect.ALLOW
    assert decide([rule], target="/admin/users")[0] is Effect.DENY


def test_token_claim_must_exist_and_must_absent() -> None:
    exists = {"effect": "allow", "token": [{"claim": {"pattern": "^sub$"}, "presence": "must_exist"}]}
    absent = {"effect": "deny", "token": [{"claim": {"pattern": "^sub$"}, "presence": "must_absent"}]}
    assert decide([exists], claims={"sub": "u"})[0] is Effect.ALLOW
    assert decide([exists], claims={"iss": "x"})[0] is Effect.DENY
    assert decide([absent, ALLOW_ALL], claims={"iss": "x"}) == (Effect.DENY, 0)
    assert decide([absent, ALLOW_ALL], claims={"sub": "u"}) == (Effect.ALLOW, 1)


def test_token_value_pattern() -> None:
    rule = {"effect": "allow", "token": [{"claim": {"pattern": "^sub$"}, "value": {"pattern": "^user-"}}]}
    assert decide([rule], claims={"sub": "user-1"})[0] is Effect.ALLOW
    assert decide([rule], claims={"sub": "svc-1"})[0] is Effect.DENY


def test_must_absent_with_value_means_no_claim_has_that_value() -> None:
    # Seed 000: deny GET /v1/orders when the orders:read permission is missing.
    rule = {"effect": "deny", "token": [{"claim": {"pattern": "^permissions$"},
                                         "value": {"pattern": "orders:read"}, "presence": "must_absent"}]}
    assert decide([rule, ALLOW_ALL], claims={"permissions": ["orders:write"]}) == (Effect.DENY, 0)
    assert decide([rule, ALLOW_ALL], claims={"permissions": ["orders:read"]}) == (Effect.ALLOW, 1)
    assert decide([rule, ALLOW_ALL], claims={}) == (Effect.DENY, 0)


def test_array_claim_matches_when_any_element_matches() -> None:
    rule = {"effect": "allow", "token": [{"claim": {"pattern": "^roles$"}, "value": {"pattern": "^admin$"}}]}
    assert decide([rule], claims={"roles": ["viewer", "admin"]})[0] is Effect.ALLOW
    assert decide([rule], claims={"roles": ["viewer", "administrator"]})[0] is Effect.DENY


def test_nested_claims_use_dotted_names() -> None:
    rule = {"effect": "allow",
            "token": [{"claim": {"pattern": r"^realm_access\.roles$"}, "value": {"pattern": "^admin$"}}]}
    assert decide([rule], claims={"realm_access": {"roles": ["admin"]}})[0] is Effect.ALLOW
    assert decide([rule], claims={"roles": ["admin"]})[0] is Effect.DENY


def test_claim_pattern_selects_several_claims() -> None:
    rule = {"effect": "allow", "token": [{"claim": {"pattern": "^scope_"}, "value": {"pattern": "^write$"}}]}
    assert decide([rule], claims={"scope_a": "read", "scope_b": "write"})[0] is Effect.ALLOW


@pytest.mark.parametrize(("value", "pattern"), [(True, "^true$"), (42, "^42$"), (1.5, "^1.5$"), (None, "^null$")])
def test_numbers_booleans_and_null_use_json_spelling(value: object, pattern: str) -> None:
    rule = {"effect": "allow", "token": [{"claim": {"pattern": "^c$"}, "value": {"pattern": pattern}}]}
    assert decide([rule], claims={"c": value})[0] is Effect.ALLOW


def test_rule_conditions_are_anded() -> None:
    rule = {"effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/a"}},
            "token": [{"claim": {"pattern": "^sub$"}}]}
    assert decide([rule], "GET", "/a", {"sub": "u"})[0] is Effect.ALLOW
    assert decide([rule], "POST", "/a", {"sub": "u"})[0] is Effect.DENY
    assert decide([rule], "GET", "/b", {"sub": "u"})[0] is Effect.DENY
    assert decide([rule], "GET", "/a", {})[0] is Effect.DENY


def test_deny_wins_regardless_of_priority() -> None:
    allow_first = {"effect": "allow", "priority": 1}
    deny_later = {"effect": "deny", "priority": 50}
    assert decide([allow_first, deny_later]) == (Effect.DENY, 1)


def test_priority_orders_rules_and_ties_keep_file_order() -> None:
    rules = [{"effect": "deny", "priority": 20, "notes": "b"}, {"effect": "deny", "priority": 5},
             {"effect": "deny", "priority": 20}]
    assert decide(rules) == (Effect.DENY, 1)
    ties = [{"effect": "allow", "priority": 7}, {"effect": "allow", "priority": 7}]
    assert decide(ties) == (Effect.ALLOW, 0)


def test_default_priority_is_100() -> None:
    rules = [{"effect": "allow"}, {"effect": "allow", "priority": 99}]
    assert decide(rules) == (Effect.ALLOW, 1)


TENANT = {"effect": "allow", "methods": ["GET", "POST"],
          "variables": [{"name": "tenantId", "source": "jwtClaim", "key": "tenant_id"}],
          "path": {"path": {"pattern": "^/v1/tenants/{{tenantId}}/"}, "presence": "must_exist"}}


def test_variables_interpolate_claims_into_patterns() -> None:
    assert decide([TENANT], target="/v1/tenants/acme/orders", claims={"tenant_id": "acme"})[0] is Effect.ALLOW
    assert decide([TENANT], target="/v1/tenants/other/orders", claims={"tenant_id": "acme"})[0] is Effect.DENY


@pytest.mark.parametrize("tenant", [".*", "ac.e", "a|b", "(x)", "[a-z]+", "acme$|", "a^b{2}"])
def test_variable_values_are_regex_escaped(tenant: str) -> None:
    claims = {"tenant_id": tenant}
    assert decide([TENANT], target="/v1/tenants/acme/orders", claims=claims)[0] is Effect.DENY
    assert decide([TENANT], target=f"/v1/tenants/{tenant}/orders", claims=claims)[0] is Effect.ALLOW


def test_dotted_sub_matches_only_itself() -> None:
    rule = {"effect": "allow", "variables": [{"name": "me", "source": "jwtClaim", "key": "sub"}],
            "path": {"path": {"pattern": "^/users/{{me}}$"}}}
    assert decide([rule], target="/users/user.abc+1", claims={"sub": "user.abc+1"})[0] is Effect.ALLOW
    assert decide([rule], target="/users/userXabcc1", claims={"sub": "user.abc+1"})[0] is Effect.DENY


def test_unresolved_variable_never_matches_an_allow_rule() -> None:
    assert decide([TENANT], target="/v1/tenants/acme/orders", claims={})[0] is Effect.DENY


def test_unresolved_variable_matches_a_deny_rule() -> None:
    deny = {"effect": "deny", "variables": [{"name": "t", "source": "jwtClaim", "key": "tenant_id"}],
            "path": {"path": {"pattern": "^/v1/tenants/{{t}}/"}, "presence": "must_absent"}}
    assert decide([deny, ALLOW_ALL], target="/v1/tenants/acme/x", claims={}) == (Effect.DENY, 0)
    assert decide([deny, ALLOW_ALL], target="/v1/tenants/acme/x", claims={"tenant_id": "acme"}) == (Effect.ALLOW, 1)


def test_non_scalar_claim_is_an_unresolved_variable() -> None:
    assert decide([TENANT], target="/v1/tenants/acme/x", claims={"tenant_id": ["acme"]})[0] is Effect.DENY


@pytest.mark.parametrize(("source", "target", "headers"), [
    ({"source": "pathSegment", "index": 1}, "/v1/acme/items", {}),
    ({"source": "pathSegment", "index": -2}, "/v1/acme/items", {}),
    ({"source": "header", "key": "X-Tenant"}, "/v1/acme/items", {"x-tenant": "acme"}),
    ({"source": "query", "key": "tenant"}, "/v1/acme/items?tenant=acme", {}),
])
def test_variable_sources(source: dict[str, Any], target: str, headers: dict[str, str]) -> None:
    rule = {"effect": "allow", "variables": [{"name": "v", **source}],
            "token": [{"claim": {"pattern": "^tenant_id$"}, "value": {"pattern": "^{{v}}$"}}]}
    assert decide([rule], target=target, claims={"tenant_id": "acme"}, headers=headers)[0] is Effect.ALLOW
    assert decide([rule], target=target, claims={"tenant_id": "other"}, headers=headers)[0] is Effect.DENY


def test_repeated_query_parameter_is_ambiguous_and_unresolved() -> None:
    rule = {"effect": "allow", "variables": [{"name": "v", "source": "query", "key": "t"}],
            "token": [{"claim": {"pattern": "^tenant_id$"}, "value": {"pattern": "^{{v}}$"}}]}
    assert decide([rule], target="/?t=acme&t=other", claims={"tenant_id": "acme"})[0] is Effect.DENY


def test_builtin_sub_variable() -> None:
    rule = {"effect": "allow", "path": {"path": {"pattern": "^/me/{{sub}}$"}}}
    assert decide([rule], target="/me/u1", claims={"sub": "u1"})[0] is Effect.ALLOW
    assert decide([rule], target="/me/u2", claims={"sub": "u1"})[0] is Effect.DENY


def test_regexes_run_in_linear_time() -> None:
    # A catastrophic pattern for backtracking engines; RE2 answers at once.
    rule = {"effect": "allow", "path": {"path": {"pattern": "(a+)+$"}}}
    assert decide([rule], target="/" + "a" * 50_000 + "!")[0] is Effect.DENY
