"""Verified claims, flattened once per token so rule matching is a flat scan."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


def spell(value: object) -> str:
    """The text a pattern is tested against: strings as-is, the rest in JSON spelling."""
    if isinstance(value, str):
        return value
    return json.dumps(value, separators=(",", ":"), sort_keys=True)


def _flatten(prefix: str, value: object, out: list[tuple[str, tuple[str, ...] | None]]) -> None:
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
    flat: tuple[tuple[str, tuple[str, ...] | None], ...] = field(default=(), repr=False)

    @classmethod
    def of(cls, payload: Mapping[str, Any], provider: str = "") -> Claims:
        out: list[tuple[str, tuple[str, ...] | None]] = []
        for key, value in payload.items():
            _flatten(str(key), value, out)
        return cls(payload, provider, tuple(out))

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
