"""Response filter engine on ~10 KB and ~1 MB JSON: parse, filter, serialise, and the whole body step.

The document is an orders list like the sample upstream's (users, nested audit
objects, line items), filtered two ways: seed 003's allowlist for one caller
(a small output) and a denylist that strips internal fields for everyone (a
large output). Each figure is the median of several runs; the JSON rows
compare orjson (what the sidecar uses) with the standard library on the same
bytes.

    python -m bench.filter_engine [--repeat 15]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import orjson

from bench.workloads import orders_document
from extauthz.filtering.engine import bind
from extauthz.filtering.pipeline import filter_body
from extauthz.filtering.scope import Action, ResponsePlan
from extauthz.policy.loader import load_filter
from tests.test_filter_properties import SEED_FILTER as SEED_003_FILTER

DENYLIST: dict[str, Any] = {
    "defaultFilterOperation": "retain",
    "operations": [{"effect": "destroy", "jsonPath": {"pattern": "^orders\\.(internalRef|audit)$"}}],
}


def median_ms(work: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    args = parser.parse_args()
    filters = {"seed 003 allowlist": load_filter(SEED_003_FILTER), "denylist": load_filter(DENYLIST)}
    print(f"{'document':>8} | {'filter':<18} | {'step':<30} | {'median ms':>9}")
    print("-" * 76)
    for label, target in (("10 KB", 10_000), ("1 MB", 1_000_000)):
        document = orders_document(target)
        raw = orjson.dumps(document)
        repeat = args.repeat * 20 if target < 100_000 else args.repeat

        def show(name: str, step: str, work: Callable[[], object], repeat: int = repeat, label: str = label) -> None:
            print(f"{label:>8} | {name:<18} | {step:<30} | {median_ms(work, repeat):>9.3f}")

        show("", "parse: orjson", lambda raw=raw: orjson.loads(raw))
        show("", "parse: json (stdlib)", lambda raw=raw: json.loads(raw))
        for name, flt in filters.items():
            bound = bind(flt, {"callerSub": "user-3"})
            shaped = bound.apply(document)
            out = orjson.dumps(shaped)
            plan = ResponsePlan(Action.BUFFER, "bench", "d", (bound,), (), len(raw) + 1, len(raw))
            show(name, "bind + filter engine", lambda flt=flt, document=document: bind(
                flt, {"callerSub": "user-3"}).apply(document))
            show(name, "serialise: orjson", lambda shaped=shaped: orjson.dumps(shaped))
            show(name, "serialise: json (stdlib)",
                 lambda shaped=shaped: json.dumps(shaped, separators=(",", ":")).encode())
            show(name, "whole body step", lambda plan=plan, raw=raw: filter_body(plan, raw))
            print(f"{label:>8} | {name:<18} | {f'{len(raw):,} bytes in, {len(out):,} out':<30} |")
        print("-" * 76)


if __name__ == "__main__":
    main()
