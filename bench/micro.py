"""Microbenchmarks of the hot path, without Envoy or gRPC: what one decision and one filtered body cost.

    python -m bench.micro [--fast] [pyperf options, e.g. -o results.json]

Measured with pyperf, which runs each benchmark in several fresh worker
processes (so one process's luck with memory layout or a noisy neighbour does
not decide the figure), warms up first, and records each value. Every value
here is ONE call (``loops=1``), so the median and the p99 printed at the end
are per-call figures, not averages of batches:

- ``check``: ``Authorizer.check`` on the seed policy, a plain HttpRequest with
  a valid RS256 token in, a Decision out; the verified-token cache is warm (as
  it is for a returning caller), the JWKS inline (no network).
- ``check_filtered_route``: the same on ``/v1/orders``, where the orders
  filter applies and the Check also prepares the response phase's hand-off.
- ``check_grpc``: what the gRPC servicer does per Check around that decision:
  Envoy's serialised CheckRequest parsed, the decision, the answer serialised,
  the decision log line written (to /dev/null) and the metrics counted.
- ``rules``: rule evaluation alone (``core.rules.evaluate``) on verified claims.
- ``filter_engine_10k``: the orders filter bound to the caller and applied to
  the parsed ~10 KB document.
- ``filter_body_10k``: the whole body step on the 10 KB bytes (parse, filter,
  serialise), what ext_proc does per filtered response.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import orjson
import pyperf  # type: ignore[import-untyped]
from envoy.service.auth.v3 import external_auth_pb2

from bench.workloads import CALLER, ORDERS_BYTES, ORDERS_FILTER, orders_document, seed_policy
from extauthz.core.authorizer import Authorizer
from extauthz.core.claims import Claims
from extauthz.core.decision import Decision
from extauthz.core.request import HttpRequest
from extauthz.core.rules import NoRelationships, Verdict, compile_rules, evaluate
from extauthz.demo.idp import SigningKey
from extauthz.filtering.engine import bind
from extauthz.filtering.pipeline import filter_body
from extauthz.filtering.scope import Action, ResponsePlan
from extauthz.identity.verifier import TokenCache, Verifier
from extauthz.policy.loader import load_filter, parse_policy
from extauthz.server.authorization import AuthorizationServicer

ISSUER = "https://idp.bench"
NAMES = ["check", "check_filtered_route", "check_grpc", "rules", "filter_engine_10k", "filter_body_10k"]


class Workload:
    """Everything built once per worker process, before any timing: the hot path never parses or compiles."""

    def __init__(self) -> None:
        key = SigningKey()
        self.policy = parse_policy(seed_policy(ISSUER, json.dumps({"keys": [key.jwk]})))
        self.claims = {"iss": ISSUER, "aud": "orders-api", "sub": CALLER, "iat": int(time.time()),
                       "exp": int(time.time()) + 24 * 3600}
        token = key.sign(self.claims)
        self.client = httpx.AsyncClient()  # the verifier's JWKS client; inline keys never use it
        self.authorizer = Authorizer(self.policy, Verifier(self.policy.providers, self.client, TokenCache(10_000, 60)))
        headers = {"authorization": f"Bearer {token}"}
        context = {"proxy": "orders-api"}
        self.products = HttpRequest.from_target("GET", "/v1/products/1", headers=headers, context=context)
        self.servicer = AuthorizationServicer(lambda: self.authorizer)
        self.check_request = check_request_bytes("/v1/products/1", headers["authorization"])
        self.log_sink = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the worker process
        self.orders = HttpRequest.from_target("GET", "/v1/orders", headers=headers, context=context)
        self.verified = Claims.of(self.claims, "idp")
        self.proxy = self.policy.proxies[0]
        self.compiled = compile_rules(self.proxy)  # as the Authorizer does once per policy
        self.no_relationships = NoRelationships()
        document = orders_document(ORDERS_BYTES)
        self.document = document
        self.raw = orjson.dumps(document)
        self.filter = load_filter({k: v for k, v in ORDERS_FILTER.items() if k not in ("methods", "path", "statuses")})
        bound = bind(self.filter, {"callerSub": CALLER})
        self.plan = ResponsePlan(Action.BUFFER, "orders-api", "bench", (bound,), (), len(self.raw) + 1, len(self.raw))
        for decision in (self.run(self.check()), self.run(self.check_filtered_route())):  # the cache is now warm
            if not decision.allowed:
                raise SystemExit(f"the benchmark request is not allowed: {decision}")
        if external_auth_pb2.CheckResponse.FromString(self.run(self.check_grpc())).status.code != 0:
            raise SystemExit("the benchmark CheckRequest is not allowed")
        if self.run(self.rules()).rule is None:
            raise SystemExit("no rule matched the benchmark request")

    @staticmethod
    def run(awaitable: Awaitable[Any]) -> Any:
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(awaitable)
        finally:
            loop.close()

    async def check(self) -> Decision:
        return await self.authorizer.check(self.products)

    async def check_filtered_route(self) -> Decision:
        return await self.authorizer.check(self.orders)

    async def check_grpc(self) -> bytes:
        saved, sys.stderr = sys.stderr, self.log_sink
        try:
            return await self.servicer.Check(external_auth_pb2.CheckRequest.FromString(self.check_request), None)
        finally:
            sys.stderr = saved

    async def rules(self) -> Verdict:
        return await evaluate(self.proxy, self.products, self.verified, self.no_relationships, False, self.compiled)

    def filter_engine(self) -> object:
        return bind(self.filter, {"callerSub": CALLER}).apply(self.document)

    def filter_body(self) -> object:
        return filter_body(self.plan, self.raw)


def check_request_bytes(path: str, authorization: str) -> bytes:
    """A CheckRequest as Envoy sends one for a plain GET through the shipped config, serialised."""
    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme, http.protocol, http.id = (
        "GET", path, "localhost:10000", "http", "HTTP/1.1", "1234567890")
    for name, value in {":authority": "localhost:10000", ":method": "GET", ":path": path, ":scheme": "http",
                        "user-agent": "wrk", "authorization": authorization, "x-forwarded-proto": "http",
                        "x-request-id": "0b1e2f6a-1111-2222-3333-444455556666"}.items():
        http.headers[name] = value
    request.attributes.context_extensions["proxy"] = "orders-api"
    request.attributes.source.address.socket_address.address = "127.0.0.1"
    request.attributes.destination.address.socket_address.address = "127.0.0.1"
    return bytes(request.SerializeToString())


def main() -> None:
    # workers re-run this module: as a module, so the repository root is on their path
    runner = pyperf.Runner(values=250, processes=8, warmups=50, loops=1, program_args=("-m", "bench.micro"))
    runner.metadata["description"] = __doc__.splitlines()[0]
    work = Workload()
    asyncs: dict[str, Callable[[], Awaitable[Any]]] = {
        "check": work.check, "check_filtered_route": work.check_filtered_route, "check_grpc": work.check_grpc,
        "rules": work.rules}
    results: dict[str, pyperf.Benchmark | None] = {}
    for name in NAMES:
        if name in asyncs:
            results[name] = runner.bench_async_func(name, asyncs[name])
        else:
            results[name] = runner.bench_func(name, work.filter_engine if name == "filter_engine_10k"
                                              else work.filter_body)
    if any(b is None for b in results.values()):
        return  # a worker process: the master prints the summary
    print(f"\nper call, µs ({sys.implementation.name} {sys.version.split()[0]}; {ORDERS_BYTES:,}-byte target, "
          f"{len(work.raw):,} bytes of orders JSON)")
    print(f"{'benchmark':<22}{'median':>10}{'p99':>10}{'values':>8}")
    for name, bench in results.items():
        assert bench is not None
        values = bench.get_values()
        print(f"{name:<22}{statistics.median(values) * 1e6:>10.1f}{bench.percentile(99) * 1e6:>10.1f}"
              f"{len(values):>8}")


if __name__ == "__main__":
    main()
