"""Relationship checks: the latency they add through real Envoy, and which HTTP client to use.

    python -m bench.relationships [--requests 2000] [--client-calls 3000]
                                  [--sdk-python /path/to/venv/bin/python] [--json results.json]

Part 1, the client choice: the same Check, sequentially, against the local
OpenFGA server (tests/openfga_server.py, run as its own process) from a fresh
process per client, reporting wall time and client-side CPU per call: raw httpx,
raw aiohttp, the official openfga-sdk (only if ``--sdk-python`` names an
interpreter that has it: it is not a project dependency; install it in a
throwaway venv, e.g. ``python -m venv /tmp/ofga && /tmp/ofga/bin/pip install
openfga-sdk orjson``), and extauthz's own resolver with its cache off.

Part 2, through Envoy: IdP + upstream + ``extauthz serve`` + Envoy on the
shipped config (tests/e2e/stack.py), keep-alive requests one at a time, alternating
a ``baseline`` request (a rule without a relationship condition, same token)
with a relationship request: ``cached`` (an ``fga`` rule whose answer is in the
in-process cache) on one stack, ``uncached`` (the same rule with caching off, so
every request makes one Check) on another. Added latency is each percentile
minus the interleaved baseline's. Numbers depend on the machine; the figures in
docs/relationships.md came from the project's 2-core machine.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from extauthz.demo.processes import free_port, wait_port
from tests.e2e.stack import running_stack
from tests.openfga_server import JOURNEYS_MODEL, new_ulid, policy_document, transform_model

REPO = Path(__file__).resolve().parents[1]

# One measured client, run in its own process: prints one JSON line.
CLIENT = r"""
import asyncio, json, sys, time
url, store, model, n, kind = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
body = {"tuple_key": {"user": "user:bob", "relation": "viewer", "object": "journey:roadmap"},
        "authorization_model_id": model}
target = f"{url}/stores/{store}/check"

async def measure(call):
    for _ in range(min(300, n)):
        assert await call() is True
    walls = []
    cpu0 = time.process_time()
    for _ in range(n):
        t = time.perf_counter()
        assert await call() is True
        walls.append(time.perf_counter() - t)
    cpu = time.process_time() - cpu0
    walls.sort()
    return {"p50_us": walls[n // 2] * 1e6, "p99_us": walls[int(n * 0.99)] * 1e6, "cpu_us_per_call": cpu / n * 1e6}

async def main():
    if kind == "httpx":
        import httpx, orjson
        async with httpx.AsyncClient(limits=httpx.Limits(max_keepalive_connections=8)) as c:
            async def call():
                r = await c.post(target, content=orjson.dumps(body), headers={"content-type": "application/json"},
                                 timeout=0.2)
                return orjson.loads(r.content)["allowed"]
            return await measure(call)
    if kind == "aiohttp":
        import aiohttp, orjson
        async with aiohttp.ClientSession() as s:
            async def call():
                async with s.post(target, data=orjson.dumps(body), headers={"content-type": "application/json"},
                                  timeout=aiohttp.ClientTimeout(total=0.2)) as r:
                    return orjson.loads(await r.read())["allowed"]
            return await measure(call)
    if kind == "openfga-sdk":
        from openfga_sdk.client import ClientConfiguration, OpenFgaClient
        from openfga_sdk.client.models import ClientCheckRequest
        config = ClientConfiguration(api_url=url, store_id=store, authorization_model_id=model)
        async with OpenFgaClient(config) as fga:
            request = ClientCheckRequest(user="user:bob", relation="viewer", object="journey:roadmap")
            async def call():
                return (await fga.check(request)).allowed
            return await measure(call)
    if kind == "extauthz":
        import yaml
        from extauthz.core.claims import Claims
        from extauthz.core.request import HttpRequest
        from extauthz.policy.loader import parse_policy
        from extauthz.relationships import build_resolver
        document = json.loads(sys.argv[6])
        policy = parse_policy(yaml.safe_dump(document))
        resolver = await build_resolver(policy)
        rule = policy.proxies[0].rules[0]
        request = HttpRequest.from_target("GET", "/v1/journeys/roadmap")
        claims = Claims.of({"sub": "bob"})
        values = {"sub": "bob", "journeyId": "roadmap"}
        async def call():
            return await resolver.resolve(rule, values, request, claims)
        try:
            return await measure(call)
        finally:
            await resolver.aclose()

print(json.dumps(asyncio.run(main())))
"""

JOURNEY_RULE = {
    "effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/journeys/[^/]+$"}},
    "variables": [{"name": "journeyId", "source": "pathSegment", "index": 2}],
    "fga": {"user": "user:{{sub}}", "relation": "viewer", "object": "journey:{{journeyId}}"},
}
BASELINE_RULE = {"effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/baseline/"}},
                 "token": [{"claim": {"pattern": "^sub$"}, "value": {"pattern": "^bob$"}}]}
TUPLES = [["user:bob", "member", "workspace:eng"], ["workspace:eng", "workspace", "journey:roadmap"]]


class FgaProcess:
    """The local OpenFGA server in its own process, so its CPU is not the client's."""

    def __init__(self, workdir: Path, tuples: list[list[str]] | None = None) -> None:
        self.port = free_port()
        self.store_id, self.model_id = new_ulid(), new_ulid()
        model = workdir / "model.json"
        model.write_text(json.dumps(transform_model(JOURNEYS_MODEL)))
        tuples_file = workdir / "tuples.json"
        tuples_file.write_text(json.dumps(TUPLES if tuples is None else tuples))
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.openfga_server", "--port", str(self.port), "--store-id", self.store_id,
             "--model-id", self.model_id, "--model-json", str(model), "--tuples", str(tuples_file)],
            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_port(self.port, 30, self.process)
        self.url = f"http://127.0.0.1:{self.port}"

    def backend(self, timeout_ms: int = 250) -> dict[str, Any]:
        return {"name": "fga", "url": self.url, "storeId": self.store_id,
                "authorizationModelId": self.model_id, "timeoutMs": timeout_ms}

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(10)


def measure_clients(fga: FgaProcess, calls: int, sdk_python: str | None) -> dict[str, Any]:
    cache_off = policy_document([JOURNEY_RULE], [fga.backend()],
                                cache={"allowedTtlSeconds": 0, "deniedTtlSeconds": 0})
    runs: list[tuple[str, str, list[str]]] = [
        ("httpx", sys.executable, []),
        ("aiohttp", sys.executable, []),
        ("extauthz", sys.executable, [json.dumps(cache_off)]),
    ]
    if sdk_python:
        runs.append(("openfga-sdk", sdk_python, []))
    results: dict[str, Any] = {}
    for kind, python, extra in runs:
        out = subprocess.run(
            [python, "-c", CLIENT, fga.url, fga.store_id, fga.model_id, str(calls), kind, *extra],
            cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
            env={**os.environ, "PYTHONPATH": str(REPO)} if python == sys.executable else None,
        )
        if out.returncode != 0:
            results[kind] = {"error": out.stderr.strip().splitlines()[-1:] or ["failed"]}
            continue
        results[kind] = json.loads(out.stdout.strip().splitlines()[-1])
    return results


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    n = len(ordered)
    return {"p50_ms": ordered[n // 2] * 1e3, "p90_ms": ordered[int(n * 0.9)] * 1e3,
            "p99_ms": ordered[int(n * 0.99)] * 1e3, "mean_ms": statistics.fmean(ordered) * 1e3}


def _interleaved(port: int, token: str, count: int) -> tuple[list[float], list[float]]:
    """Baseline and relationship requests alternately, each on its own keep-alive connection.

    Alternating means both see the same machine (other processes, CPU frequency),
    so their difference is the relationship check and not the moment it ran at.
    """
    headers = {"authorization": f"Bearer {token}"}
    conns = [http.client.HTTPConnection("127.0.0.1", port, timeout=10) for _ in range(2)]
    paths = ["/baseline/x", "/v1/journeys/roadmap"]
    samples: tuple[list[float], list[float]] = ([], [])
    try:
        for i in range(count + 200):
            for which in (0, 1):
                started = time.perf_counter()
                conns[which].request("GET", paths[which], headers=headers)
                response = conns[which].getresponse()
                response.read()
                elapsed = time.perf_counter() - started
                if response.status != 200:
                    raise RuntimeError(f"{paths[which]}: expected 200, got {response.status}")
                if i >= 200:  # warm-up: connections, token cache, first lookups
                    samples[which].append(elapsed)
    finally:
        for conn in conns:
            conn.close()
    return samples


def measure_envoy(fga: FgaProcess, requests: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for label, ttl in (("cached", 60.0), ("uncached", 0.0)):
        document = policy_document([BASELINE_RULE, JOURNEY_RULE], [fga.backend()], issuer="ISSUER",
                                   jwks_uri="JWKS_URI", cache={"allowedTtlSeconds": ttl, "deniedTtlSeconds": ttl})
        with tempfile.TemporaryDirectory(prefix="bench-rel-") as workdir, \
                running_stack(Path(workdir), yaml.safe_dump(document, sort_keys=False),
                              sidecar_args=["--log-level", "warning"]) as stack:
            base, scenario = _interleaved(stack.ports.listener, stack.idp.token(sub="bob"), requests)
        b = _percentiles(base)
        r: dict[str, Any] = {**_percentiles(scenario), "baseline": b}
        r["added_ms"] = {k.removesuffix("_ms"): r[k] - b[k] for k in ("p50_ms", "p90_ms", "p99_ms")}
        results[label] = r
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=2000, help="requests per scenario through Envoy")
    parser.add_argument("--client-calls", type=int, default=3000, help="checks per client in part 1")
    parser.add_argument("--sdk-python", default=os.environ.get("OPENFGA_SDK_PYTHON"),
                        help="an interpreter with openfga-sdk installed (not a project dependency)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-fga-") as workdir:
        fga = FgaProcess(Path(workdir))
        try:
            clients = measure_clients(fga, args.client_calls, args.sdk_python)
            envoy = measure_envoy(fga, args.requests)
        finally:
            fga.stop()
    print(f"\nPart 1: one Check, sequential, {args.client_calls} calls per client (local OpenFGA server)")
    print(f"{'client':<14}{'p50 us':>10}{'p99 us':>10}{'CPU us/call':>14}")
    for kind, r in clients.items():
        if "error" in r:
            print(f"{kind:<14}  failed: {r['error']}")
            continue
        print(f"{kind:<14}{r['p50_us']:>10.0f}{r['p99_us']:>10.0f}{r['cpu_us_per_call']:>14.0f}")
    print(f"\nPart 2: through Envoy, {args.requests} keep-alive requests per scenario")
    print("(each scenario interleaved with a baseline request on the same stack; added = scenario - baseline)")
    print(f"{'scenario':<22}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}")
    for label in ("cached", "uncached"):
        r = envoy[label]
        for name, row in ((f"{label} baseline", r["baseline"]), (label, r)):
            print(f"{name:<22}{row['p50_ms']:>9.3f}{row['p90_ms']:>9.3f}{row['p99_ms']:>9.3f}")
        added = r["added_ms"]
        print(f"{'  added':<22}{added['p50']:>+9.3f}{added['p90']:>+9.3f}{added['p99']:>+9.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"clients": clients, "envoy": envoy}, indent=2))


if __name__ == "__main__":
    main()
