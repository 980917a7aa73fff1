"""Policy loading: the seed examples (tests/fixtures/seeds) load verbatim; every error names file, line and field."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from extauthz.policy.errors import PolicyError
from extauthz.policy.loader import load_filter, load_policy, load_rule, parse_policy
from extauthz.policy.model import Effect, FilterEffect, Presence

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "seeds"
# The seed documents themselves are reference data kept beside the repository, not in it (CI has them).
SEEDS = Path(__file__).resolve().parents[2] / "shared" / "seeds"
EXAMPLE = Path(__file__).resolve().parents[1] / "extauthz" / "examples" / "policy.yaml"
SEED_NAMES = ["000", "003"]
KINDS = ("rules", "filters")


def seed_objects(name: str) -> list[tuple[str, dict[str, Any]]]:
    """The rule and filter objects of a seed, as copied into tests/fixtures/seeds: (kind, object), rules first."""
    objects = []
    for kind in KINDS:
        path = FIXTURES / f"{name}_{kind}.json"
        if path.exists():
            objects += [(kind, obj) for obj in json.loads(path.read_text())]
    return objects


def seed_text_objects(name: str) -> list[tuple[str, dict[str, Any]]]:
    """The JSON bodies posted to /rules and /filters in a seed document, as pasted there, in the seed's order."""
    text = next(SEEDS.glob(f"{name}_*.txt")).read_text()
    objects = []
    for match in re.finditer(r"POST /clients/\{clientId\}/proxies/\{proxyId\}/(rules|filters)\s*\n?", text):
        start = text.index("{", match.end())
        depth, end = 0, start
        for end in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[end], 0)
            if depth == 0:
                break
        objects.append((match.group(1), json.loads(text[start:end + 1])))
    return objects


@pytest.mark.skipif(not SEEDS.is_dir(), reason="needs the seed documents in ../shared/seeds "
                                               "(reference data outside this repository)")
@pytest.mark.parametrize("seed", SEED_NAMES)
def test_the_fixtures_still_equal_the_seed_documents(seed: str) -> None:
    """Every rule and filter object of the seed text is in the fixtures, unchanged and in order, and no more."""
    in_text = seed_text_objects(seed)
    for kind in KINDS:
        assert [o for k, o in seed_objects(seed) if k == kind] == [o for k, o in in_text if k == kind], kind


@pytest.mark.parametrize("seed", SEED_NAMES)
def test_seed_rule_and_filter_objects_load_verbatim(seed: str) -> None:
    objects = seed_objects(seed)
    assert objects, "seed has rule objects"
    for kind, obj in objects:
        parsed = load_rule(obj) if kind == "rules" else load_filter(obj)
        assert parsed.notes == obj["notes"]


def test_seed_003_filter_semantics_are_parsed() -> None:
    (_, obj), = [o for o in seed_objects("003") if o[0] == "filters"]
    f = load_filter(obj)
    assert f.default_operation is FilterEffect.DESTROY
    assert [op.priority for op in f.operations] == [5, 10]  # sorted by priority
    assert f.operations[1].is_row and not f.operations[0].is_row


def test_seed_000_must_absent_rule() -> None:
    (_, obj), *_ = seed_objects("000")
    rule = load_rule(obj)
    assert rule.effect is Effect.DENY and rule.token[0].presence is Presence.MUST_ABSENT
    assert rule.methods == frozenset({"GET"})


def test_example_policy_loads() -> None:
    policy = load_policy(EXAMPLE)
    assert [p.name for p in policy.proxies] == ["orders-api"]
    assert len(policy.digest) == 16


def errors(text: str) -> list[str]:
    with pytest.raises(PolicyError) as info:
        parse_policy(text, "policy.yaml")
    return [str(i) for i in info.value.issues]


BASE = """\
providers:
  - name: idp
    issuer: https://idp.example
    audiences: [api]
    jwksUri: https://idp.example/jwks
proxies:
  - name: api
    rules:
"""


def test_unknown_field_names_line_field_and_suggestion() -> None:
    found = errors(BASE + "      - effect: allow\n        methdos: [GET]\n")
    assert found == ["policy.yaml:10: proxies[0].rules[0].methdos: unknown field (did you mean 'methods'?); "
                     "allowed: authzen, effect, fga, methods, notes, path, priority, token, variables"]


def test_bad_enum_value() -> None:
    (found,) = errors(BASE + "      - effect: permit\n")
    assert found.startswith("policy.yaml:9: proxies[0].rules[0].effect: must be one of allow, deny")


def test_bad_regex_names_the_pattern_field() -> None:
    (found,) = errors(BASE + "      - effect: allow\n        path: {path: {pattern: '^/v1/(orders'}}\n")
    assert found.startswith("policy.yaml:10: proxies[0].rules[0].path.path.pattern: invalid regular expression")


def test_lookaround_is_rejected_because_re2_is_linear() -> None:
    (found,) = errors(BASE + "      - effect: allow\n        path: {path: {pattern: '^/(?!admin)'}}\n")
    assert "RE2" in found and "path.path.pattern" in found


def test_undeclared_variable_is_an_error() -> None:
    (found,) = errors(BASE + "      - effect: allow\n        path: {path: {pattern: '^/t/{{tenant}}/'}}\n")
    assert "uses {{tenant}} but no variable 'tenant' is declared" in found


def test_wrong_type() -> None:
    (found,) = errors(BASE + "      - effect: allow\n        priority: high\n")
    assert found == "policy.yaml:10: proxies[0].rules[0].priority: must be an integer, found a string ('high')"


def test_duplicate_keys_are_errors_not_silently_overwritten() -> None:
    (found,) = errors(BASE + "      - effect: allow\n        effect: deny\n")
    assert found.startswith("policy.yaml:10:") and "duplicate field 'effect'" in found


def test_all_errors_are_reported_at_once() -> None:
    found = errors(BASE + "      - effect: permit\n      - effect: allow\n        bogus: 1\n")
    assert [f.split(":")[1] for f in found] == ["9", "11"]


def test_yaml_syntax_error_has_a_line() -> None:
    (found,) = errors("providers: [\n  - name: x\n")
    assert re.match(r"policy.yaml:\d+: <root>: not valid YAML/JSON", found)


def test_json_policies_are_accepted_with_lines() -> None:
    text = json.dumps({"providers": [{"name": "i", "issuer": "x", "audiences": ["a"], "jwksUri": "http://j"}],
                       "proxies": [{"name": "p", "rules": [{"effect": "nope"}]}]}, indent=2)
    (found,) = errors(text)
    assert ".rules[0].effect: must be one of allow, deny" in found and found.split(":")[1].isdigit()


@pytest.mark.parametrize(("provider", "message"), [
    ("    algorithms: [HS256, RS256]\n    hmacSecretFile: s\n", "cannot be mixed"),
    ("    algorithms: [none]\n", "unsupported algorithm 'none'"),
    ("    jwksFile: x.json\n", "exactly one key source"),
    ("    audiences: []\n", "at least one audience"),
])
def test_provider_errors(provider: str, message: str) -> None:
    text = BASE.replace("    jwksUri: https://idp.example/jwks\n", "    jwksUri: https://idp.example/jwks\n" + provider)
    if "audiences: []" in provider:
        text = text.replace("    audiences: [api]\n", "")
    assert any(message in f for f in errors(text + "      - effect: allow\n"))


def test_target_credential_must_come_from_file_or_env(tmp_path: Path) -> None:
    upstream = "    upstream:\n      targetCredential: {header: authorization, file: missing.txt}\n"
    found = errors(BASE.replace("    rules:\n", upstream))
    assert any("targetCredential.file: cannot read" in f for f in found)


def test_unknown_provider_reference() -> None:
    text = BASE.replace("  - name: api\n", "  - name: api\n    providers: [other]\n")
    (found,) = errors(text + "      - effect: allow\n")
    assert "no provider named 'other'" in found


def test_validate_cli_prints_file_line_field_and_fails(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text(BASE + "      - effect: allow\n        methods: [GETT]\n")
    result = subprocess.run([sys.executable, "-m", "extauthz", "validate", str(broken)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 1
    assert f"{broken}:10: proxies[0].rules[0].methods[0]: must be an HTTP method, found 'GETT'" in result.stderr


def test_validate_cli_accepts_the_example() -> None:
    result = subprocess.run([sys.executable, "-m", "extauthz", "validate", str(EXAMPLE)],
                            capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize("text, line, words", [
    ('providers:\n  - name: x\n    issuer: "a\n    audiences: [a]\nproxies: []\n', 3,
     "while scanning a quoted scalar at line 3, column 13"),
    ("a: 1\nb: [1, 2\nc: 3\n", 2, "at line 3, column 2 (while parsing a flow sequence at line 2, column 4)"),
    ("providers:\n  - name: x\n    issuer: a\n   jwksUri: x\n", 4, "at line 4, column 4"),
])
def test_a_syntax_error_names_the_line_to_fix_and_a_column(text: str, line: int, words: str) -> None:
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    (issue,) = caught.value.issues
    assert issue.line == line and words in issue.message, issue


@pytest.mark.parametrize("pattern, reason", [
    ("^/v1/(orders", "invalid regular expression '^/v1/(orders': missing )"),
    ("(?<=a)b", "invalid perl operator at '(?<='"),
])
def test_a_bad_regex_is_explained_in_text(pattern: str, reason: str) -> None:
    rule = {"effect": "allow", "path": {"path": {"pattern": pattern}}}
    text = "providers: []\nproxies:\n  - name: p\n    rules:\n      - " + json.dumps(rule) + "\n"
    with pytest.raises(PolicyError) as caught:
        parse_policy(text, "p.yaml")
    message = str(caught.value)
    assert reason in message and ": b'" not in message, message  # text, not Python bytes
