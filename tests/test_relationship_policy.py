"""The ``relationships`` section and ``fga``/``authzen`` conditions are checked at load, not per request."""

from __future__ import annotations

import re
from typing import Any

import pytest
import yaml

from extauthz.policy.errors import PolicyError
from extauthz.policy.loader import parse_policy
from tests.openfga_server import policy_document

STORE, MODEL = "01HXYZ00000000000000000000", "01HXYZ00000000000000000001"
RULE = {"effect": "allow", "fga": {"user": "user:{{sub}}", "relation": "viewer", "object": "doc:1"}}


def backend(**overrides: Any) -> dict[str, Any]:
    return {"name": "fga", "url": "http://fga:8080", "storeId": STORE, "authorizationModelId": MODEL,
            **overrides}


def load(rules: list[dict[str, Any]] | None = None, **kwargs: Any) -> Any:
    kwargs.setdefault("openfga", [backend()])
    return parse_policy(yaml.safe_dump(policy_document(rules or [RULE], **kwargs)))


def test_a_valid_section_loads() -> None:
    policy = load(cache={"allowedTtlSeconds": 0, "deniedTtlSeconds": 2.5,
                         "redis": {"url": "rediss://:pw@redis:6380/1", "timeoutMs": 30}})
    assert policy.openfga["fga"].timeout_ms == 150
    assert policy.relationship_cache.allowed_ttl_seconds == 0
    assert policy.proxies[0].rules[0].fga.backend == "fga"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"openfga": [backend(storeId="my-store")]}, "storeId: must be a ULID"),
    ({"openfga": [backend(authorizationModelId="01hxyz00000000000000000001")]}, "must be a ULID"),
    ({"openfga": [backend(timeoutMs=900)]}, "timeoutMs: must be at most 500"),
    ({"openfga": [backend(url="fga:8080")]}, "url: must be an absolute http/https URL"),
    ({"openfga": [backend(), backend()]}, "backend name 'fga' is used twice"),
    ({"cache": {"deniedTtlSeconds": -1}}, "deniedTtlSeconds: must be zero"),
    ({"cache": {"redis": {"url": "http://redis:6379"}}}, "redis.url: must be an absolute redis/rediss/unix URL"),
    ({"cache": {"redis": {"url": "redis://r", "timeoutMs": 1000}}}, "timeoutMs: must be at most 200"),
])
def test_mistakes_are_load_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(PolicyError, match=re.escape(message)):
        load(**kwargs)


def test_templates_may_only_use_declared_variables() -> None:
    rule = {"effect": "allow", "fga": {
        "user": "user:{{sub}}", "relation": "viewer", "object": "doc:{{docId}}",
        "contextualTuples": [{"user": "user:{{sub}}", "relation": "member", "object": "org:{{org}}",
                              "condition": {"name": "in_region", "context": {"region": "{{region}}"}}}],
        "context": {"nested": ["{{ip}}"]}}}
    with pytest.raises(PolicyError) as error:
        load([rule])
    text = str(error.value)
    for name in ("docId", "org", "region", "ip"):
        assert f"no variable {name!r} is declared" in text


def test_a_contextual_tuple_condition_needs_a_name() -> None:
    rule = {"effect": "allow", "fga": {"user": "user:{{sub}}", "relation": "viewer", "object": "doc:1",
                                       "contextualTuples": [{"user": "user:a", "relation": "r", "object": "o:1",
                                                             "condition": {"context": {}}}]}}
    with pytest.raises(PolicyError, match=re.escape("condition.name: required field is missing")):
        load([rule])


def test_a_rule_names_an_existing_backend() -> None:
    rule = {"effect": "allow", "fga": {**RULE["fga"], "backend": "other"}}
    with pytest.raises(PolicyError, match="no openfga backend named 'other'"):
        load([rule])
