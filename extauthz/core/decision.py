"""The outcome of one Check, as plain data the gRPC adapter turns into Envoy's answer."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson

from extauthz.core.claims import ANONYMOUS, Claims
from extauthz.core.rules import RuleTrace
from extauthz.policy.model import Rule

# Stable codes a client may rely on; the detailed reason only goes to the log.
MESSAGES = {
    "token_missing": "authentication required",
    "invalid_token": "the access token is not valid",
    "forbidden": "access to this resource is denied",
    "keys_unavailable": "authentication is temporarily unavailable",
    "no_policy": "no policy covers this request",
    "bad_request": "the request cannot be read unambiguously",
    "method_not_allowed": "this method is not allowed",
    "internal_error": "authorization failed",
}


@dataclass(frozen=True)
class Mutations:
    """What changes on the way upstream when a request is allowed (docs/policy.md, ``upstream``)."""

    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    remove_query_params: tuple[str, ...] = ()


@dataclass(frozen=True)
class Decision:
    allowed: bool
    status: int
    code: str
    """Stable, safe for the caller: ``allowed``, ``token_missing``, ``invalid_token``, ``forbidden``..."""
    reason: str
    """For the decision log only (why a token failed, which rule decided)."""
    decision_id: str
    proxy: str = ""
    rule: Rule | None = None
    claims: Claims = ANONYMOUS
    mutations: Mutations = Mutations()
    www_authenticate: str = ""
    metadata: Mapping[str, Any] = field(default_factory=dict)
    """Handed to the response phase through Envoy dynamic metadata."""
    monitored: bool = False
    """``mode: monitor`` allowed what enforcement would have denied."""
    trace: tuple[RuleTrace, ...] = ()
    policy: str = ""
    """Digest of the policy that decided, so a log line can be tied to a reload."""

    @property
    def sub(self) -> str | None:
        return self.claims.sub

    def body(self) -> bytes:
        """The small JSON body of a denial: a stable code, no secrets."""
        return orjson.dumps(
            {
                "error": self.code,
                "message": MESSAGES.get(self.code, "access denied"),
                "decisionId": self.decision_id,
            }
        )
