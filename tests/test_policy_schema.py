"""The declared policy model: every shape error in one run, bounds on every duration and size, a published schema."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any, get_args

import jsonschema
import pytest
import yaml

from extauthz.policy import model
from extauthz.policy.errors import PolicyError
from extauthz.policy.loader import parse_policy
from extauthz.policy.schema import Effect as EffectNames
from extauthz.policy.schema import FilterEffect as FilterEffectNames
from extauthz.policy.schema import Mode as ModeNames
from extauthz.policy.schema import Presence as PresenceNames
from extauthz.policy.schema import VariableSource as SourceNames
from extauthz.policy.schema import json_schema
from tests.test_docs import BASE, blocks

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "docs" / "policy.schema.json"

SIX_MISTAKES = """\
providers:
  - name: idp
    issuer: https://idp.example.com
    audiences: [orders]
    jwksUri: https://idp.example.com/jwks
    audiance: orders
proxies:
  - name: orders
    providers: [idp, partner]
    mode: enforcing
    rules:
      - effect: allow
        priority: high
        path: {path: {pattern: "^/orders"}}
    filters:
      - path: {pattern: "^/orders("}
server:
  drainSeconds: -3
"""
EXPECTED = [
    (6, "providers[0].audiance", "unknown field (did you mean 'audience'?)"),
    (9, "proxies[0].providers", "no provider named 'partner'"),
    (10, "proxies[0].mode", "must be one of enforce, monitor, found 'enforcing'"),
    (13, "proxies[0].rules[0].priority", "must be an integer, found a string ('high')"),
    (16, "proxies[0].filters[0].path.pattern", "invalid regular expression"),
    (18, "server.drainSeconds", "must be zero or more, found -3"),
]


def test_six_independent_mistakes_are_reported_in_one_load() -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(SIX_MISTAKES, "policy.yaml")
    found = [(i.line, i.field, i.message) for i in caught.value.issues]
    assert len(found) == 6, "\n".join(map(str, caught.value.issues))
    for (line, field, words), (got_line, got_field, message) in zip(EXPECTED, found, strict=True):
        assert (got_line, got_field) == (line, field) and words in message, (got_line, got_field, message)


def test_validate_prints_all_six_in_one_run(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(SIX_MISTAKES)
    run = subprocess.run([sys.executable, "-m", "extauthz", "validate", str(tmp_path / "policy.yaml")],
                         capture_output=True, text=True, check=False)
    assert run.returncode == 1
    lines = [line for line in run.stderr.splitlines() if line.startswith(str(tmp_path))]
    assert [int(line.split(":")[1]) for line in lines] == [line for line, _, _ in EXPECTED], run.stderr


def policy_with(path: list[str | int], value: object) -> str:
    document: dict[str, Any] = {
        "providers": [{"name": "idp", "issuer": "https://idp.test", "audiences": ["a"],
                       "jwksUri": "https://idp.test/jwks"}],
        "proxies": [{"name": "p"}],
        "relationships": {"cache": {"redis": {"url": "redis://127.0.0.1:6379"}}},
        "server": {"tokenCache": {}},
    }
    node: Any = document
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return yaml.safe_dump(document)


@pytest.mark.parametrize(("path", "value", "words"), [
    (["providers", 0, "clockSkewSeconds"], -600, "must be zero or more, found -600"),
    (["providers", 0, "maxTokenAgeSeconds"], -5, "must be zero or more, found -5"),
    (["providers", 0, "jwksRefreshSeconds"], 0, "greater than"),
    (["providers", 0, "jwksTimeoutSeconds"], -1.5, "greater than"),
    (["server", "drainSeconds"], -3, "must be zero or more, found -3"),
    (["server", "maxBodyBytes"], -1, "greater than"),
    (["server", "workers"], 0, "greater than"),
    (["server", "tokenCache", "size"], -10, "must be zero or more"),
    (["server", "tokenCache", "ttlSeconds"], -60, "greater than"),
    (["relationships", "cache", "allowedTtlSeconds"], -1, "zero"),
    (["relationships", "cache", "maxEntries"], -100, "greater than"),
    (["relationships", "cache", "redis", "timeoutMs"], 5000, "at most 200"),
])
def test_negative_durations_and_sizes_are_refused(path: list[str | int], value: object, words: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(policy_with(path, value))
    assert any(words in issue.message for issue in caught.value.issues), str(caught.value)


def test_the_committed_schema_is_what_the_cli_prints() -> None:
    printed = subprocess.run([sys.executable, "-m", "extauthz", "schema"], capture_output=True, text=True,
                             check=True).stdout
    assert json.loads(printed) == json_schema()
    assert json.loads(COMMITTED.read_text()) == json_schema(), \
        "docs/policy.schema.json is stale: regenerate it with `extauthz schema > docs/policy.schema.json`"


def shipped_policies() -> list[Path]:
    return [REPO / "extauthz/examples/policy.yaml", *sorted(REPO.glob("k8s/**/policy.yaml"))]


@pytest.mark.parametrize("path", shipped_policies(), ids=lambda p: str(p.relative_to(REPO)))
def test_shipped_policies_validate_against_the_schema(path: Path) -> None:
    jsonschema.validate(yaml.safe_load(path.read_text()), json.loads(COMMITTED.read_text()))


def doc_policies() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for where, marker, body in blocks():
        if marker == "policy":
            out.append((where, {**BASE, **yaml.safe_load(body)}))
        elif marker == "policy-proxy":
            out.append((where, {**BASE, "proxies": [{"name": "p", **yaml.safe_load(body)}]}))
    return out


@pytest.mark.parametrize(("where", "document"), doc_policies(), ids=[w for w, _ in doc_policies()])
def test_every_policy_in_the_docs_validates_against_the_schema(where: str, document: dict[str, Any]) -> None:
    jsonschema.validate(document, json.loads(COMMITTED.read_text()))


def test_the_schema_refuses_what_the_loader_refuses_for_shape() -> None:
    schema = json.loads(COMMITTED.read_text())
    for path, value in ((["server", "drainSeconds"], -3), (["proxies", 0, "mode"], "enforcing"),
                        (["providers", 0, "audiance"], "x")):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(yaml.safe_load(policy_with(path, value)), schema)


@pytest.mark.parametrize(("names", "enum"), [
    (EffectNames, model.Effect), (FilterEffectNames, model.FilterEffect), (ModeNames, model.Mode),
    (PresenceNames, model.Presence), (SourceNames, model.VariableSource),
])
def test_the_declared_choices_are_the_runtime_enums(names: Any, enum: Any) -> None:
    assert set(get_args(names)) == {member.value for member in enum}


def test_the_declared_defaults_are_the_runtime_defaults() -> None:
    loaded = parse_policy(policy_with(["server", "tokenCache"], {}))
    provider, server, cache = loaded.providers["idp"], loaded.server, loaded.relationship_cache
    schema = json_schema()["$defs"]

    def default(section: str, name: str) -> Any:
        return schema[section]["properties"][name]["default"]

    assert provider.clock_skew_seconds == default("Provider", "clockSkewSeconds")
    assert provider.jwks_refresh_seconds == default("Provider", "jwksRefreshSeconds")
    assert provider.jwks_timeout_seconds == default("Provider", "jwksTimeoutSeconds")
    assert provider.require_exp == default("Provider", "requireExp")
    assert server.grpc_address == default("Server", "grpcAddress")
    assert server.workers == default("Server", "workers")
    assert server.max_body_bytes == default("Server", "maxBodyBytes")
    assert server.drain_seconds == default("Server", "drainSeconds")
    assert server.token_cache_size == default("TokenCache", "size")
    assert server.token_cache_ttl_seconds == default("TokenCache", "ttlSeconds")
    assert cache.allowed_ttl_seconds == default("RelationshipCache", "allowedTtlSeconds")
    assert cache.denied_ttl_seconds == default("RelationshipCache", "deniedTtlSeconds")
    assert cache.max_entries == default("RelationshipCache", "maxEntries")
    assert cache.redis_timeout_ms == default("Redis", "timeoutMs")
