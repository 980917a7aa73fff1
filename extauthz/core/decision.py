"""The outcome of one Check, as plain data the gRPC adapter turns into Envoy's answer."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

import orjson

from extauthz.core.claims import ANONYMOUS, Claims
from extauthz.core.rules import RuleTrace
from extauthz.policy.model import Rule


class Code(StrEnum):
    """What a Check decided, as a client may rely on it (the body's ``error``, the log's ``code``)."""

    ALLOWED = "allowed"
    WOULD_DENY = "would_deny"
    """``mode: monitor`` allowed what enforcement would deny."""
    TOKEN_MISSING = "token_missing"  # noqa: S105 - a code, not a secret
    INVALID_TOKEN = "invalid_token"  # noqa: S105 - a code, not a secret
    FORBIDDEN = "forbidden"
    KEYS_UNAVAILABLE = "keys_unavailable"
    NO_POLICY = "no_policy"
    BAD_REQUEST = "bad_request"
    METHOD_NOT_ALLOWED = "method_not_allowed"
    QUERY_TOKEN_REFUSED = "query_token_refused"  # noqa: S105 - a code, not a secret
    """Allowed only by removing a query parameter, which the HTTP transport cannot do: denied there."""
    URI_TOO_LONG = "uri_too_long"
    """The rules allow, but a response filter may apply and the request is too long to hand to the response
    phase (:data:`~extauthz.core.handoff.MAX_ENCODED_BYTES`); never allowed without the hand-off."""
    INTERNAL_ERROR = "internal_error"


# A fixed sentence per code: safe for any caller; the detailed reason only goes to the log.
MESSAGES: Mapping[str, str] = {
    Code.TOKEN_MISSING: "authentication required",
    Code.INVALID_TOKEN: "the access token is not valid",
    Code.FORBIDDEN: "access to this resource is denied",
    Code.KEYS_UNAVAILABLE: "authentication is temporarily unavailable",
    Code.NO_POLICY: "no policy covers this request",
    Code.BAD_REQUEST: "the request cannot be read unambiguously",
    Code.METHOD_NOT_ALLOWED: "this method is not allowed",
    Code.QUERY_TOKEN_REFUSED: "a token in the query string is not accepted here; send it in a header",
    Code.URI_TOO_LONG: "the request URI is too long",
    Code.INTERNAL_ERROR: "authorization failed",
}


DECISION_ID_LENGTH = 36
"""Every decision id's length (a UUID's text form): the gRPC adapter serialises around it."""


def new_decision_id() -> str:
    """A random (version 4) UUID in its usual text form, at a quarter of ``str(uuid.uuid4())``'s cost."""
    raw = bytearray(os.urandom(16))
    raw[6] = raw[6] & 0x0F | 0x40
    raw[8] = raw[8] & 0x3F | 0x80
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def error_body(code: str, message: str, decision_id: str) -> bytes:
    """The one JSON error body of both phases: ``{error, message, decisionId}``, no secrets."""
    return orjson.dumps({"error": code, "message": message, "decisionId": decision_id})


@dataclass(frozen=True, slots=True)
class Mutations:
    """What changes on the way upstream when a request is allowed (docs/policy.md, ``upstream``)."""

    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()
    remove_query_params: tuple[str, ...] = ()


@dataclass(slots=True)
class Decision:
    """One Check's outcome. Built once and only read afterwards; not frozen because a frozen dataclass of
    this many fields costs ~3.5 us more to build, on every request."""

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
        """The small JSON body of a denial."""
        return error_body(self.code, MESSAGES.get(self.code, "access denied"), self.decision_id)
