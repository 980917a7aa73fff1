"""The event loop the sidecar serves on: uvloop when it is installed, asyncio's own otherwise.

Most of a Check's cost is not the decision but the machinery around it:
grpc.aio schedules several callbacks, tasks and futures per RPC, and asyncio's
default loop runs each through Python code. uvloop runs the same loop in C
(libuv). Measured through Envoy on the benchmark's 2-core machine: a trivial
grpc.aio ext_authz server answered about 35% more Checks per second for 25%
less CPU per Check on uvloop, and extauthz about 11% more for 11% less
(docs/benchmarks.md). Decisions do not depend on the loop.

``EXTAUTHZ_EVENT_LOOP=asyncio`` keeps asyncio's own loop (to rule the loop out
when debugging, or where uvloop is not available, e.g. Windows).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

ENV = "EXTAUTHZ_EVENT_LOOP"


def loop_name() -> str:
    """``uvloop`` or ``asyncio``: what :func:`run` uses in this environment."""
    if os.environ.get(ENV, "").strip().lower() == "asyncio":
        return "asyncio"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the loop :func:`loop_name` names."""
    if loop_name() == "uvloop":
        import uvloop

        return uvloop.run(main)
    return asyncio.run(main)
