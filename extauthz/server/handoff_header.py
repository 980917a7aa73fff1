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
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson

HANDOFF_HEADER = "x-extauthz-handoff"
"""The auth service's response header; Envoy turns it into a dynamic metadata string of the same name."""


def encode_handoff(metadata: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(metadata, default=dict)).rstrip(b"=").decode("ascii")


def decode_handoff(value: object) -> dict[str, Any] | None:
    """The hand-off's fields, or None when the value is not one (callers fail closed)."""
    if not isinstance(value, str):
        return None
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
        decoded = orjson.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return decoded if isinstance(decoded, dict) else None
