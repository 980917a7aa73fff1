"""The admin service: reproducible generated code, live ``explain --admin`` against a running sidecar."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import pytest

from extauthz.admin import generate
from extauthz.admin.client import status_remote
from extauthz.cli import main
from extauthz.demo.idp import IdentityProvider
from extauthz.demo.processes import free_port
from tests.e2e.ops_stack import ops_stack


def test_regenerating_the_admin_code_gives_identical_files(tmp_path: Path) -> None:
    written = generate.generate(tmp_path)
    assert sorted(p.name for p in written) == sorted(generate.FILES)
    for path in written:
        committed = generate.OUTPUT / path.name
        assert path.read_bytes() == committed.read_bytes(), (
            f"{committed} is stale: run python -m extauthz.admin.generate")


POLICY = """providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    rules:
      - {effect: allow, methods: [GET], token: [{claim: {pattern: "^sub$"}, value: {pattern: "^user-"}}]}
server:
  adminAddress: 127.0.0.1:ADMIN_PORT
"""


def test_explain_uses_the_live_policy_and_live_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    admin = f"127.0.0.1:{free_port()}"

    def explain(*argv: str) -> str:
        assert main(["explain", "--admin", admin, *argv]) == 0
        return capsys.readouterr().out

    policy = POLICY.replace("ADMIN_PORT", admin.rsplit(":", 1)[1])
    with ops_stack(tmp_path, policy, with_envoy=False) as stack:
        path = tmp_path / "policy.yaml"
        first = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        # A real token, verified with the sidecar's own key set.
        out = explain("GET", "/v1/orders", "--token", stack.idp.token(sub="user-1"))
        assert out.startswith("decision  ALLOW 200 allowed")
        assert f"(policy {first})" in out and "the given token, verified" in out
        # A token signed by a key the live policy does not trust is refused by the live verifier.
        foreign = IdentityProvider()  # its own key, same issuer claim
        forged = foreign.keys[0].sign({"iss": stack.idp.issuer, "aud": "orders-api", "sub": "user-1",
                                       "exp": int(time.time()) + 60})
        assert explain("GET", "/v1/orders", "--token", forged).startswith("decision  DENY 401 invalid_token")
        # Claims are minted against a copy of the live policy.
        assert explain("GET", "/v1/orders", "--claims", '{"sub": "svc-1"}').startswith(
            "decision  DENY 403 forbidden")

        # After a reload, explain answers with the new policy.
        path.write_text(path.read_text().replace("^user-", "^svc-"))
        second = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        deadline = time.monotonic() + 30
        while stack.readyz()["policy"]["digest"] != second:
            assert time.monotonic() < deadline, "the edited policy was never loaded"
            time.sleep(0.05)
        out = explain("GET", "/v1/orders", "--claims", '{"sub": "svc-1"}')
        assert out.startswith("decision  ALLOW 200 allowed") and f"(policy {second})" in out

        status = status_remote(admin)
        assert status.ready and status.policy_digest == second
        assert status.last_reload_result == "reloaded"


def test_explain_admin_reports_an_unreachable_sidecar(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--admin", f"127.0.0.1:{free_port()}", "GET", "/"]) == 2
    assert "admin service at 127.0.0.1:" in capsys.readouterr().err
