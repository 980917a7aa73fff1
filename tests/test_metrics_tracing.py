"""W3C traceparent parsing for the decision log (https://www.w3.org/TR/trace-context/)."""

from __future__ import annotations

import pytest

from extauthz.observability.tracing import TraceContext, parse_traceparent, trace_fields

VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_a_valid_traceparent() -> None:
    assert parse_traceparent(VALID) == TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", True)
    assert parse_traceparent(VALID[:-2] + "00") == TraceContext(
        "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", False)


def test_a_future_version_may_append_fields() -> None:
    assert parse_traceparent("01" + VALID[2:] + "-whatever") is not None


@pytest.mark.parametrize("value", [
    None, "", "garbage",
    VALID.upper(),                                             # ids are lower-case hex
    "ff" + VALID[2:],                                          # version ff is invalid
    VALID + "-extra",                                          # version 00 has exactly four fields
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # all-zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # all-zero span id
    "00-4bf92f3577b34da6a3ce929d0e0e473-00f067aa0ba902b7-01",   # short trace id
    "0" * 600,
])
def test_invalid_values_are_ignored(value: str | None) -> None:
    assert parse_traceparent(value) is None


def test_log_fields() -> None:
    assert trace_fields({"traceparent": VALID}) == {
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736", "span_id": "00f067aa0ba902b7"}
    assert trace_fields({}) == {}
