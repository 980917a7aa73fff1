"""Interpolated patterns cost bounded memory: a length cap on values, a byte budget on the cache.

Every value here stands for an attacker's path segment, header or claim: each
distinct one would be a new RE2 program, so neither its length nor the number
of distinct values may grow the sidecar without bound.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from typing import Any

import pytest

from extauthz.core.claims import Claims
from extauthz.core.request import HttpRequest
from extauthz.core.rules import NoRelationships, evaluate
from extauthz.filtering.engine import bind as bind_filter
from extauthz.policy.loader import load_filter, load_rule
from extauthz.policy.model import Effect, Proxy
from extauthz.policy.patterns import (
    CACHE_BUDGET_BYTES,
    MAX_VALUE_LENGTH,
    CompiledCache,
    Pattern,
    Template,
    compiled_cache,
    estimate_bytes,
)

TENANT = Pattern.parse("^/v1/tenants/{{tenantId}}/")
TENANT_RE2 = Pattern.parse("^/v1/tenants/{{tenantId}}/[a-z]")
"""Not literal around its value: bound through RE2 and the compiled cache."""


def value(i: int, length: int) -> str:
    head = f"{i:06d}-"
    return head + "v" * (length - len(head))


# --- the length cap ------------------------------------------------------------------


def test_a_value_over_the_cap_is_unresolved() -> None:
    assert TENANT.bind({"tenantId": "a" * (MAX_VALUE_LENGTH + 1)}) is None
    assert TENANT.bind({"tenantId": "a" * 40_000}) is None


def test_a_value_over_the_cap_never_reaches_the_cache() -> None:
    misses = compiled_cache.misses
    TENANT_RE2.bind({"tenantId": "b" * 40_000})
    assert compiled_cache.misses == misses


@pytest.mark.parametrize("source", ["^/v1/tenants/{{tenantId}}/", "^{{tenantId}}$", "^/v1/({{tenantId}}|all)/?$"])
def test_a_pattern_literal_around_its_value_binds_without_the_cache(source: str) -> None:
    """One caller's ``sub`` per binding (a filter's row test) kept ~550 bytes per caller in the cache."""
    pattern = Pattern.parse(source)
    misses, size = compiled_cache.misses, len(compiled_cache)
    for i in range(2000):
        bound = pattern.bind({"tenantId": f"t-{i}.x"})
        assert bound is not None and bound.matches(f"/v1/tenants/t-{i}.x/") == source.startswith("^/v1/tenants/")
        assert not bound.matches(f"/v1/tenants/t-{i}-x/")  # the dot is not a wildcard
    assert (compiled_cache.misses, len(compiled_cache)) == (misses, size)


@pytest.mark.parametrize("source", ["^{{tenantId}}?$", "^/v1/{{tenantId}}/[0-9]+$"])
def test_a_pattern_whose_syntax_reaches_into_its_value_goes_through_the_cache(source: str) -> None:
    """``{{x}}?`` makes only the value's last character optional: not a literal around the value."""
    misses = compiled_cache.misses
    assert Pattern.parse(source).bind({"tenantId": f"t-{misses}"}) is not None
    assert compiled_cache.misses == misses + 1


@pytest.mark.parametrize("tenant", ["acme", "a.b+c*", "x" * MAX_VALUE_LENGTH, "é" * MAX_VALUE_LENGTH,
                                    "\U0001f600" * MAX_VALUE_LENGTH])
def test_values_up_to_the_cap_bind_and_match_only_themselves(tenant: str) -> None:
    compiled = TENANT.bind({"tenantId": tenant})
    assert compiled is not None
    assert compiled.matches(f"/v1/tenants/{tenant}/orders")
    assert not compiled.matches(f"/v1/tenants/{tenant}x/orders")


def test_one_long_value_among_several_makes_the_pattern_unresolved() -> None:
    pattern = Pattern.parse("^/v1/{{org}}/{{team}}/")
    assert pattern.bind({"org": "o", "team": "t"}) is not None
    assert pattern.bind({"org": "o", "team": "t" * (MAX_VALUE_LENGTH + 1)}) is None
    assert pattern.bind({"org": "o"}) is None


def test_templates_are_not_capped() -> None:
    """A rendered template is a string for one request, not a cached program."""
    long = "u" * (MAX_VALUE_LENGTH * 4)
    assert Template.parse("user:{{sub}}").render({"sub": long}) == f"user:{long}"


def decide(rule: dict[str, Any], target: str, claims: Mapping[str, Any]) -> Effect:
    proxy = Proxy(name="p", providers=(), default_effect=Effect.DENY, rules=(load_rule(rule, 0),))
    verdict = asyncio.run(evaluate(proxy, HttpRequest.from_target("GET", target, headers={}), Claims.of(claims),
                                   NoRelationships()))
    return verdict.effect


TENANT_VARIABLE = [{"name": "tenantId", "source": "jwtClaim", "key": "tenant_id"}]


def test_an_allow_rule_does_not_match_an_over_cap_value() -> None:
    rule = {"effect": "allow", "variables": TENANT_VARIABLE,
            "path": {"path": {"pattern": "^/v1/tenants/{{tenantId}}/"}, "presence": "must_exist"}}
    ok, long = "t" * MAX_VALUE_LENGTH, "t" * (MAX_VALUE_LENGTH + 1)
    assert decide(rule, f"/v1/tenants/{ok}/x", {"tenant_id": ok}) is Effect.ALLOW
    assert decide(rule, f"/v1/tenants/{long}/x", {"tenant_id": long}) is Effect.DENY


def test_a_deny_rule_counts_an_over_cap_value_as_matched() -> None:
    deny = {"effect": "deny", "variables": TENANT_VARIABLE,
            "path": {"path": {"pattern": "^/v1/tenants/{{tenantId}}/"}, "presence": "must_absent"}}
    allow = {"effect": "allow"}
    long = "t" * (MAX_VALUE_LENGTH + 1)
    proxy = Proxy(name="p", providers=(), default_effect=Effect.DENY,
                  rules=(load_rule(deny, 0), load_rule(allow, 1)))
    request = HttpRequest.from_target("GET", f"/v1/tenants/{long}/x", headers={})
    verdict = asyncio.run(evaluate(proxy, request, Claims.of({"tenant_id": long}), NoRelationships()))
    assert verdict.effect is Effect.DENY
    assert verdict.rule is not None and verdict.rule.index == 0


def test_a_filter_with_an_over_cap_value_shows_no_rows() -> None:
    flt = load_filter({
        "defaultFilterOperation": "destroy",
        "variables": [{"name": "callerSub", "source": "jwtClaim", "key": "sub"}],
        "operations": [{"effect": "retain", "jsonPath": {"pattern": "^orders$"},
                        "matchField": {"pattern": "^userId$"}, "matchValue": {"pattern": "^{{callerSub}}$"}},
                       {"effect": "retain", "jsonPath": {"pattern": "^orders\\.userId$"}}],
    })
    long = "u" * (MAX_VALUE_LENGTH + 1)
    document = {"orders": [{"userId": long}, {"userId": "other"}]}
    assert bind_filter(flt, {"callerSub": "u"}).apply(document) == {"orders": []}
    assert bind_filter(flt, {"callerSub": long}).apply(document) == {"orders": []}
    assert bind_filter(flt, {"callerSub": "other"}).apply(document) == {"orders": [{"userId": "other"}]}


# --- the cache -----------------------------------------------------------------------


def test_a_pattern_without_placeholders_is_compiled_once_at_load() -> None:
    static = Pattern.parse("^/v1/orders$")
    misses = compiled_cache.misses
    assert static.bind({}) is static.bind({"x": "y"}) is static._static
    assert compiled_cache.misses == misses


def test_the_same_value_bound_twice_hits_the_cache() -> None:
    tenant = value(1, 40) + "-twice"
    first = TENANT_RE2.bind({"tenantId": tenant})
    hits, misses = compiled_cache.hits, compiled_cache.misses
    assert TENANT_RE2.bind({"tenantId": tenant}) is first
    assert (compiled_cache.hits, compiled_cache.misses) == (hits + 1, misses)


def test_the_byte_budget_is_respected_and_old_entries_are_evicted() -> None:
    cache = CompiledCache(1 << 20)
    sources = [f"^/v1/tenants/{value(i, 900)}/" for i in range(400)]
    for source in sources:
        cache.compile(source)
        assert cache.bytes <= cache.budget_bytes
    per_entry = estimate_bytes(sources[0])
    assert cache.evictions == len(sources) - len(cache)
    assert len(cache) == cache.budget_bytes // per_entry
    assert cache.bytes == len(cache) * per_entry
    assert sources[-1] in cache and sources[0] not in cache


def test_the_process_cache_stays_within_its_budget_under_many_distinct_900_char_values() -> None:
    count = CACHE_BUDGET_BYTES // estimate_bytes(f"^/v1/tenants/{value(0, 900)}/[a-z]") + 300
    evictions = compiled_cache.evictions
    for i in range(count):
        assert TENANT_RE2.bind({"tenantId": value(i, 900)}) is not None
    assert compiled_cache.bytes <= CACHE_BUDGET_BYTES
    assert compiled_cache.evictions > evictions


def test_a_recently_used_entry_survives_eviction() -> None:
    cache = CompiledCache(10 * estimate_bytes("^a$"))
    cache.compile("^a$")
    for i in range(30):
        cache.compile("^a$")
        cache.compile(f"^{i:02d}$")
    assert "^a$" in cache and "^00$" not in cache


def test_an_entry_larger_than_the_budget_is_compiled_but_not_kept() -> None:
    cache = CompiledCache(estimate_bytes("^small$"))
    cache.compile("^small$")
    big = cache.compile("^" + "b" * 100 + "$")
    assert big.matches("b" * 100)
    assert "^small$" in cache and len(cache) == 1


def test_the_estimate_grows_with_the_encoded_source() -> None:
    assert estimate_bytes("a" * 100) < estimate_bytes("é" * 100) < estimate_bytes("\U0001f600" * 100)
    assert estimate_bytes("\ud800") > 0  # a lone surrogate from a JSON claim must not raise here


def test_concurrent_binds_keep_the_accounting_exact() -> None:
    cache = CompiledCache(200 * estimate_bytes(f"^{value(0, 64)}$"))
    sources = [f"^{value(i, 64)}$" for i in range(600)]
    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(len(sources)):
                compiled = cache.compile(sources[(i * 7 + offset) % len(sources)])
                assert compiled.matches(sources[(i * 7 + offset) % len(sources)][1:-1])
        except BaseException as exc:  # a failed assertion in a thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(offset,)) for offset in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert cache.bytes <= cache.budget_bytes
    assert cache.bytes == sum(estimate_bytes(s) for s in sources if s in cache)
