"""When extauthz cannot answer, clients get one documented answer, quickly (docs/operations.md).

Through the real Envoy with the shipped config: the sidecar killed (connection
refused) or stopped (SIGSTOP: connections open, nothing answers) gives 503 with
a JSON body and ``retry-after`` within the 1 s ext_authz timeout, for filtered
and unfiltered routes alike, and nothing reaches the service.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator

import pytest

from tests.e2e.stack import Stack, running_stack

pytestmark = pytest.mark.envoy

POLICY = """
providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    rules: [{effect: allow}]
    filters:
      - methods: [GET]
        path: {pattern: "^/v1/orders"}
        defaultFilterOperation: retain
        operations: [{effect: destroy, jsonPath: {pattern: "^orders\\\\.internalRef$"}}]
"""


@pytest.fixture
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp("outage"), POLICY) as s:
        yield s


def assert_unavailable(stack: Stack, path: str, token: str, within: float) -> None:
    seen = len(stack.upstream.requests)
    started = time.monotonic()
    r = stack.request("GET", path, token)
    elapsed = time.monotonic() - started
    assert r.status == 503, (r.status, r.body)
    assert r.headers["content-type"] == "application/json" and r.headers["retry-after"] == "1"
    body = r.json()
    assert body["error"] == "authorization_unavailable" and body["requestId"]
    assert elapsed < within, f"{path} took {elapsed:.2f}s"
    assert len(stack.upstream.requests) == seen  # nothing reached the service


@pytest.mark.parametrize("path", ["/x", "/v1/orders"])
def test_a_stopped_sidecar_answers_503_within_the_check_timeout(stack: Stack, path: str) -> None:
    token = stack.idp.token(sub="user-123")
    assert stack.request("GET", path, token).status == 200
    pid = stack.sidecar.process.pid  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        assert_unavailable(stack, path, token, within=1.8)  # the 1 s timeout, plus a loaded machine
    finally:
        os.kill(pid, signal.SIGCONT)
    assert stack.request("GET", path, token).status == 200  # and it recovers by itself


@pytest.mark.parametrize("path", ["/x", "/v1/orders"])
def test_a_dead_sidecar_answers_503_at_once(stack: Stack, path: str) -> None:
    token = stack.idp.token(sub="user-123")
    stack.sidecar.process.kill()  # type: ignore[union-attr]
    stack.sidecar.process.wait()  # type: ignore[union-attr]
    assert_unavailable(stack, path, token, within=0.5)
