"""/metrics, /healthz and /readyz scraped after real decisions made through Envoy."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from extauthz.demo.processes import free_port, wait_http
from tests.e2e.ops_stack import ops_stack

POLICY = """providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    rules:
      - {effect: deny, path: {path: {pattern: "^/v1/admin"}}, notes: no admin}
      - {effect: allow, methods: [GET]}
"""
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


@pytest.mark.envoy
def test_metrics_and_health_show_the_decisions_just_made(tmp_path: Path) -> None:
    with ops_stack(tmp_path, POLICY) as stack:
        token = stack.idp.token(sub="user-1")
        assert stack.request("GET", "/v1/orders", token).status == 200
        assert stack.request("GET", "/v1/orders", token, {"traceparent": TRACEPARENT}).status == 200
        assert stack.request("GET", "/v1/admin/users", token).status == 403
        assert stack.request("GET", "/v1/orders").status == 401
        digest = hashlib.sha256((tmp_path / "policy.yaml").read_bytes()).hexdigest()[:16]

        def decisions(**labels: str) -> float | None:
            return stack.metric("extauthz_decisions_total", proxy="orders-api", **labels)

        assert decisions(result="allow", code="allowed", rule="1") == 2.0
        assert decisions(result="deny", code="forbidden", rule="0") == 1.0
        assert decisions(result="deny", code="token_missing", rule="default") == 1.0
        assert stack.metric("extauthz_check_duration_seconds_count") == 4.0
        assert stack.metric("extauthz_token_cache_lookups_total", result="miss") == 1.0
        assert stack.metric("extauthz_token_cache_lookups_total", result="hit") == 2.0
        assert stack.metric("extauthz_jwks_fetches_total", provider="idp", result="ok") == 1.0
        age = stack.metric("extauthz_jwks_key_age_seconds", provider="idp")
        assert age is not None and age >= 0
        assert stack.metric("extauthz_ready") == 1.0
        assert stack.metric("extauthz_policy_info", digest=digest) == 1.0

        assert stack.get("/healthz") == (200, '{"status":"alive"}\n')
        status, body = stack.get("/readyz")
        ready = json.loads(body)
        assert status == 200
        assert ready["ready"] is True and ready["draining"] is False
        assert ready["policy"]["digest"] == digest
        assert ready["providers"]["idp"]["ready"] is True
        assert stack.get("/nope")[0] == 404

        # The decision log line carries the W3C trace context of the request.
        traced = [d for d in stack.decisions().values() if d.get("trace_id")]
        assert len(traced) == 1
        assert traced[0]["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
        assert traced[0]["span_id"] == "00f067aa0ba902b7"
        assert traced[0]["policy"] == digest


def test_readyz_is_503_until_keys_load_while_healthz_is_alive(tmp_path: Path) -> None:
    dead = free_port()  # nothing listens here: the provider's keys cannot load
    metrics_port = free_port()
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.replace("ISSUER", "https://idp.example").replace(
        "JWKS_URI", f"http://127.0.0.1:{dead}/jwks.json"))
    process = subprocess.Popen(
        [sys.executable, "-m", "extauthz", "serve", "--config", str(policy), "--grpc-address",
         f"127.0.0.1:{free_port()}", "--metrics-address", f"127.0.0.1:{metrics_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        wait_http(f"http://127.0.0.1:{metrics_port}/healthz", 30, process)
        import urllib.error
        import urllib.request

        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5)
        assert caught.value.code == 503
        body = json.loads(caught.value.read())
        assert body["ready"] is False
        assert body["providers"]["idp"]["ready"] is False
        # The error names what could not be fetched: a refused connection alone does not say where.
        assert body["providers"]["idp"]["lastError"].startswith(f"http://127.0.0.1:{dead}/jwks.json: ConnectError")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            assert "extauthz_ready 0.0" in r.read().decode()
    finally:
        process.terminate()
        process.wait(15)
