"""What both ext_authz transports (gRPC and HTTP) do around a Check, in one place.

Each transport only turns its wire format into a plain
:class:`~extauthz.core.request.HttpRequest` and a
:class:`~extauthz.core.decision.Decision` back into its wire format. How a
failure becomes a denial, and how a decision is timed, counted and logged, is
the same for both, so the two cannot drift: a dashboard or a log query reads
the same whichever transport Envoy uses.
"""

from __future__ import annotations

import time

import structlog

from extauthz.core.decision import Code, Decision, new_decision_id
from extauthz.core.request import HttpRequest
from extauthz.observability import metrics
from extauthz.observability.logging import log_decision

log = structlog.get_logger("extauthz.authz")

NO_REQUEST = HttpRequest(method="", path="")
"""What the decision log shows when the request could not even be read."""


def internal_error(reason: str) -> Decision:
    """A 500 denial: whatever went wrong, the request does not pass (fail closed)."""
    return Decision(False, 500, Code.INTERNAL_ERROR, reason, new_decision_id())


def failed(exc: Exception) -> Decision:
    """An exception on the request path, logged with its traceback and turned into a denial."""
    reason = f"{type(exc).__name__}: {exc}"
    log.exception("check_failed", error=reason)
    return internal_error(reason)


def record(decision: Decision, request: HttpRequest, started: float) -> None:
    """Time, count and log one answered Check (``started`` is a ``time.perf_counter()`` reading)."""
    elapsed = time.perf_counter() - started
    metrics.check_latency.observe(elapsed)
    metrics.child(metrics.decisions, decision.proxy, "allow" if decision.allowed else "deny", decision.code,
                  str(decision.rule.index) if decision.rule else "default").inc()
    log_decision(decision, request, int(elapsed * 1_000_000))
