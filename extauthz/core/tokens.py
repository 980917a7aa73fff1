"""Find the caller's token in a request: header with prefix, cookie, or query parameter."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from extauthz.core.request import HttpRequest
from extauthz.policy.model import TokenSource


@dataclass(frozen=True)
class FoundToken:
    token: str
    source: TokenSource


def cookies(header: str) -> dict[str, str]:
    jar: dict[str, str] = {}
    for part in header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name and name not in jar:
            jar[name] = value.strip().strip('"')
    return jar


def find_token(request: HttpRequest, sources: Iterable[TokenSource]) -> FoundToken | None:
    for source in sources:
        token: str | None = None
        if source.header:
            value = request.headers.get(source.header)
            if value is not None:
                prefix = source.prefix
                if not prefix:
                    token = value.strip()
                elif value[: len(prefix)].lower() == prefix.lower():
                    token = value[len(prefix):].strip()
        elif source.cookie:
            token = cookies(request.headers.get("cookie", "")).get(source.cookie)
        elif source.query:
            values = request.query.get(source.query)
            token = values[0] if values else None
        if token:
            return FoundToken(token, source)
    return None


def without_cookies(header: str, lowered_names: Iterable[str]) -> str | None:
    """The Cookie header without the named cookies, in any case and every repeat (tokens must not go upstream).

    None when none of them is there, so the header is left exactly as sent.
    """
    names = frozenset(lowered_names)
    parts = [p.strip() for p in header.split(";") if p.strip()]
    kept = [p for p in parts if p.partition("=")[0].strip().lower() not in names]
    return None if len(kept) == len(parts) else "; ".join(kept)
