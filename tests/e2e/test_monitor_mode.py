"""``mode: monitor`` through real Envoy: what enforcement would deny is let through and logged as such."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.ops_stack import ops_stack

pytestmark = pytest.mark.envoy

POLICY = """providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    mode: MODE
    rules:
      - effect: deny
        path: {path: {pattern: "^/v1/users/"}}
        token: [{claim: {pattern: "^sub$"}, value: {pattern: "^svc-"}}]
        notes: service accounts stay off user paths
      - {effect: allow, methods: [GET]}
"""


def test_monitor_mode_allows_and_logs_would_deny(tmp_path: Path) -> None:
    with ops_stack(tmp_path, POLICY.replace("MODE", "monitor")) as stack:
        service, user = stack.idp.token(sub="svc-reporting"), stack.idp.token(sub="user-1")
        monitored = stack.request("GET", "/v1/users/42", service)
        assert monitored.status == 200  # reached the application
        assert stack.upstream.requests[-1]["path"] == "/v1/users/42"
        assert stack.request("GET", "/v1/users/42", user).status == 200
        # Authentication is still enforced: monitor mode is about the rules.
        assert stack.request("GET", "/v1/users/42").status == 401

        by_id = stack.decisions()
        line = by_id[monitored.headers["x-extauthz-decision-id"]]
        assert line["result"] == "allow"
        assert line["monitored"] is True and line["would_deny"] is True
        assert line["code"] == "would_deny" and line["status"] == 200
        assert line["rule_index"] == 0 and line["rule_notes"] == "service accounts stay off user paths"
        assert "rule #0 (deny)" in line["reason"]
        others = [d for i, d in by_id.items() if i != monitored.headers["x-extauthz-decision-id"]]
        assert all("would_deny" not in d and "monitored" not in d for d in others)
        assert stack.metric("extauthz_decisions_total", proxy="orders-api", result="allow", code="would_deny",
                            rule="0") == 1.0


def test_enforce_mode_denies_the_same_request(tmp_path: Path) -> None:
    with ops_stack(tmp_path, POLICY.replace("MODE", "enforce")) as stack:
        denied = stack.request("GET", "/v1/users/42", stack.idp.token(sub="svc-reporting"))
        assert denied.status == 403
        line = stack.decisions()[denied.headers["x-extauthz-decision-id"]]
        assert line["result"] == "deny" and line["code"] == "forbidden" and "would_deny" not in line
