"""W3C Trace Context (``traceparent``) read from the request, for the decision log.

Envoy (or the caller) carries the trace in a ``traceparent`` header; putting its
trace id and span id on the decision log line lets an operator jump from a trace
in Jaeger/Tempo to the authorization decision and back. Parsing the header is a
few lines, so no OpenTelemetry SDK is needed (and none is started: the sidecar
does not export spans of its own).

The rules are those of https://www.w3.org/TR/trace-context/#traceparent-header:
lower-case hex, all-zero ids are invalid, version ``ff`` is invalid, version
``00`` has exactly four fields, later versions may append fields.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

_TRACEPARENT = re.compile(
    r"(?P<version>[0-9a-f]{2})-(?P<trace_id>[0-9a-f]{32})-(?P<span_id>[0-9a-f]{16})-(?P<flags>[0-9a-f]{2})"
    r"(?P<rest>-.*)?"
)
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
_MAX_LENGTH = 512  # far above any real header; a huge one is not parsed at all


@dataclass(frozen=True)
class TraceContext:
    trace_id: str
    span_id: str
    """The caller's span (the parent of anything the sidecar would record)."""
    sampled: bool


def parse_traceparent(value: str | None) -> TraceContext | None:
    """The trace context of a ``traceparent`` value, or None when absent or invalid."""
    if not value or len(value) > _MAX_LENGTH:
        return None
    match = _TRACEPARENT.fullmatch(value.strip())
    if match is None:
        return None
    version = match["version"]
    if version == "ff" or (version == "00" and match["rest"] is not None):
        return None
    if match["trace_id"] == _ZERO_TRACE or match["span_id"] == _ZERO_SPAN:
        return None
    return TraceContext(match["trace_id"], match["span_id"], bool(int(match["flags"], 16) & 1))


def trace_fields(headers: Mapping[str, str]) -> dict[str, str]:
    """``trace_id``/``span_id`` log fields for a request's headers (empty without a valid traceparent)."""
    context = parse_traceparent(headers.get("traceparent"))
    if context is None:
        return {}
    return {"trace_id": context.trace_id, "span_id": context.span_id}
