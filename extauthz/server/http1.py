"""Strict HTTP/1.1 for the HTTP ext_authz transport: Envoy's check requests in, answers out.

Envoy's ext_authz HTTP client sends one kind of request: a request line with the
original method and path, the original headers Envoy lets through, a few of its
own, and ``content-length: 0``. Anything else is not a check request this
sidecar can read unambiguously, so it is refused (:class:`HeadError`), never
read generously: no body, no ``transfer-encoding``, no repeated header, no
obsolete line folding, no control character, no other HTTP version, and limits
on the head's size and header count. The caller answers a refused head with a
400 and closes the connection, so bytes after it are never read as a request.

Header values are decoded as UTF-8 with each undecodable byte read as ``!``,
the way Envoy sanitises the same headers for the gRPC transport, so both
transports hand the decision core the same strings.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable
from typing import NamedTuple

MAX_HEAD_BYTES = 80 * 1024
"""Envoy's listener accepts 60 KiB of request headers by default; the check request adds a few."""
MAX_HEADERS = 150
"""Envoy's listener accepts 100 headers by default; the check request adds a few."""

_TCHAR = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]"
_TOKEN = re.compile(f"{_TCHAR}+")
_HEADER_NAMES = re.compile(f"(?:{_TCHAR}+(?:\n{_TCHAR}+)*)?")
"""Every header line's name, one per line (:func:`parse_head`)."""
_FIELD_NAMES = re.compile(f"{_TCHAR}+(?::{_TCHAR}+)*")
_UNSAFE_VALUE = re.compile("[\x00-\x08\x0a-\x1f\x7f]")
# Bytes allowed inside a line: tab, visible ASCII, space, obs-text (UTF-8 included).
_IN_LINE = bytes([0x09, *range(0x20, 0x7F), *range(0x80, 0x100)])
_SANITISE = "extauthz-envoy-utf8"

REASONS = {
    200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found",
    405: "Method Not Allowed", 408: "Request Timeout", 500: "Internal Server Error", 503: "Service Unavailable",
}


def _bang(error: UnicodeError) -> tuple[str, int]:
    if not isinstance(error, UnicodeDecodeError):
        raise error
    return "!" * (error.end - error.start), error.end


codecs.register_error(_SANITISE, _bang)


class HeadError(ValueError):
    """A request head that is not a check request as Envoy sends it; the message says why (for the log)."""


class RequestHead(NamedTuple):
    method: str
    target: str
    """As sent: the original path and query string (no ``path_prefix`` is configured)."""
    headers: dict[str, str]
    """Lower-case names, each once."""
    close: bool
    """The peer asked to close the connection after this answer."""


def parse_head(raw: bytes) -> RequestHead:
    """One request head, without its final blank line; raises :class:`HeadError`."""
    if len(raw) > MAX_HEAD_BYTES:
        raise HeadError(f"request head over {MAX_HEAD_BYTES} bytes")
    if not clean_lines(raw):
        raise HeadError("control character or bare CR/LF in the request head")
    request_line, *lines = raw.decode("utf-8", _SANITISE).split("\r\n")
    if len(lines) > MAX_HEADERS:
        raise HeadError(f"more than {MAX_HEADERS} headers")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise HeadError("malformed request line")
    method, target, version = parts
    if version != "HTTP/1.1":
        raise HeadError(f"unsupported version {version[:16]!r}")
    if not _TOKEN.fullmatch(method):
        raise HeadError("malformed method")
    if not target.startswith("/") and target != "*":
        raise HeadError("request target is not a path")
    # Envoy writes every header line as "name: value" (value without surrounding whitespace).
    try:
        headers = dict([line.split(": ", 1) for line in lines])
    except ValueError:
        raise HeadError("malformed header line") from None
    names = "\n".join(headers)
    if not _HEADER_NAMES.fullmatch(names):  # also refuses a space before the colon and obsolete folding
        raise HeadError("malformed header line")
    if names != names.lower():
        headers = {name.lower(): value for name, value in headers.items()}
    if len(headers) != len(lines):
        raise HeadError("repeated header")
    if "transfer-encoding" in headers:
        raise HeadError("transfer-encoding in a check request")
    if headers.get("content-length", "0") != "0":
        raise HeadError("a check request has no body")
    connection = headers.get("connection")
    close = connection is not None and "close" in (t.strip().lower() for t in connection.split(","))
    return RequestHead(method, target, headers, close)


def response(status: int, headers: Iterable[tuple[str, str]], body: bytes = b"", head_only: bool = False,
             close: bool = False) -> bytes:
    """One HTTP/1.1 response; ``head_only`` (an answer to HEAD) keeps the length but sends no body.

    Names and values come from the sidecar (the policy, the decision) and are
    checked by the caller (:func:`safe_fields`).
    """
    lines = [f"HTTP/1.1 {status} {REASONS.get(status, 'Status')}", f"content-length: {len(body)}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    if close:
        lines.append("connection: close")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode()
    return head if head_only or not body else head + body


def clean_lines(raw: bytes) -> bool:
    """No control character but CRLF line ends, and no bare CR or LF."""
    return len(raw.translate(None, _IN_LINE)) == 2 * raw.count(b"\r\n")


def safe_fields(names: Iterable[str], values: Iterable[str]) -> bool:
    """Can these headers be written as is: token names, values without control characters?"""
    return _FIELD_NAMES.fullmatch(":".join(names)) is not None and _UNSAFE_VALUE.search(" ".join(values)) is None
