"""The plain request the decision core sees; adapters build it from Envoy's protobufs."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any, Generic, TypeVar
from urllib.parse import parse_qs, unquote_plus

from extauthz.core.normalize import OVERRIDE_HEADERS, normalize_host, override_methods, path_is_plain, path_views

_EMPTY: Mapping[str, str] = MappingProxyType({})
_NO_QUERY: Mapping[str, list[str]] = MappingProxyType({})

T = TypeVar("T")


class per_request(Generic[T]):  # noqa: N801 - used as a decorator, like cached_property
    """``functools.cached_property`` without its lock.

    Python 3.11's cached_property takes an RLock on the first read of every
    instance; a request is a new instance each time, so that lock was paid on
    every Check, once per reading (~1 µs each). A request is read by one task,
    so the lock protects nothing here.
    """

    def __init__(self, compute: Callable[[Any], T]) -> None:
        self._compute = compute
        self._name = compute.__name__
        self.__doc__ = compute.__doc__

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    def __get__(self, instance: Any, owner: type | None = None) -> T:
        if instance is None:
            return self  # type: ignore[return-value] # the descriptor itself, as for any class attribute
        value = self._compute(instance)
        instance.__dict__[self._name] = value  # read from the instance from now on
        return value


@dataclass
class HttpRequest:
    """One request as Envoy saw it. Built once per Check and only read afterwards; not frozen because a frozen
    dataclass of eight fields cost ~2.5 us more to build, on every request (its readings are remembered on it)."""

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
    route_proxy: str | None = None
    """The proxy the route's metadata names (``extauthz.proxy``, or an Envoy Gateway route annotation); None
    when it names none. An empty string (names that disagree, or one that is not a string) picks no proxy."""

    @classmethod
    def from_target(cls, method: str, target: str, **kwargs: object) -> HttpRequest:
        """Build from a request target such as ``/v1/orders?x=1`` (the query is split off)."""
        path, _, query = target.partition("?")
        return cls(method=method.upper(), path=path, query_string=query, **kwargs)  # type: ignore[arg-type]

    @per_request
    def query(self) -> Mapping[str, list[str]]:
        return parse_qs(self.query_string, keep_blank_values=True)

    @per_request
    def segments(self) -> list[str]:
        return [s for s in self.path.split("/") if s]

    @per_request
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

    @per_request
    def host_name(self) -> str | None:
        """The host compared with ``proxies[].hosts``; None when it has no single reading."""
        return normalize_host(self.host)

    @per_request
    def views(self) -> tuple[HttpRequest, ...] | None:
        """Every reading of this request a service may act on; None when one cannot be decided.

        The first is the request itself. Others differ in path (decoded,
        ``;parameters`` cut) or in method (a method override header or
        ``_method`` parameter). Rules hold a deny if it matches any reading and
        an allow only if it matches all.
        """
        path, headers = self.path, self.headers
        if not self.query_string and path_is_plain(path) and not (
                OVERRIDE_HEADERS[0] in headers or OVERRIDE_HEADERS[1] in headers or OVERRIDE_HEADERS[2] in headers):
            return (self,)  # most requests: one reading, nothing to decode or override
        paths = path_views(path)
        overrides = override_methods(headers, self.query if self.query_string else _NO_QUERY)
        if paths is None or overrides is None:
            return None
        methods = (self.method, *(m for m in overrides if m != self.method))
        if len(paths) == 1 and len(methods) == 1:
            return (self,)
        return tuple(
            self if (method, path) == (self.method, self.path) else replace(self, method=method, path=path)
            for method in methods for path in paths
        )
