"""The body step of a :class:`~extauthz.filtering.scope.ResponsePlan`: bytes in, filtered bytes out.

decode (content-encoding, bounded) -> parse -> every applicable filter -> serialise.
Any failure raises :class:`~extauthz.filtering.codec.Unfilterable`; there is no
path that returns the input bytes unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from extauthz.filtering.codec import BlockCode, Unfilterable, decode, parse, serialize
from extauthz.filtering.engine import apply_filters
from extauthz.filtering.scope import ResponsePlan


@dataclass(frozen=True)
class Filtered:
    body: bytes
    decoded_bytes: int
    """Size of the upstream's body after content decoding, before filtering."""


def filter_body(plan: ResponsePlan, body: bytes, complete: bool = True) -> Filtered:
    """Filter a whole buffered body; ``complete=False`` means Envoy could not buffer all of it."""
    if not complete:
        raise Unfilterable(BlockCode.TOO_LARGE, "the body exceeds Envoy's buffer limit")
    if len(body) > plan.limit:
        raise Unfilterable(BlockCode.TOO_LARGE, f"body of {len(body)} bytes exceeds the limit of {plan.limit}")
    decoded = decode(body, plan.encodings, plan.limit)
    if not decoded.strip():
        # Nothing to show and nothing to hide; an empty JSON-typed body stays empty.
        return Filtered(b"", 0)
    document, exact = parse(decoded)
    try:
        shaped = apply_filters(plan.filters, document)
    except RecursionError:
        raise Unfilterable(BlockCode.INVALID_JSON, "document is nested too deeply to filter") from None
    return Filtered(serialize(shaped, exact), len(decoded))
