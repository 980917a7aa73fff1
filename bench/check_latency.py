"""Added latency of extauthz, through a real Envoy, beside a baseline.

Three Envoys on the shipped config run side by side: the shipped config as is
(ext_authz Check + ext_proc on response headers), one with only the ext_authz
filter, and one with neither (the baseline). Requests rotate between them in
small batches, so machine noise hits all alike. Reported: p50/p90/p99 per path
and the ratio to the baseline. The route is not filtered, so ext_proc sees only
the response headers (the cost every unfiltered response pays).

    python -m bench.check_latency [--requests 2000]
"""

from __future__ import annotations

import argparse
import http.client
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from extauthz.demo.processes import Envoy, Ports, render_envoy_config
from tests.e2e.stack import running_stack

POLICY = """
providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    upstream:
      identityHeaders: {x-auth-sub: "{{sub}}"}
    rules:
      - {effect: deny, token: [{claim: {pattern: "^sub$"}, presence: must_absent}], priority: 1}
      - {effect: deny, path: {path: {pattern: "^/v1/users/"}},
         token: [{claim: {pattern: "^sub$"}, value: {pattern: "^svc-"}}], priority: 2}
      - {effect: allow, methods: [GET], path: {path: {pattern: "^/v1/(products|orders)/?"}},
         token: [{claim: {pattern: "^sub$"}, value: {pattern: "^user-"}}], priority: 10}
"""


def percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(conn: http.client.HTTPConnection, path: str, headers: dict[str, str]) -> float:
    start = time.perf_counter()
    conn.request("GET", path, headers=headers)
    response = conn.getresponse()
    response.read()
    elapsed = time.perf_counter() - start
    assert response.status == 200, response.status
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=2000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp, running_stack(Path(tmp), POLICY) as stack:
        def variant(keep: set[str]) -> tuple[Envoy, Ports]:
            ports = Ports.free()
            ports.app, ports.extauthz = stack.ports.app, stack.ports.extauthz

            def edit(config: dict[str, Any]) -> None:
                hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
                hcm["http_filters"] = [f for f in hcm["http_filters"] if f["name"] in keep]

            return Envoy(render_envoy_config(ports, edit=edit)).start(), ports

        router = "envoy.filters.http.router"
        baseline, baseline_ports = variant({router})
        authz_only, authz_ports = variant({router, "envoy.filters.http.ext_authz"})
        try:
            token = stack.idp.token(sub="user-123")
            auth = {"authorization": f"Bearer {token}"}
            targets = {
                "envoy only (baseline)": (baseline_ports.listener, {}),
                "+ ext_authz": (authz_ports.listener, auth),
                "+ ext_authz + ext_proc": (stack.ports.listener, auth),
            }
            conns = {name: http.client.HTTPConnection("127.0.0.1", port) for name, (port, _) in targets.items()}
            samples: dict[str, list[float]] = {name: [] for name in targets}
            for name, (_, headers) in targets.items():  # warm up keep-alive, caches, JWKS
                for _ in range(50):
                    timed(conns[name], "/v1/products/1", headers)
            batch = 20
            for _ in range(args.requests // batch):
                for name, (_, headers) in targets.items():
                    for _ in range(batch):
                        samples[name].append(timed(conns[name], "/v1/products/1", headers))
        finally:
            baseline.stop()
            authz_only.stop()
    base = statistics.median(samples["envoy only (baseline)"])
    print(f"{args.requests} sequential keep-alive GETs per path, 2-core machine, alternating batches of 20")
    print(f"{'path':24} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'p50/base':>9}")
    for name, values in samples.items():
        p50, p90, p99 = (percentile(values, q) * 1000 for q in (0.5, 0.9, 0.99))
        print(f"{name:24} {p50:8.3f} {p90:8.3f} {p99:8.3f} {statistics.median(values) / base:9.2f}")
    for name in ("+ ext_authz", "+ ext_authz + ext_proc"):
        print(f"added by {name[2:]} (p50): {(statistics.median(samples[name]) - base) * 1000:.3f} ms")


if __name__ == "__main__":
    main()
