"""The Check's hand-off as one string, the same over both ext_authz transports.

Envoy's HTTP ext_authz client has no body to carry metadata in; instead it
copies the headers named in ``authorization_response.dynamic_metadata_from_headers``
from the *auth service's response* (never from the client's request) into the
``envoy.filters.http.ext_authz`` dynamic metadata namespace, each as one string.
So the hand-off (:class:`~extauthz.core.handoff.Handoff`) is one header whose
value is base64url (unpadded) of its compact JSON: plain ASCII, whatever the
paths or claim values hold, and nothing a header parser could split or fold.
The gRPC Check writes the same string under the same name into its
CheckResponse's dynamic metadata (cheaper to write and to read than a Struct of
the fields), so the response phase has one form to read.

The string itself is made in the decision core (:func:`extauthz.core.handoff.encode`),
which must know its size before it allows: a Check's hand-off is encoded once,
there, and both transports write that text.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from extauthz.core.decision import Decision
from extauthz.core.handoff import CheckRecord, decode, encode

HANDOFF_HEADER = "x-extauthz-handoff"
"""The auth service's response header; Envoy turns it into a dynamic metadata string of the same name."""

RECORD_HEADER = "x-extauthz-record"
"""The Check's :class:`~extauthz.core.handoff.CheckRecord`, written on every answer (allow and denial) the same
way: a dynamic metadata string over gRPC, an answer header Envoy copies into metadata over HTTP. Its own name,
not the hand-off's, so a config that keys on the hand-off (or forwards only it) keeps working."""


def encode_handoff(metadata: Mapping[str, Any]) -> str:
    """The string to write: the Check's own encoding when the decision carries one."""
    return encode(metadata)


def decode_handoff(value: object) -> dict[str, Any] | None:
    """The hand-off's fields, or None when the value is not one (callers fail closed)."""
    return decode(value)


def record_of(decision: Decision) -> str:
    """The record string of a decision (the adapters' slow path; allows are written from templates)."""
    return CheckRecord.of(decision.allowed, bool(decision.metadata), decision.decision_id).encoded()
