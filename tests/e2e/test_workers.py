"""``extauthz serve --workers 2`` behind the real Envoy on the shipped config.

Envoy keeps one HTTP/2 connection per worker thread to a cluster, and the kernel
spreads *connections* over the workers' shared port, so Envoy must open new
connections now and then for the load to spread (``spread_connections``, as
docs/operations.md tells operators to configure it).
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.ops_stack import OpsStack, alive, ops_stack, wait_until

pytestmark = pytest.mark.envoy

POLICY = """
providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    rules:
      - {effect: deny, path: {path: {pattern: "^/v1/admin"}}}
      - {effect: allow, methods: [GET]}
    filters:
      - methods: [GET]
        path: {pattern: "^/v1/orders"}
        defaultFilterOperation: retain
        operations: [{effect: destroy, jsonPath: {pattern: "^orders\\\\.internalRef$"}}]
server:
  drainSeconds: 2
"""
HTTP_OPTIONS = "envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def spread_connections(config: dict[str, Any]) -> None:
    """The setting docs/operations.md gives for workers: Envoy replaces a connection after N streams."""
    for cluster in config["static_resources"]["clusters"]:
        if cluster["name"] == "extauthz":
            options = cluster["typed_extension_protocol_options"][HTTP_OPTIONS]
            options.setdefault("common_http_protocol_options", {})["max_requests_per_connection"] = 20




def per_worker(stack: OpsStack) -> dict[str, float]:
    return {worker: stack.metric("extauthz_worker_decisions_total", worker=worker) or 0.0 for worker in ("0", "1")}


class Load:
    """A few clients sending requests in a loop, counting the answers (each client has one in flight)."""

    def __init__(self, stack: OpsStack, clients: int = 3) -> None:
        self.token = stack.idp.token(sub="user-123")
        self.stack = stack
        self.statuses: Counter[int] = Counter()
        self.failures: list[tuple[float, float, int]] = []
        """(sent, answered, status) of every answer but 200, on the monotonic clock."""
        self.leaked = 0
        self._done = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(path,))
                         for path in ("/v1/orders", "/v1/x", "/v1/orders")[:clients]]

    def _run(self, path: str) -> None:
        while not self._done.is_set():
            sent = time.monotonic()
            response = self.stack.request("GET", path, self.token)
            self.statuses[response.status] += 1
            if response.status != 200:
                self.failures.append((sent, time.monotonic(), response.status))
            self.leaked += b"internalRef" in response.body

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        for thread in self._threads:
            thread.join(20)

    @property
    def clients(self) -> int:
        return len(self._threads)

    def total(self) -> int:
        return sum(self.statuses.values())


def test_both_workers_answer_and_metrics_are_totals(tmp_path: Path) -> None:
    with ops_stack(tmp_path, POLICY, extra_args=["--workers", "2"], edit_envoy=spread_connections) as stack:
        token = stack.idp.token(sub="user-123")
        answers = Counter(stack.request("GET", "/v1/orders", token).status for _ in range(150))
        assert stack.request("GET", "/v1/admin/x", token).status == 403
        assert answers == {200: 150}
        spread = per_worker(stack)
        assert spread["0"] > 0 and spread["1"] > 0, spread  # both processes decided
        # One scrape, the whole sidecar: the totals count every worker's decisions once.
        assert spread["0"] + spread["1"] == 151
        assert stack.metric("extauthz_decisions_total", proxy="orders-api", result="allow", code="allowed",
                            rule="1") == 150.0
        assert stack.metric("extauthz_decisions_total", proxy="orders-api", result="deny", code="forbidden",
                            rule="0") == 1.0
        assert stack.metric("extauthz_check_duration_seconds_count") == 151.0
        assert stack.metric("extauthz_response_filter_outcomes_total", proxy="orders-api", outcome="filtered",
                            code="") == 150.0
        # Caches and key sets are per worker: each fetched the keys and verified the token once.
        assert stack.metric("extauthz_jwks_fetches_total", provider="idp", result="ok") == 2.0
        assert stack.metric("extauthz_token_cache_lookups_total", result="miss") == 2.0
        assert stack.metric("extauthz_workers") == 2.0 and stack.metric("extauthz_ready") == 1.0
    # Three processes share stderr, and each log line still arrives whole.
    lines = [line for line in stack.log_path.read_text().splitlines() if line]
    assert all(json.loads(line) for line in lines)
    events = [json.loads(line) for line in lines]
    assert {e.get("worker") for e in events if e.get("event") == "listening"} == {0, 1}
    # The per-request lines (written without structlog) name their worker too.
    assert {e.get("worker") for e in events if e.get("event") in ("decision", "response_filtered")} == {0, 1}


def test_a_killed_worker_is_replaced_while_requests_keep_succeeding(tmp_path: Path) -> None:
    with ops_stack(tmp_path, POLICY, extra_args=["--workers", "2"], edit_envoy=spread_connections) as stack:
        wait_until(lambda: stack.get("/readyz")[0] == 200, "both workers ready")
        victim = stack.readyz()["workers"][0]["pid"]
        with Load(stack) as load:
            wait_until(lambda: load.total() >= 50, "load before the kill")
            killed_at = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_until(lambda: stack.get("/readyz")[0] == 200 and stack.readyz()["workers"][0]["pid"] != victim,
                       "the replacement worker to be ready")
            replaced = per_worker(stack)["0"]
            wait_until(lambda: per_worker(stack)["0"] > replaced, "the replacement to take requests")
            after = load.total()
            wait_until(lambda: load.total() >= after + 50, "load after the replacement")
        # What was in flight to the killed worker fails closed (Envoy's 503): at most one request per
        # client, answered after the kill; nothing else fails.
        around_kill = [(round(s - killed_at, 3), round(e - killed_at, 3), status) for s, e, status in load.failures]
        assert set(load.statuses) <= {200, 503}, around_kill
        assert len(load.failures) <= load.clients, around_kill
        assert all(answered > killed_at for _, answered, _ in load.failures), around_kill
        assert load.leaked == 0
        assert stack.metric("extauthz_worker_restarts_total") == 1.0


def test_sigterm_drains_every_worker_under_load_then_exits(tmp_path: Path) -> None:
    with ops_stack(tmp_path, POLICY, extra_args=["--workers", "2"], edit_envoy=spread_connections) as stack:
        wait_until(lambda: stack.get("/readyz")[0] == 200, "both workers ready")
        pids = [w["pid"] for w in stack.readyz()["workers"]]
        with Load(stack) as load:
            wait_until(lambda: load.total() >= 30, "load before SIGTERM")
            stack.process.send_signal(signal.SIGTERM)
            assert stack.get("/readyz")[0] == 503  # Kubernetes stops routing at once...
            during = load.total()
            wait_until(lambda: load.total() >= during + 10, "load inside the drain window")
        assert stack.process.wait(30) == 0
        assert not any(alive(pid) for pid in pids)
    assert set(load.statuses) == {200}, load.statuses  # ...and nothing arriving during the drain failed
    assert load.leaked == 0
    drained = [e for e in stack.logs() if e.get("event") == "draining" and "worker" in e]
    assert sorted(e["worker"] for e in drained) == [0, 1]
