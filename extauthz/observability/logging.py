"""Structured logs: one JSON line per decision, never a token or a secret."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

from extauthz.core.decision import Decision
from extauthz.core.request import HttpRequest


def configure(fmt: str = "json", level: str = "info") -> None:
    """JSON for machines by default; ``console`` for a human at a terminal."""
    renderer: Any = (
        structlog.dev.ConsoleRenderer() if fmt == "console" else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


decisions = structlog.get_logger("extauthz.decision")


def log_decision(decision: Decision, request: HttpRequest, latency_us: int, **extra: Any) -> None:
    rule = decision.rule
    decisions.info(
        "decision",
        decision_id=decision.decision_id,
        request_id=request.request_id,
        proxy=decision.proxy,
        method=request.method,
        path=request.path,
        sub=decision.sub,
        result="allow" if decision.allowed else "deny",
        status=decision.status,
        code=decision.code,
        reason=decision.reason,
        rule_index=rule.index if rule else None,
        rule_notes=rule.notes if rule else None,
        monitored=decision.monitored or None,
        latency_us=latency_us,
        **extra,
    )
