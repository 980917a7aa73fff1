"""Regular expressions for policy patterns, compiled with RE2.

Paths, headers and claim values are attacker-controlled, so every pattern runs
on RE2 (linear time, as Envoy's own matchers): a pattern like ``(a+)+$`` cannot
stall the sidecar. RE2 rejects backreferences and lookaround; the loader reports
that as a policy error instead of silently falling back to a backtracking engine.

A pattern may hold ``{{name}}`` placeholders. Their values are regex-escaped
before compilation (docs/policy.md), so a value of ``.*`` matches only the two
characters ``.*``. Patterns without placeholders are compiled once at load time.
One that is literal around its placeholders (``^{{sub}}$``, ``^/v1/users/{{id}}/``)
is bound by joining strings, with no compiling and no cache; other interpolated
ones are compiled once per distinct value through a cache.

Those values come from the request (path segments, headers, claims), and an RE2
program costs memory in proportion to its length: a flood of distinct 40 KB
path segments once grew the sidecar by ~280 KB per request. So memory is
bounded twice. A value longer than ``MAX_VALUE_LENGTH`` (1024) characters makes
``Pattern.bind`` return None: the pattern is unresolved, which fails closed
(matched in a deny rule, not matched in an allow rule, restrictive in a filter).
No legitimate id comes near it (a UUID is 36 characters, an e-mail address or a
DNS name at most 254). And the cache of compiled patterns is bounded by an
estimate of their bytes (``CACHE_BUDGET_BYTES``), not by their count.

``Template.render`` has no such cap: a rendered template is a string used for
one request (an FGA tuple, an identity header), not a compiled program kept in
a cache, so its memory ends with the request; relationship templates validate
their values on their own (``extauthz.relationships.templates``).
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import re2

from extauthz.errors import ExtauthzError
from extauthz.policy.matchers import LiteralForm, Matcher, Re2Program, literal_form, literal_matcher

PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*\}\}")


class PatternError(ExtauthzError, ValueError):
    """A pattern that RE2 cannot compile; the message says why."""


_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.max_mem = 8 << 20
_RE2_OPTIONS.log_errors = False


def compile_regex(source: str) -> Matcher:
    """RE2 checks every pattern; a literal one is then matched with string operations (same answers)."""
    try:
        compiled = re2.compile(source, options=_RE2_OPTIONS)
    except re2.error as exc:
        raise PatternError(f"invalid regular expression {source!r}: {_reason(exc, source)}") from None
    return literal_matcher(source) or Re2Program(compiled)


def _compile_bound(source: str) -> Matcher:
    """A pattern with escaped values filled in; valid by construction, so a literal needs no RE2 program."""
    return literal_matcher(source) or compile_regex(source)


MAX_VALUE_LENGTH = 1024
"""Characters an interpolated value may have before the pattern counts as unresolved."""

CACHE_BUDGET_BYTES = 16 << 20
"""Estimated bytes of compiled patterns kept; at ~3 KB per short-id pattern, some 5,000 of them.

A miss costs one compile (~50 us for a short pattern, ~75 us at the cap), so a
smaller cache only costs CPU; the sidecar's memory stays flat whatever it sees.
"""

# RSS measured per compiled pattern, after one search of a matching path (the
# search builds RE2's lazy DFA, which is most of the cost), source "^/v1/x/" +
# value, including the cache's key string:
#   value chars        36     256    1024   2048   40000
#   ASCII             2.6K   5.1K   13.5K  21.0K   298K
#   CJK (3 B/char)    2.8K   6.4K   18.8K
#   emoji (4 B/char)  3.0K   7.4K   22.8K
# That is ~2.3 KB per program plus 5-11 bytes per UTF-8 byte of source; the
# estimate rounds both up so the budget bounds real memory from above.
_ENTRY_BASE_BYTES = 2560
_BYTES_PER_SOURCE_BYTE = 12


def estimate_bytes(source: str) -> int:
    """An upper estimate of the memory a compiled ``source`` holds once it has searched."""
    return _ENTRY_BASE_BYTES + _BYTES_PER_SOURCE_BYTE * len(source.encode("utf-8", "surrogatepass"))


class CompiledCache:
    """Least-recently-used compiled patterns, bounded by estimated bytes rather than by count.

    A count bound is no bound when the attacker chooses the length of each entry.
    A lock guards the bookkeeping because the filter engine may bind patterns in a
    worker thread while the event loop binds others; compiling happens outside the
    lock, so a slow compile never stalls other lookups (two threads missing on one
    source both compile it, and the first to finish is kept).
    """

    def __init__(self, budget_bytes: int, estimate: Callable[[str], int] = estimate_bytes,
                 compile: Callable[[str], Matcher] = _compile_bound) -> None:
        self.budget_bytes = budget_bytes
        self._estimate = estimate
        self._compile = compile
        self._entries: OrderedDict[str, tuple[Matcher, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, source: object) -> bool:
        return source in self._entries

    def compile(self, source: str) -> Matcher:
        with self._lock:
            entry = self._entries.get(source)
            if entry is not None:
                self._entries.move_to_end(source)
                self.hits += 1
                return entry[0]
            self.misses += 1
        compiled = self._compile(source)
        size = self._estimate(source)
        if size > self.budget_bytes:
            return compiled  # would evict everything else and still not fit
        with self._lock:
            entry = self._entries.get(source)
            if entry is not None:
                self._entries.move_to_end(source)
                return entry[0]
            self._entries[source] = (compiled, size)
            self._bytes += size
            while self._bytes > self.budget_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self._bytes -= evicted
                self.evictions += 1
        return compiled


compiled_cache = CompiledCache(CACHE_BUDGET_BYTES)
"""The process-wide cache behind ``Pattern.bind``: one budget for every policy and reload."""


def _reason(exc: re2.error, source: str) -> str:
    """RE2's message as text (the wrapper hands it over as bytes); the fragment at fault, unless it is all of it."""
    detail = exc.args[0] if exc.args else exc
    text = detail.decode("utf-8", "replace") if isinstance(detail, bytes) else str(detail)
    message, _, fragment = text.partition(": ")
    return message if not fragment or fragment == source else f"{message} at {fragment!r}"


def escape(value: str) -> str:
    """Escape every character RE2 could read as syntax, so the value matches itself."""
    return re.escape(value)


@dataclass(frozen=True)
class Pattern:
    """A search-semantics regex, possibly with ``{{variable}}`` placeholders."""

    source: str
    variables: tuple[str, ...] = ()
    _static: Matcher | None = field(default=None, compare=False, repr=False)
    parts: Parts = field(default=(), compare=False, repr=False)
    _literal: _LiteralTemplate | None = field(default=None, compare=False, repr=False)

    @classmethod
    def parse(cls, source: str) -> Pattern:
        parts = split(source)
        names = _names(parts)
        if not names:
            return cls(source, (), compile_regex(source), parts)
        # Compile once with harmless stand-ins so syntax errors surface at load time.
        compile_regex(PLACEHOLDER.sub("x", source))
        return cls(source, names, None, parts, _LiteralTemplate.read(parts, names))

    def search(self, text: str) -> bool:
        """Match a pattern that has no placeholders (public paths, route templates)."""
        assert self._static is not None, "pattern has placeholders; bind() it first"
        return self._static.matches(text)

    def bind(self, values: Mapping[str, str]) -> Matcher | None:
        """The compiled regex for these variable values; None if one is missing or too long.

        A value over ``MAX_VALUE_LENGTH`` is refused before anything is compiled: the
        caller treats None as unresolved and fails closed, and an attacker's long
        values never reach RE2 or the cache.
        """
        if self._static is not None:
            return self._static
        for name in self.variables:
            value = values.get(name)
            if value is None or len(value) > MAX_VALUE_LENGTH:
                return None
        if self._literal is not None:
            return self._literal.bind(values)
        text = interpolate(self.parts, values, escape)
        return None if text is None else compiled_cache.compile(text)


_MARK_OPEN, _MARK_CLOSE = "\ue000", "\ue001"
_MARK_BASE = 0xE100
_MARK = re.compile("\ue000(.)\ue001", re.DOTALL)
_MARK_CHARS = re.compile(f"[{_MARK_OPEN}{_MARK_CLOSE}\ue100-\ue1ff]")


class _LiteralTemplate:
    """A placeholder pattern whose every other part is literal, read once at load time.

    With its values escaped such a pattern is a literal, or a few
    (``^/v1/users/{{id}}/?$`` is two), whatever the values are: binding joins
    strings. The general path parses each filled-in source and keeps the result
    in the compiled cache, ~550 bytes and ~50 µs per distinct value; a filter
    bound to each caller's ``sub`` kept thousands of them.

    It is read by filling each variable with a marker of three private-use
    characters and reading that with the literal parser. A marker that comes out
    broken (``{{id}}?`` makes only the value's last character optional) means the
    values' own characters take part in the syntax: such a pattern stays on the
    general path.
    """

    __slots__ = ("_build", "_strings")

    def __init__(self, build: Callable[[tuple[str, ...]], Matcher], strings: tuple[Parts, ...]) -> None:
        self._build = build
        self._strings = strings

    @classmethod
    def read(cls, parts: Parts, names: tuple[str, ...]) -> _LiteralTemplate | None:
        if len(names) > 0xFF or any(not is_variable and _MARK_CHARS.search(text) for is_variable, text in parts):
            return None
        marks = {name: f"{_MARK_OPEN}{chr(_MARK_BASE + i)}{_MARK_CLOSE}" for i, name in enumerate(names)}
        form: LiteralForm | None = literal_form(
            "".join(marks[text] if is_variable else text for is_variable, text in parts))
        if form is None:
            return None
        strings: list[Parts] = []
        for string in form[1]:
            pieces = _MARK.split(string)  # literal, variable mark, literal, ...
            if any(_MARK_CHARS.search(text) for text in pieces[::2]):
                return None  # a broken marker: the syntax reaches into the values
            strings.append(tuple(
                (True, names[ord(piece) - _MARK_BASE]) if i % 2 else (False, piece)
                for i, piece in enumerate(pieces) if i % 2 or piece))
        return cls(form[0], tuple(strings))

    def bind(self, values: Mapping[str, str]) -> Matcher:
        """The matcher for these values; the caller has checked that each is present and within the cap."""
        return self._build(tuple("".join(values[text] if is_variable else text for is_variable, text in parts)
                                 for parts in self._strings))


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
