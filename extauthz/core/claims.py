"""Verified claims, flattened once per token so rule matching is a flat scan."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cached_property
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


def _flatten(prefix: str, value: object, out: list[Flat]) -> None:
    if isinstance(value, Mapping):
        out.append((prefix, None))  # present, but has no value of its own to match
        for key, child in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), child, out)
    elif isinstance(value, list):
        out.append((prefix, tuple(spell(v) for v in value)))
    else:
        out.append((prefix, (spell(value),)))


@dataclass(frozen=True)
class Claims:
    """The verified token payload plus its flattened (dotted name, values) view."""

    payload: Mapping[str, Any]
    provider: str = ""
    flat: tuple[Flat, ...] = field(default=(), repr=False)
    named: Mapping[str, tuple[Flat, ...]] = field(default_factory=dict, repr=False)
    """``flat`` by dotted name, for conditions that name one claim exactly (``^sub$``): a lookup, not a scan.
    A name may occur twice (a key ``"a.b"`` beside ``{"a": {"b": ...}}``)."""
    memo: dict[int, tuple[object, Any]] = field(default_factory=dict, compare=False, repr=False)
    """Results derived from these claims alone (identity header values per ``upstream``), computed once per
    verified token rather than per request: claims are cached with their token. Keyed by ``id(owner)``;
    each entry keeps its owner alive so the id cannot be reused while the entry exists."""

    def derived(self, owner: Owner, compute: Callable[[Owner, Claims], T]) -> T:
        """``compute(owner, self)``, once per owner (an object of the running policy) while these claims live."""
        hit = self.memo.get(id(owner))
        if hit is not None and hit[0] is owner:
            return cast(T, hit[1])
        value = compute(owner, self)
        if self.payload:  # the shared anonymous claims would keep every policy's owners alive
            self.memo[id(owner)] = (owner, value)
        return value

    @classmethod
    def of(cls, payload: Mapping[str, Any], provider: str = "") -> Claims:
        out: list[Flat] = []
        for key, value in payload.items():
            _flatten(str(key), value, out)
        named: dict[str, tuple[Flat, ...]] = {}
        for entry in out:
            named[entry[0]] = (*named.get(entry[0], ()), entry)
        return cls(payload, provider, tuple(out), named)

    @cached_property
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
