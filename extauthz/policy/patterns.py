"""Regular expressions for policy patterns, compiled with RE2.

Paths, headers and claim values are attacker-controlled, so every pattern runs
on RE2 (linear time, as Envoy's own matchers): a pattern like ``(a+)+$`` cannot
stall the sidecar. RE2 rejects backreferences and lookaround; the loader reports
that as a policy error instead of silently falling back to a backtracking engine.

A pattern may hold ``{{name}}`` placeholders. Their values are regex-escaped
before compilation (POLICY §2), so a value of ``.*`` matches only the two
characters ``.*``. Patterns without placeholders are compiled once at load time;
interpolated ones are compiled once per distinct value through a bounded cache.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import re2

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*\}\}")


class CompiledRegex(Protocol):
    def search(self, text: str) -> object | None: ...


class PatternError(ValueError):
    """A pattern that RE2 cannot compile; the message says why."""


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 8 << 20
_RE2_OPTIONS.log_errors = False


def compile_regex(source: str) -> CompiledRegex:
    try:
        compiled: CompiledRegex = re2.compile(source, options=_RE2_OPTIONS)
    except re2.error as exc:
        raise PatternError(f"invalid regular expression {source!r}: {exc}") from None
    return compiled


@functools.lru_cache(maxsize=8192)
def _compile_cached(source: str) -> CompiledRegex:
    return compile_regex(source)


def escape(value: str) -> str:
    """Escape every character RE2 could read as syntax, so the value matches itself."""
    return re.escape(value)


@dataclass(frozen=True)
class Pattern:
    """A search-semantics regex, possibly with ``{{variable}}`` placeholders."""

    source: str
    variables: tuple[str, ...] = ()
    _static: CompiledRegex | None = field(default=None, compare=False, repr=False)
    parts: Parts = field(default=(), compare=False, repr=False)

    @classmethod
    def parse(cls, source: str) -> Pattern:
        parts = split(source)
        names = _names(parts)
        if not names:
            return cls(source, (), compile_regex(source), parts)
        # Compile once with harmless stand-ins so syntax errors surface at load time.
        compile_regex(PLACEHOLDER.sub("x", source))
        return cls(source, names, None, parts)

    def search(self, text: str) -> bool:
        """Match a pattern that has no placeholders (public paths, route templates)."""
        assert self._static is not None, "pattern has placeholders; bind() it first"
        return self._static.search(text) is not None

    def bind(self, values: Mapping[str, str]) -> CompiledRegex | None:
        """The compiled regex for these variable values; None if one is missing."""
        if self._static is not None:
            return self._static
        text = interpolate(self.parts, values, escape)
        return None if text is None else _compile_cached(text)


@dataclass(frozen=True)
class Template:
    """A plain-text template such as ``user:{{sub}}`` (no regex semantics)."""

    source: str
    variables: tuple[str, ...] = ()
    parts: Parts = field(default=(), compare=False, repr=False)

    @classmethod
    def parse(cls, source: str) -> Template:
        parts = split(source)
        return cls(source, _names(parts), parts)

    def render(self, values: Mapping[str, str]) -> str | None:
        """The text with values filled in; None when a variable is unresolved."""
        return interpolate(self.parts, values, str) if self.variables else self.source


Parts = tuple[tuple[bool, str], ...]
"""A template split once at load: (is_variable, literal text or variable name)."""


def split(source: str) -> Parts:
    parts: list[tuple[bool, str]] = []
    last = 0
    for match in PLACEHOLDER.finditer(source):
        if match.start() > last:
            parts.append((False, source[last:match.start()]))
        parts.append((True, match.group(1)))
        last = match.end()
    if last < len(source):
        parts.append((False, source[last:]))
    return tuple(parts)


def _names(parts: Parts) -> tuple[str, ...]:
    return tuple(dict.fromkeys(text for is_variable, text in parts if is_variable))


def interpolate(parts: Parts, values: Mapping[str, str], transform: Callable[[str], str]) -> str | None:
    """The parts joined, each variable as ``transform(value)``; None if a value is missing."""
    out: list[str] = []
    for is_variable, text in parts:
        if not is_variable:
            out.append(text)
            continue
        value = values.get(text)
        if value is None:
            return None
        out.append(transform(value))
    return "".join(out)
