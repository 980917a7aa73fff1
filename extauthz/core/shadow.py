"""A candidate policy judged beside the active one: what counts as a difference, free of I/O.

The process side (:mod:`extauthz.server.shadow`) decides when the candidate
runs (after the active answer is on its way), what it may cost and where its
differences go; this module says what a difference is, so the server, the
offline tools and the tests agree on it.

Two decisions differ when a client would see a different answer: another
status or another code (``allowed`` against ``would_deny`` too, since a
monitored proxy turning to enforcement is exactly what a candidate may try).
The deciding rule alone is no difference (a rule inserted above renumbers the
rest); it is reported beside each difference, as the trace a reviewer needs.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from extauthz.core.decision import Decision

UNDECIDED = "undecided"
"""The candidate's outcome when deciding would have cost more backend calls than its budget."""

EXTRA_BACKEND_CALLS = 1
"""Relationship backend calls one Check's shadow evaluation may cause beyond the active one's (cache hits and calls
already in flight cost none)."""


@dataclass(frozen=True, slots=True)
class Outcome:
    """One policy's answer to one Check, as far as a client or an auditor can tell it."""

    status: int
    code: str
    rule: int | None
    """Index of the deciding rule; None when the default, a public path or an earlier phase decided."""
    reason: str
    filtered: bool
    """A response filter may apply (the hand-off was written): the response goes through the response phase."""

    @classmethod
    def of(cls, decision: Decision) -> Outcome:
        return cls(decision.status, decision.code, decision.rule.index if decision.rule else None,
                   decision.reason, bool(decision.metadata))



class CallBudget:
    """The backend calls a shadow evaluation may still cause; spending past it marks the outcome undecided."""

    __slots__ = ("exceeded", "left")

    def __init__(self, calls: int = EXTRA_BACKEND_CALLS) -> None:
        self.left = calls
        self.exceeded = False

    def take(self) -> bool:
        if self.left > 0:
            self.left -= 1
            return True
        self.exceeded = True
        return False


SHADOW_BUDGET: ContextVar[CallBudget | None] = ContextVar("extauthz_shadow_budget", default=None)
"""Set only inside a shadow evaluation's task: the relationship resolver reads it, the active path sees None."""


def differ(active: Decision, shadow: Decision) -> bool:
    """Whether a client would see another answer: another status or another code (see the module docstring)."""
    return active.status != shadow.status or active.code != shadow.code
