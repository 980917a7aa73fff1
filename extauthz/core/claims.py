"""Verified claims: the payload, and the views of it rules match against."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar, cast

T = TypeVar("T")
Owner = TypeVar("Owner")


def spell(value: object) -> str:
    """The text a pattern is tested against: strings as-is, the rest in JSON spelling."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


Flat = tuple[str, tuple[str, ...] | None]
"""A dotted claim name and its values in JSON spelling (None for an object, which has none of its own)."""


def _entry(name: str, value: object) -> Flat:
    if isinstance(value, Mapping):
        return (name, None)  # present, but has no value of its own to match
    if isinstance(value, list):
        return (name, tuple(spell(v) for v in value))
    return (name, (spell(value),))


def _flatten(name: str, value: object, out: list[Flat]) -> None:
    out.append(_entry(name, value))
    if isinstance(value, Mapping):
        for key, child in value.items():
            _flatten(f"{name}.{key}", child, out)


_MISSING = object()


def _find(node: Mapping[str, Any], rest: str, name: str, out: list[Flat]) -> None:
    """Entries named ``name`` below ``node``: ``rest`` as one key, or split at a dot into a key and what follows."""
    value = node.get(rest, _MISSING)
    if value is not _MISSING:
        out.append(_entry(name, value))
    dot = rest.find(".")
    while dot >= 0:
        child = node.get(rest[:dot])
        if isinstance(child, Mapping):
            _find(child, rest[dot + 1:], name, out)
        dot = rest.find(".", dot + 1)


class Claims:
    """The verified token payload, cached with its token; views of it are made when a rule needs them.

    Only the payload is kept for every cached token: the flattened view is built
    on the first rule that scans claim names, and a rule naming one claim
    exactly (``^sub$``) reads it straight from the payload. Slots, with the
    views and memos filled in on first use: ten thousand cached tokens each
    hold one of these, and an attribute dict per token cost ~1.5 MB of them.
    """

    __slots__ = ("_flat", "_more", "_owner", "_value", "payload", "provider")

    def __init__(self, payload: Mapping[str, Any], provider: str = "") -> None:
        self.payload = payload
        self.provider = provider
        self._flat: tuple[Flat, ...] | None = None
        self._owner: object | None = None
        self._value: Any = None
        self._more: dict[int, tuple[object, Any]] | None = None

    def __repr__(self) -> str:
        return f"Claims(payload={self.payload!r}, provider={self.provider!r})"

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Claims):
            return NotImplemented
        return (self.payload, self.provider) == (other.payload, other.provider)

    def __hash__(self) -> int:  # consistent with __eq__ (the payload, a dict, has no hash of its own)
        return hash(self.provider)

    @classmethod
    def of(cls, payload: Mapping[str, Any], provider: str = "") -> Claims:
        return cls(payload, provider)

    @property
    def flat(self) -> tuple[Flat, ...]:
        """Every claim as (dotted name, values), nested objects included, for patterns over claim names."""
        if self._flat is None:
            out: list[Flat] = []
            for key, value in self.payload.items():
                _flatten(str(key), value, out)
            self._flat = tuple(out)
        return self._flat

    def named(self, name: str) -> list[Flat]:
        """The entries of ``flat`` called exactly ``name`` (a key ``"a.b"`` and ``{"a": {"b": ...}}`` both are)."""
        out: list[Flat] = []
        _find(self.payload, name, name, out)
        return out

    def derived(self, owner: Owner, compute: Callable[[Owner, Claims], T]) -> T:
        """``compute(owner, self)``, once per owner (an object of the running policy) while these claims live.

        For results derived from these claims alone (a request's upstream
        mutations), computed once per verified token rather than per request.
        Each result keeps its owner alive, so an owner is found by identity.
        Most tokens only ever have one owner: it and its result are kept in two
        slots, and a dict is made only for a second one.
        """
        if not self.payload:  # the shared anonymous claims would keep every policy's owners alive
            return compute(owner, self)
        if self._owner is owner:
            return cast(T, self._value)
        more = self._more
        if more is not None:
            hit = more.get(id(owner))
            if hit is not None and hit[0] is owner:
                return cast(T, hit[1])
        value = compute(owner, self)
        if self._owner is None:
            self._owner, self._value = owner, value
        else:
            if more is None:
                more = self._more = {}
            more[id(owner)] = (owner, value)
        return value

    @property
    def sub(self) -> str | None:
        sub = self.payload.get("sub")
        return sub if isinstance(sub, str) else None

    def lookup(self, dotted: str) -> str | None:
        """A scalar claim by dotted name in its JSON spelling; None if absent or not scalar."""
        value: object = self.payload
        for part in dotted.split("."):
            if not isinstance(value, Mapping) or part not in value:
                return None
            value = value[part]
        if isinstance(value, (Mapping, list)) or value is None:
            return None
        return spell(value)


ANONYMOUS = Claims(payload={})
