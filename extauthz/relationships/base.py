"""What every relationship backend answers: a boolean, or a :class:`Failure` naming why not.

A failure is never an exception on the hot path: the resolver turns it into an
unresolved condition (fail closed, docs/policy.md), one log line and one metric
labelled with the backend and the cause, and it is never cached.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from extauthz.errors import ExtauthzError


class Cause(StrEnum):
    """Why a backend gave no usable answer, as logs and the ``cause`` metric label spell it.

    A closed set, so the label's cardinality stays bounded.
    """

    TIMEOUT = "timeout"
    CONNECT = "connect"
    STATUS_5XX = "status_5xx"
    STATUS_4XX = "status_4xx"
    THROTTLED = "throttled"
    MALFORMED = "malformed"
    AUTH = "auth"
    ITEM_ERROR = "item_error"
    INVALID_VALUE = "invalid_value"
    UNRESOLVED_VARIABLE = "unresolved_variable"
    NO_ROUTE = "no_route"
    NO_SUBJECT = "no_subject"
    NO_BACKEND = "no_backend"
    CANCELLED = "cancelled"
    OVER_BUDGET = "over_budget"
    """A shadow evaluation wanted more backend calls than it may cause: its outcome is undecided, not a failure."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Why a backend gave no usable answer; ``detail`` is for the log line only (no secrets)."""

    cause: Cause
    detail: str = ""


Answer = bool | Failure
"""True (the relationship exists / the PDP allows), False, or why there is no answer."""


class Unresolvable(ExtauthzError):
    """A question that cannot even be asked (a missing or invalid value); carries the failure."""

    def __init__(self, cause: Cause, detail: str) -> None:
        super().__init__(detail)
        self.failure = Failure(cause, detail)
