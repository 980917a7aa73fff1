"""The plain request the decision core sees; adapters build it from Envoy's protobufs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from urllib.parse import parse_qs

_EMPTY: Mapping[str, str] = MappingProxyType({})


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
