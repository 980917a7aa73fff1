"""``extauthz validate`` warns when an allow rule admits paths that a filter meant for them does not cover."""

from __future__ import annotations

from pathlib import Path

import pytest

from extauthz.cli import main
from extauthz.policy.coverage import example, scope_drift
from extauthz.policy.loader import parse_policy

EXAMPLES = Path(__file__).resolve().parents[1] / "extauthz" / "examples"

DRIFTING = """
providers:
  - {name: idp, issuer: https://idp.example, jwksUri: "https://idp.example/jwks", audiences: [a]}
proxies:
  - name: docs
    rules:
      - {effect: allow, methods: [GET], path: {path: {pattern: "^/v1/docs"}}}
      - {effect: allow, methods: [POST], path: {path: {pattern: "^/v1/orders"}}}
    filters:
      - methods: [GET]
        path: {pattern: "^/v1/docs$"}
        defaultFilterOperation: retain
        operations: [{effect: destroy, jsonPath: {pattern: "^secret$"}}]
      - methods: [GET]
        path: {pattern: "^/v1/orders/?$"}
        defaultFilterOperation: retain
        operations: [{effect: destroy, jsonPath: {pattern: "^secret$"}}]
"""


def test_a_rule_wider_than_its_filter_is_reported_with_a_sample_path() -> None:
    drifts = scope_drift(parse_policy(DRIFTING))
    assert {(d.rule_index, d.filter_index, d.path) for d in drifts} == {
        (0, 0, "/v1/docs/x1"), (0, 0, "/v1/docs.json"),
    }  # the POST rule cannot meet a GET-only filter's responses
    assert "allow rule #0 admits '/v1/docs/x1', which no filter covers" in str(drifts[0])


def test_the_shipped_examples_do_not_drift() -> None:
    assert scope_drift(parse_policy((EXAMPLES / "policy.yaml").read_text(), base_dir=EXAMPLES)) == []


def test_validate_prints_the_warnings_and_still_succeeds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(DRIFTING)
    assert main(["validate", str(policy)]) == 0
    captured = capsys.readouterr()
    assert f"{policy}: warning: proxy docs: allow rule #0 admits '/v1/docs.json'" in captured.err
    assert f"{policy}: OK" in captured.out


@pytest.mark.parametrize("pattern, sample", [
    ("^/v1/orders$", "/v1/orders"), ("^/v1/(products|orders)/?$", "/v1/products"),
    ("^/v1/items/[^/]+$", "/v1/items/a"), ("^/v1/n/\\d{3}$", "/v1/n/111"), ("^/a(?:b|c)+d", "/abd"),
])
def test_sample_paths_match_their_pattern(pattern: str, sample: str) -> None:
    assert example(pattern) == sample
