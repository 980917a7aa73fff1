"""The plain request the decision core sees; adapters build it from Envoy's protobufs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from types import MappingProxyType
from urllib.parse import parse_qs, unquote_plus

from extauthz.core.normalize import normalize_host, override_methods, path_views

_EMPTY: Mapping[str, str] = MappingProxyType({})
_NO_QUERY: Mapping[str, list[str]] = MappingProxyType({})


@dataclass(frozen=True)
class HttpRequest:
    method: str
    path: str
    """The path without its query string (rules match on this)."""
    host: str = ""
    query_string: str = ""
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    """Lower-case names, as Envoy hands them over."""
    context: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    """Envoy per-route ``context_extensions`` (``proxy`` picks the policy set)."""
    request_id: str = ""

    @classmethod
    def from_target(cls, method: str, target: str, **kwargs: object) -> HttpRequest:
        """Build from a request target such as ``/v1/orders?x=1`` (the query is split off)."""
        path, _, query = target.partition("?")
        return cls(method=method.upper(), path=path, query_string=query, **kwargs)  # type: ignore[arg-type]

    @cached_property
    def query(self) -> Mapping[str, list[str]]:
        return parse_qs(self.query_string, keep_blank_values=True)

    @cached_property
    def segments(self) -> list[str]:
        return [s for s in self.path.split("/") if s]

    @cached_property
    def raw_query_names(self) -> Mapping[str, tuple[str, ...]]:
        """Decoded parameter name -> every spelling it was sent with (``access%5Ftoken`` too)."""
        names: dict[str, list[str]] = {}
        for pair in self.query_string.split("&"):
            raw = pair.split("=", 1)[0]
            if raw:
                spellings = names.setdefault(unquote_plus(raw), [])
                if raw not in spellings:
                    spellings.append(raw)
        return {name: tuple(spellings) for name, spellings in names.items()}

    @cached_property
    def host_name(self) -> str | None:
        """The host compared with ``proxies[].hosts``; None when it has no single reading."""
        return normalize_host(self.host)

    @cached_property
    def views(self) -> tuple[HttpRequest, ...] | None:
        """Every reading of this request a service may act on; None when one cannot be decided.

        The first is the request itself. Others differ in path (decoded,
        ``;parameters`` cut) or in method (a method override header or
        ``_method`` parameter). Rules hold a deny if it matches any reading and
        an allow only if it matches all.
        """
        paths = path_views(self.path)
        overrides = override_methods(self.headers, self.query if self.query_string else _NO_QUERY)
        if paths is None or overrides is None:
            return None
        methods = (self.method, *(m for m in overrides if m != self.method))
        if len(paths) == 1 and len(methods) == 1:
            return (self,)
        return tuple(
            self if (method, path) == (self.method, self.path) else replace(self, method=method, path=path)
            for method in methods for path in paths
        )
