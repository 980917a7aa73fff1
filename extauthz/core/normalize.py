"""How the request reads to the service behind Envoy: paths, methods and hosts.

Envoy normalises some things (dot segments, merged slashes, unreserved
percent-encodings when configured) and leaves others alone: reserved
percent-encodings such as ``%3A`` and ``%40``, ``;`` parameters, method
overrides, a trailing dot or a port on the host. A service may decode or strip
those, so a rule that only saw Envoy's bytes could be weaker than the service's
view. This module spells out each reading a service may make; the rule engine
decides each one and allows the request only if it allows every reading
(docs/SECURITY.md).

Everything here is pure string work, run once per request and only when the
request has something to normalise (the common path is a plain comparison).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from urllib.parse import unquote_to_bytes

# Methods a rule may be written for without naming them; anything else is refused
# unless some rule of the proxy names it (WebDAV and other extension methods).
STANDARD_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
# Never forwarded, whatever the rules say: TRACE (and the old TRACK) echo the request,
# injected upstream credential included, back to the caller.
REFUSED_METHODS = frozenset({"TRACE", "TRACK"})
# Methods that frameworks serve with the GET handler (HEAD always; OPTIONS when a
# handler ignores the method), so a rule written for GET applies to them as well.
READS_AS_GET = frozenset({"HEAD", "OPTIONS"})

# Headers and query parameters through which frameworks let a request claim another method.
OVERRIDE_HEADERS = ("x-http-method-override", "x-http-method", "x-method-override")
OVERRIDE_PARAMETER = "_method"

_METHOD_TOKEN = re.compile(r"^[A-Z][A-Z0-9_\-]{0,31}$")
_HOST_LABELS = re.compile(r"^[a-z0-9_\-]+(\.[a-z0-9_\-]+)*$")
_IPV6 = re.compile(r"^\[[0-9a-f:.]+\]$")


def method_matches(methods: frozenset[str], method: str) -> bool:
    """Does a rule's method list cover ``method``? HEAD and OPTIONS read as GET."""
    return method in methods or (method in READS_AS_GET and "GET" in methods)


def override_methods(headers: Mapping[str, str], query: Mapping[str, list[str]]) -> tuple[str, ...] | None:
    """The methods a request claims besides its own; None when a claim is not a method token."""
    claimed: list[str] = []
    for name in OVERRIDE_HEADERS:
        value = headers.get(name)
        if value is not None:
            claimed.extend(value.split(","))
    for name, values in query.items():
        if name.lower() == OVERRIDE_PARAMETER:
            claimed.extend(values)
    out: list[str] = []
    for raw in claimed:
        method = raw.strip().upper()
        if not _METHOD_TOKEN.match(method):
            return None
        if method not in out:
            out.append(method)
    return tuple(out)


def path_views(path: str) -> tuple[str, ...] | None:
    """The path as sent, then as a service may read it; None when it cannot be read unambiguously.

    1. as sent (after Envoy's own normalisation);
    2. percent-decoded once, dot segments resolved, slashes merged (what most
       frameworks route on);
    3. that with ``;parameters`` cut from each segment and backslashes read as
       slashes (servlet containers, IIS), dot segments resolved again, so
       ``/public/..;/admin`` reads as ``/admin``;
    4. each of those without a trailing slash (many routers treat ``/x/`` as ``/x``).

    A decoding that is not UTF-8, or holds control characters (``%00``, CR, LF),
    has no single reading: the caller refuses the request.
    """
    if path_is_plain(path):
        return (path,)
    if "%" not in path and ";" not in path and "\\" not in path and "/." not in path and "//" not in path:
        return (path, path[:-1])  # a trailing slash
    try:
        decoded = unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        return None
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in decoded):
        return None
    readings = [path, _resolve(decoded)]
    stripped = "/".join(segment.split(";", 1)[0] for segment in decoded.replace("\\", "/").split("/"))
    readings.append(_resolve(stripped))
    readings.extend([r[:-1] for r in readings if _trailing_slash(r)])
    return tuple(dict.fromkeys(readings))


def path_is_plain(path: str) -> bool:
    """Does the path read the same to every service: nothing to decode, cut or resolve, no trailing slash?"""
    return "%" not in path and ";" not in path and "\\" not in path and "/." not in path and "//" not in path \
        and (len(path) <= 1 or path[-1] != "/")


def _trailing_slash(path: str) -> bool:
    return len(path) > 1 and path.endswith("/")


def _resolve(path: str) -> str:
    """Merge slashes and resolve ``.``/``..`` segments (RFC 3986 section 5.2.4), keeping a trailing slash."""
    out: list[str] = []
    segments = path.split("/")
    for i, segment in enumerate(segments):
        last = i == len(segments) - 1
        if segment == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif segment == ".":
            if last:
                out.append("")
        elif segment or last:
            out.append(segment)
    return "/" + "/".join(out)


def normalize_host(host: str) -> str | None:
    """``Host``/``:authority`` as a name to compare: lower case, no port, no trailing dot.

    ``""`` for an absent host; None for one with no single reading (user info,
    spaces, empty labels, a port that is not a number), which the caller refuses
    rather than letting it fall through to a more lenient proxy. A service sees
    few distinct hosts, so readings of names up to DNS length are remembered
    (a bounded cache: longer, attacker-made names are read every time).
    """
    return _remembered_host(host) if len(host) <= 260 else _read_host(host)


def _read_host(host: str) -> str | None:
    if not host:
        return ""
    text = host.lower()
    if text.startswith("["):
        end = text.find("]")
        name, rest = (text[: end + 1], text[end + 1:]) if end > 0 else (text, "")
        if end < 0 or not _IPV6.match(name):
            return None
    else:
        name, sep, rest = text.partition(":")
        rest = sep + rest
    if rest and not (rest.startswith(":") and rest[1:].isdigit()):
        return None
    if name.endswith(".") and not name.startswith("["):
        name = name[:-1]
    if not name.startswith("[") and not _HOST_LABELS.match(name):
        return None
    return name


_remembered_host = functools.lru_cache(maxsize=512)(_read_host)
