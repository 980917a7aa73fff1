"""What each benchmark scenario costs Envoy, in instructions per request: a figure noise cannot move.

    python -m bench.envoy_instructions [--requests N] [--only a,b] [--json]

``bench.compare`` reads CPU time, which on a shared 2-core machine moves 10-20%
between runs: too much to decide on a change to an Envoy config. Here each
scenario of ``bench.compare`` runs as there, but its Envoy under test runs
under valgrind's callgrind with instrumentation off. After a warm-up (connections
open, the token verified and cached), instrumentation is switched on for exactly
``--requests`` requests (keep-alive, a few connections, each answer checked to
be 200) and the instructions Envoy executed are divided by them. The count
covers every Envoy thread in user space; the kernel's work for its syscalls is
not in it. The same config, requests and binary give the same count within a
fraction of a percent, whatever else the machine is doing.

Under callgrind Envoy runs some fifty times slower, so the load is light; the
shipped timeouts still hold with the default 4 connections.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import http.client
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.compare import MEANINGS, ORDER, SCENARIOS, Shared, Target, shared_run

DEFAULT = ["envoy", "jwt_rbac", "floor", "extauthz_authz_only", "shipped_unfiltered", "shipped_filtered_10k",
           "relationship_cached", "http_transport", "http_ceiling"]
"""Every distinct Envoy config of ``bench.compare`` (its other scenarios differ only behind Envoy)."""


def send(target: Target, token: str, requests: int, connections: int) -> None:
    """Exactly ``requests`` GETs over ``connections`` keep-alive connections; anything but 200 stops the run."""
    def one_connection(count: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", target.port, timeout=60)
        try:
            for _ in range(count):
                conn.request("GET", target.path, headers={"authorization": f"Bearer {token}"})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"{target.path} answered {response.status} under callgrind")
        finally:
            conn.close()

    shares = [requests // connections + (i < requests % connections) for i in range(connections)]
    with concurrent.futures.ThreadPoolExecutor(connections) as pool:
        for future in [pool.submit(one_connection, n) for n in shares]:
            future.result()


def callgrind(*args: str) -> None:
    subprocess.run(["callgrind_control", *args], check=True, capture_output=True, timeout=120)


def instructions(dump: Path) -> int:
    for line in dump.read_text().splitlines():
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {dump}")


def measure(name: str, shared: Shared, requests: int, warmup: int, connections: int) -> float:
    """Envoy's instructions per request in scenario ``name``."""
    with SCENARIOS[name](shared) as target:
        process = target.envoy.process
        assert process is not None
        send(target, shared.token, warmup, connections)
        pid = str(process.pid)
        callgrind("--instr=on", pid)
        send(target, shared.token, requests, connections)
        callgrind("--instr=off", pid)
        callgrind("--dump", pid)
        return instructions(shared.workdir / f"callgrind.{pid}.1") / requests


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests counted per scenario")
    parser.add_argument("--warmup", type=int, default=100, help="requests before counting starts")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--only", help=f"comma-separated scenarios (default: {','.join(DEFAULT)})")
    parser.add_argument("--json", action="store_true", help="the results as JSON on stdout")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.only.split(",")] if args.only else DEFAULT
    if unknown := [n for n in names if n not in SCENARIOS]:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(ORDER)}")
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        parser.error("valgrind is not installed: `apt-get install valgrind`")
    log: Callable[[str], None] = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
    per_request: dict[str, float] = {}
    with shared_run() as run:
        shared = dataclasses.replace(run, envoy_wrapper=(
            "valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={run.workdir}/callgrind.%p"))
        for name in names:
            per_request[name] = measure(name, shared, args.requests, args.warmup, args.connections)
            log(f"{name}: {per_request[name]:,.0f} instructions per request")
    if args.json:
        print(json.dumps({"requests": args.requests, "instructions_per_request": per_request}))
        return 0
    alone = per_request.get("envoy")
    print(f"\nEnvoy's instructions per request, {args.requests} requests each under callgrind\n")
    print("| scenario | Envoy instructions per request | ÷ Envoy alone | what runs |")
    print("|---|---:|---:|---|")
    for name, count in per_request.items():
        ratio = f"{count / alone:.2f}" if alone else "-"
        print(f"| {name} | {count / 1000:,.0f} k | {ratio} | {MEANINGS[name]} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
