"""SIGTERM drains behind the shipped Envoy config: not-ready at once, no request in flight lost.

Kubernetes sends SIGTERM and removes the pod from its Service at about the same
time, so Envoy keeps sending for a while; every response of a filtered request
needs a new ext_proc stream. The sidecar must keep answering both for
``server.drainSeconds`` and only then exit.
"""

from __future__ import annotations

import json
import signal
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import pytest

from extauthz.demo.processes import free_port
from tests.e2e.stack import running_stack

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
server:
  drainSeconds: 2
  metricsAddress: 127.0.0.1:METRICS_PORT
"""


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as r:
            return int(r.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0  # the listener is gone


def test_sigterm_under_load_loses_no_request_and_exits_after_the_drain(tmp_path: Path) -> None:
    metrics_port = free_port()
    with running_stack(tmp_path, POLICY.replace("METRICS_PORT", str(metrics_port))) as stack:
        token = stack.idp.token(sub="user-123")
        statuses: Counter[int] = Counter()
        leaked: list[bytes] = []
        done = threading.Event()

        def load(path: str) -> None:
            while not done.is_set():
                r = stack.request("GET", path, token)
                statuses[r.status] += 1
                if b"internalRef" in r.body:
                    leaked.append(r.body)

        workers = [threading.Thread(target=load, args=(p,)) for p in ("/v1/orders", "/x", "/v1/orders")]
        for worker in workers:
            worker.start()
        time.sleep(0.5)
        assert readyz(metrics_port) == 200
        process = stack.sidecar.process
        assert process is not None
        before = sum(statuses.values())
        sent_at = time.monotonic()
        process.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        assert readyz(metrics_port) == 503  # Kubernetes stops routing at once...
        time.sleep(1.2)
        done.set()  # ...while the load runs on inside the drain window
        for worker in workers:
            worker.join(10)
        during = sum(statuses.values()) - before
        assert process.wait(10) == 0
        exited_after = time.monotonic() - sent_at
    assert during > 10, statuses
    assert set(statuses) == {200}, statuses  # no request in flight or arriving during the drain failed
    assert not leaked
    assert 2.0 <= exited_after < 6.0, exited_after
    log = [json.loads(line) for line in stack.sidecar.logs().splitlines() if line.startswith("{")]
    assert any(e.get("event") == "draining" and e.get("drain_seconds") == 2 for e in log)
