"""Bytes <-> JSON for response filtering: content-encoding, size limits, parse, serialise.

Every failure is an :class:`Unfilterable` with a stable code; the adapter turns
it into a 502 and the original bytes are never passed on (docs/response-filtering.md).

JSON library: orjson (Rust, strict RFC 8259: rejects NaN/Infinity, lone
surrogates, invalid UTF-8) parses and serialises several times faster than the
standard library, which matters because the body is parsed and written once
per filtered response. One gap is handled here: orjson silently turns integers
beyond 64 bits into floats, which would corrupt large IDs. A body with a run
of 19 or more digits is therefore parsed (and written) by the standard
library, which keeps such integers exact; that costs speed only for those bodies.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Final, cast

import brotli
import orjson
import re2

from extauthz.errors import ExtauthzError
from extauthz.filtering.engine import JsonValue

SUPPORTED_ENCODINGS: Final = frozenset({"identity", "gzip", "x-gzip", "deflate", "br"})
# RE2 scans a megabyte in about a millisecond, linear even on adversarial digit runs
# (Python's re needs several times longer).
_LONG_NUMBER: Final = re2.compile(rb"[0-9]{19}")
_CHUNK: Final = 64 * 1024


class BlockCode(StrEnum):
    """Why a response a filter applies to was blocked (the 502 body's ``error``, the metric's label)."""

    NOT_JSON = "not_json"
    UNSUPPORTED_ENCODING = "unsupported_encoding"
    BAD_ENCODING = "bad_encoding"
    TOO_LARGE = "too_large"
    INVALID_JSON = "invalid_json"
    NO_IDENTITY = "no_identity"
    PARTIAL_CONTENT = "partial_content"
    FILTER_ERROR = "filter_error"


class Unfilterable(ExtauthzError):
    """A response that a filter applies to but that cannot be filtered: it must be blocked."""

    def __init__(self, code: BlockCode, detail: str) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def content_encodings(header: str | None) -> tuple[str, ...]:
    """The codings of a ``content-encoding`` header in the order they were applied."""
    if not header:
        return ()
    return tuple(token.strip().lower() for token in header.split(",") if token.strip())


def unsupported(encodings: Sequence[str]) -> str | None:
    """The first coding this module cannot undo, if any."""
    for coding in encodings:
        if coding not in SUPPORTED_ENCODINGS:
            return coding
    return None


def decode(body: bytes, encodings: Sequence[str], limit: int) -> bytes:
    """Undo the content codings (last applied first), never producing more than ``limit`` bytes.

    The output bound is enforced while decompressing, so a small compressed bomb
    cannot make the sidecar allocate more than the configured limit.
    """
    for coding in reversed(encodings):
        if coding == "identity":
            continue
        if coding in ("gzip", "x-gzip"):
            body = _inflate(body, zlib.MAX_WBITS | 16, limit, coding)
        elif coding == "deflate":
            # RFC 9110 "deflate" is zlib-wrapped; some servers send raw deflate.
            try:
                body = _inflate(body, zlib.MAX_WBITS, limit, coding)
            except Unfilterable as exc:
                if exc.code != "bad_encoding":
                    raise
                body = _inflate(body, -zlib.MAX_WBITS, limit, coding)
        elif coding == "br":
            body = _unbrotli(body, limit)
        else:
            raise Unfilterable(BlockCode.UNSUPPORTED_ENCODING, f"content-encoding {coding!r} cannot be decoded")
    if len(body) > limit:
        raise Unfilterable(BlockCode.TOO_LARGE, f"body of {len(body)} bytes exceeds the limit of {limit}")
    return body


def _inflate(data: bytes, wbits: int, limit: int, coding: str) -> bytes:
    stream = zlib.decompressobj(wbits)
    out = bytearray()
    pending = data
    try:
        while pending:
            out += stream.decompress(pending, limit + 1 - len(out))
            if len(out) > limit:
                raise Unfilterable(BlockCode.TOO_LARGE, f"{coding} body expands beyond the limit of {limit} bytes")
            if stream.eof:
                break
            pending = stream.unconsumed_tail
        out += stream.flush()
    except zlib.error as exc:
        raise Unfilterable(BlockCode.BAD_ENCODING, f"{coding} body cannot be decoded: {exc}") from None
    if not stream.eof:
        raise Unfilterable(BlockCode.BAD_ENCODING, f"{coding} body is truncated")
    if stream.unused_data:
        raise Unfilterable(BlockCode.BAD_ENCODING, f"{coding} body has trailing bytes")
    if len(out) > limit:
        raise Unfilterable(BlockCode.TOO_LARGE, f"{coding} body expands beyond the limit of {limit} bytes")
    return bytes(out)


def _unbrotli(data: bytes, limit: int) -> bytes:
    stream = brotli.Decompressor()
    out = bytearray()
    try:
        for start in range(0, max(len(data), 1), _CHUNK):
            out += stream.process(data[start:start + _CHUNK], output_buffer_limit=limit + 1 - len(out))
            while len(out) <= limit and not stream.can_accept_more_data():
                out += stream.process(b"", output_buffer_limit=limit + 1 - len(out))
            if len(out) > limit:
                raise Unfilterable(BlockCode.TOO_LARGE, f"br body expands beyond the limit of {limit} bytes")
        finished = stream.is_finished()
    except brotli.error as exc:
        raise Unfilterable(BlockCode.BAD_ENCODING, f"br body cannot be decoded: {exc}") from None
    if not finished:
        raise Unfilterable(BlockCode.BAD_ENCODING, "br body is truncated")
    return bytes(out)


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse(body: bytes) -> tuple[JsonValue, bool]:
    """The parsed document, and whether it needs the exact (standard library) writer."""
    exact = _LONG_NUMBER.search(body) is not None
    try:
        document = json.loads(body.decode("utf-8"), parse_constant=_reject_constant) if exact else orjson.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        # orjson.JSONDecodeError and json.JSONDecodeError are ValueErrors.
        raise Unfilterable(BlockCode.INVALID_JSON, f"body is not valid JSON: {exc}") from None
    return cast(JsonValue, document), exact


def serialize(document: JsonValue, exact: bool = False) -> bytes:
    """Compact UTF-8 JSON; the standard library for documents with integers beyond 64 bits."""
    try:
        if not exact:
            return orjson.dumps(document)
        return json.dumps(document, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")
    except (TypeError, ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise Unfilterable(BlockCode.INVALID_JSON, f"filtered document cannot be written: {exc}") from None
