"""``extauthz test``, ``explain`` and ``validate`` as a user runs them (the CLI entry point)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from extauthz.cli import main

EXAMPLES = Path(__file__).resolve().parents[1] / "extauthz" / "examples"
EXAMPLE_POLICY = EXAMPLES / "policy.yaml"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_the_shipped_example_tests_pass(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "test", str(EXAMPLES / "policy.test.yaml"))
    assert code == 0, out
    assert out.splitlines()[-1] == "10 passed, 0 failed"
    assert "PASS  a service account is kept off user-scoped paths  ->  deny 403 forbidden rule #1" in out


def test_a_failing_expectation_exits_1_with_the_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tests = tmp_path / "t.yaml"
    tests.write_text(f"""policy: {EXAMPLE_POLICY}
tests:
  - name: wrongly expected allow
    request: {{method: GET, path: /v1/users/42}}
    token: {{claims: {{sub: svc-reporting}}}}
    expect: {{result: allow, rule: 2}}
""")
    code, out, _ = run(capsys, "test", str(tests))
    assert code == 1
    assert "FAIL  wrongly expected allow  ->  deny 403 forbidden rule #1" in out
    assert "result: expected allow, got deny" in out
    assert "rule: expected rule #2, got rule #1" in out
    assert "-> #1 deny" in out  # the rule trace comes with a failure
    assert out.splitlines()[-1] == "0 passed, 1 failed"


def test_an_invalid_test_file_exits_2_naming_file_line_field(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tests = tmp_path / "t.yaml"
    tests.write_text(f"""policy: {EXAMPLE_POLICY}
tests:
  - name: typo
    expct: {{result: allow}}
""")
    code, _, err = run(capsys, "test", str(tests))
    assert code == 2
    assert f"{tests}:4: tests[0].expct: unknown field" in err


MINTING_POLICY = """providers:
  - {name: ec, issuer: https://ec.example, jwksUri: https://ec.example/jwks, audiences: [api],
     algorithms: [ES256], maxTokenAgeSeconds: 600}
  - {name: hs, issuer: https://hs.example, hmacSecretFile: secret.txt, audiences: [api], algorithms: [HS256]}
proxies:
  - name: api
    default: true
    providers: [ec]
    rules: [{effect: allow, token: [{claim: {pattern: "^role$"}, value: {pattern: "^admin$"}}]}]
  - name: internal
    hosts: [internal]
    providers: [hs]
    mode: monitor
    rules: [{effect: deny, path: {path: {pattern: "^/secret"}}}, {effect: allow}]
"""


def test_minted_tokens_are_still_verified_for_real(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policy.yaml").write_text(MINTING_POLICY)
    (tmp_path / "secret.txt").write_text("s" * 40)
    (tmp_path / "t.yaml").write_text("""policy: policy.yaml
tests:
  - {name: es256 admin, request: {path: /}, token: {claims: {role: admin}}, expect: {result: allow, rule: 0}}
  - {name: not an admin, request: {path: /}, token: {claims: {role: user}}, expect: {result: deny, rule: default}}
  - name: another issuer
    request: {path: /}
    token: {claims: {role: admin, iss: "https://evil.example"}}
    expect: {result: deny, status: 401, code: invalid_token}
  - name: another audience
    request: {path: /}
    token: {claims: {role: admin, aud: other}}
    expect: {result: deny, status: 401, code: invalid_token}
  - name: too old for maxTokenAgeSeconds
    request: {path: /}
    token: {claims: {role: admin, iat: 1000000000}}
    expect: {result: deny, status: 401, code: invalid_token}
  - name: a token of the other provider is not trusted here
    request: {path: /}
    token: {claims: {role: admin}, provider: hs}
    expect: {result: deny, status: 401, code: invalid_token}
  - name: hs256 in monitor mode
    request: {path: /secret, host: internal}
    token: {claims: {sub: x}}
    expect: {result: allow, code: would_deny, rule: 0, monitored: true}
""")
    code, out, _ = run(capsys, "test", str(tmp_path / "t.yaml"))
    assert code == 0, out
    assert out.splitlines()[-1] == "7 passed, 0 failed"


def test_relationship_conditions_are_scripted_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "policy.yaml").write_text("""providers:
  - {name: idp, issuer: https://idp.example, jwksUri: https://idp.example/jwks, audiences: [api]}
relationships:
  openfga:
    - {url: "http://127.0.0.1:1", storeId: 01ARZ3NDEKTSV4RRFFQ69G5FAV, authorizationModelId: 01ARZ3NDEKTSV4RRFFQ69G5FAW}
proxies:
  - name: api
    rules:
      - effect: allow
        variables: [{name: doc, source: pathSegment, index: 1}]
        fga: {user: "user:{{sub}}", relation: viewer, object: "doc:{{doc}}"}
""")
    (tmp_path / "t.yaml").write_text("""policy: policy.yaml
tests:
  - name: viewer
    request: {path: /docs/1}
    token: {claims: {sub: anne}}
    relationships: [{rule: 0, exists: true}]
    expect: {result: allow, rule: 0}
  - name: not a viewer
    request: {path: /docs/1}
    token: {claims: {sub: anne}}
    relationships: [{rule: 0, exists: false}]
    expect: {result: deny, rule: default}
  - name: unscripted stays unresolved and fails closed
    request: {path: /docs/1}
    token: {claims: {sub: anne}}
    expect: {result: deny, rule: default}
""")
    code, out, _ = run(capsys, "test", str(tmp_path / "t.yaml"), "-v")
    assert code == 0, out
    assert "relationship unresolved" in out


def test_explain_prints_the_decision_and_why_each_rule_did_or_did_not_match(
        capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "--config", str(EXAMPLE_POLICY), "GET", "/v1/users/42",
                       "--claims", '{"sub": "svc-reporting", "tenant_id": "acme"}')
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "decision  DENY 403 forbidden"
    assert lines[1] == "reason    rule #1 (deny): Block service account subs from user-scoped resource paths"
    assert "#0 deny  p1    not matched  claim ^sub$ is present (must_absent)" in out
    assert "-> #1 deny  p2    MATCHED      all conditions match" in out
    assert "#2 allow p10   not matched  path '/v1/users/42' does not match '^/v1/(products|orders)/?'" in out
    assert "#3 deny  p100  not matched  method GET not in ['PATCH', 'POST', 'PUT']" in out


def test_explain_json_never_shows_the_upstream_secret(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "explain", "--config", str(EXAMPLE_POLICY), "GET", "/v1/orders",
                       "--claims", '{"sub": "user-123", "tenant_id": "acme"}', "--json")
    assert code == 0
    document = json.loads(out)
    assert document["result"] == "allow" and document["rule"] == 2
    assert document["upstream_headers"]["x-auth-sub"] == "user-123"
    assert document["upstream_headers"]["authorization"] == "<targetCredential, hidden>"
    secret = (EXAMPLES / "upstream-api-key.txt").read_text().strip()
    assert secret not in out


SERVER_BROKEN = """providers:
  - name: idp
    issuer: https://idp.example
    audiences: [api]
    jwks: {keys: [{kty: EC, crv: P-256, use: sig}]}
proxies:
  - name: api
    rules: [{effect: allow}]
server:
  grpcAddress: "9001"
  adminAddress: 0.0.0.0:9003
  tls:
    certFile: cert.pem
    keyFile: key.pem
"""


def test_validate_rejects_what_the_server_would_reject_and_serve_agrees(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(SERVER_BROKEN)
    (tmp_path / "cert.pem").write_text("not a certificate")
    (tmp_path / "key.pem").write_text("not a key")
    code, _, err = run(capsys, "validate", str(policy))
    assert code == 1
    expected = [
        f"{policy}:5: providers[0].jwks: provider idp: JWKS has no usable signing keys",
        f"{policy}:10: server.grpcAddress: must be HOST:PORT or unix:/PATH, found '9001'",
        f"{policy}:11: server.adminAddress: the admin service is unauthenticated and binds to loopback only",
        f"{policy}:13: server.tls.certFile: {tmp_path / 'cert.pem'} is not a PEM certificate chain",
    ]
    for line in expected:
        assert any(e.startswith(line) for e in err.splitlines()), (line, err)

    served = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", str(policy)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert served.returncode == 3  # Exit.POLICY: the server rejects the same file
    for line in expected:
        assert line in served.stderr


def test_validate_accepts_the_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "validate", str(EXAMPLE_POLICY))
    assert code == 0 and ": OK (digest " in out


def test_explain_and_test_close_the_relationship_pools_they_open(tmp_path: Path) -> None:
    """With a real OpenFGA answering (a live keep-alive connection in the pool), explain and test
    exit 0 without "Unclosed client session"/"Unclosed connector" or any ResourceWarning."""
    from tests.openfga_server import journeys_server

    with journeys_server() as fga:
        (tmp_path / "policy.yaml").write_text(f"""providers:
  - {{name: idp, issuer: https://idp.example, jwksUri: "http://127.0.0.1:1/jwks", audiences: [api]}}
relationships:
  openfga:
    - {json.dumps(fga.backend())}
proxies:
  - name: api
    rules:
      - effect: allow
        variables: [{{name: journeyId, source: pathSegment, index: 1}}]
        fga: {{user: "user:{{{{sub}}}}", relation: viewer, object: "journey:{{{{journeyId}}}}"}}
""")
        (tmp_path / "t.yaml").write_text("""policy: policy.yaml
tests:
  - name: viewer
    request: {path: /journeys/roadmap}
    token: {claims: {sub: anne}}
    relationships: [{rule: 0, exists: true}]
    expect: {result: allow, rule: 0}
""")
        cli = [sys.executable, "-W", "always::ResourceWarning", "-m", "extauthz"]
        explain = subprocess.run(
            [*cli, "explain", "--config", str(tmp_path / "policy.yaml"), "GET", "/journeys/roadmap",
             "--claims", '{"sub": "anne"}'],
            check=False, capture_output=True, text=True, timeout=60,
        )
        asked = len(fga.calls)
        tested = subprocess.run([*cli, "test", str(tmp_path / "t.yaml")],
                                check=False, capture_output=True, text=True, timeout=60)
    assert explain.returncode == 0, explain.stderr
    assert explain.stdout.startswith("decision  ALLOW 200"), explain.stdout  # OpenFGA was asked and said yes
    assert asked >= 1
    assert tested.returncode == 0, tested.stdout + tested.stderr
    for done in (explain, tested):
        assert "Unclosed" not in done.stderr, done.stderr
        assert "ResourceWarning" not in done.stderr, done.stderr
