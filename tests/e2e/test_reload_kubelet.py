"""Hot reload under traffic through real Envoy, with the policy updated the way kubelet does it.

``policy.yaml -> ..data/policy.yaml``, ``..data -> ..<timestamp>``; an update
writes a new timestamped directory and renames a fresh symlink over ``..data``.
Every response must come from one whole policy: the decision id Envoy returns is
looked up in the sidecar's decision log, which names the policy digest that
decided, and the status must be what *that* policy says for the path.
"""

from __future__ import annotations

import hashlib
import http.client
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.ops_stack import OpsStack, kubelet_layout, kubelet_update, ops_stack

pytestmark = pytest.mark.envoy

TEMPLATE = """providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    rules:
      - effect: allow
        methods: [GET]
        path: {path: {pattern: "^/v1/ALLOWED$"}}
        notes: VERSION
"""
PATHS = ("/v1/orders", "/v1/products")


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def wait_until(condition: object, what: str, timeout: float = 30.0) -> None:
    """Wait for an event (never a fixed sleep); the timeout only bounds a hang."""
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Traffic(threading.Thread):
    """Requests through Envoy on one keep-alive connection until stopped (bounded)."""

    def __init__(self, stack: OpsStack, token: str) -> None:
        super().__init__(daemon=True)
        self.stack, self.token = stack, token
        self.results: list[tuple[str, int, str]] = []
        self.failures: list[str] = []
        self.stopped = threading.Event()

    def run(self) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", self.stack.ports.listener, timeout=10)
        for i in range(20_000):
            if self.stopped.is_set():
                break
            path = PATHS[i % 2]
            try:
                conn.request("GET", path, headers={"authorization": f"Bearer {self.token}"})
                response = conn.getresponse()
                response.read()
                self.results.append((path, response.status, response.getheader("x-extauthz-decision-id", "")))
            except (OSError, http.client.HTTPException) as exc:
                self.failures.append(f"{path}: {type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", self.stack.ports.listener, timeout=10)
        conn.close()

    def more(self, count: int) -> None:
        target = len(self.results) + count
        wait_until(lambda: len(self.results) >= target or not self.is_alive(), f"{count} more requests")


def test_kubelet_swaps_under_traffic_and_a_broken_policy_keeps_the_old_one(tmp_path: Path) -> None:
    mount = tmp_path / "policy"  # the ConfigMap volume
    versions: dict[str, str] = {}

    def render(allowed: str, version: str, idp_issuer: str, jwks_uri: str) -> str:
        text = TEMPLATE.replace("ALLOWED", allowed).replace("VERSION", version)
        return text.replace("JWKS_URI", jwks_uri).replace("ISSUER", idp_issuer)

    with ops_stack(tmp_path, TEMPLATE.replace("ALLOWED", "orders").replace("VERSION", "v1"),
                   policy_path=mount / "policy.yaml",
                   write_policy=lambda path, text: kubelet_layout(path.parent, {"policy.yaml": text})) as stack:
        v1 = render("orders", "v1", stack.idp.issuer, stack.idp.jwks_uri)
        v2 = render("products", "v2", stack.idp.issuer, stack.idp.jwks_uri)
        versions = {digest(v1): "orders", digest(v2): "products"}
        assert stack.readyz()["policy"]["digest"] == digest(v1)

        traffic = Traffic(stack, stack.idp.token(sub="user-1"))
        traffic.start()
        try:
            traffic.more(30)
            kubelet_update(mount, {"policy.yaml": v2, "other-key.yaml": "unrelated: 1\n"}, version=2)
            wait_until(lambda: stack.readyz()["policy"]["digest"] == digest(v2), "the v2 policy to be live")
            # One request may be in flight across the swap and rightly finish on v1 (it started there).
            swapped_at = len(traffic.results) + 1
            traffic.more(30)

            # A broken edit: a misspelled field, swapped in the same way.
            broken = v2.replace("      - effect: allow", "      - efect: allow")
            bad_line = broken.splitlines().index("      - efect: allow") + 1
            kubelet_update(mount, {"policy.yaml": broken}, version=3)
            wait_until(lambda: stack.metric("extauthz_policy_reloads_total", result="invalid") == 1.0,
                       "the broken policy to be rejected")
            rejected_at = len(traffic.results)
            traffic.more(30)
        finally:
            traffic.stopped.set()
            traffic.join(30)

        # No request failed or was answered by Envoy itself (503 when extauthz cannot answer).
        assert traffic.failures == []
        statuses = {status for _, status, _ in traffic.results}
        assert statuses <= {200, 403}, statuses

        # Every answer came from one whole policy, and is what that policy says.
        decisions = stack.decisions()
        seen: set[str] = set()
        for i, (path, status, decision_id) in enumerate(traffic.results):
            logged = decisions[decision_id]
            assert logged["policy"] in versions, logged
            seen.add(logged["policy"])
            allowed_path = f"/v1/{versions[logged['policy']]}"
            assert status == (200 if path == allowed_path else 403), (i, path, status, logged)
            if i >= swapped_at:
                assert logged["policy"] == digest(v2), "a request after the swap was decided by the old policy"
        assert seen == set(versions)
        assert all(decisions[d]["policy"] == digest(v2) for _, _, d in traffic.results[rejected_at:])

        # The broken policy is reported with file:line:field and the old one keeps serving.
        status = stack.readyz()
        assert status["ready"] is True
        assert status["policy"]["digest"] == digest(v2)
        assert status["lastReload"]["result"] == "invalid"
        expected = f"{mount / 'policy.yaml'}:{bad_line}: proxies[0].rules[0].efect: unknown field"
        assert any(e.startswith(expected) for e in status["lastReload"]["errors"]), status["lastReload"]
        failed = [e for e in stack.logs() if e.get("event") == "policy_reload_failed"]
        assert len(failed) == 1 and failed[0]["keeping_digest"] == digest(v2)
        assert any(e.startswith(expected) for e in failed[0]["errors"])
        assert stack.metric("extauthz_policy_file_rejected") == 1.0
        assert stack.metric("extauthz_policy_info", digest=digest(v2)) == 1.0
        assert stack.metric("extauthz_policy_info", digest=digest(v1)) is None
        assert stack.metric("extauthz_policy_reloads_total", result="ok") == 1.0

        # Rolled back to the content that runs: the alert and the status clear, nothing is reloaded.
        kubelet_update(mount, {"policy.yaml": v2}, version=4)
        wait_until(lambda: stack.metric("extauthz_policy_file_rejected") == 0.0, "the rejection to clear")
        status = stack.readyz()
        assert status["lastReload"]["result"] == "unchanged" and status["lastReload"]["errors"] == []
        assert status["policy"]["digest"] == digest(v2)
        assert stack.metric("extauthz_policy_reloads_total", result="ok") == 1.0
