"""How a compiled pattern is matched: plain string operations where that is exact, RE2 for the rest.

Most policy patterns are literals with anchors: ``^sub$``, ``^/v1/users/``,
``^/v1/(products|orders)/?``. For those a string comparison gives exactly the
answer RE2 gives, at a fraction of its cost: the google-re2 wrapper spends
about ten microseconds of Python per call (encoding, offset bookkeeping, a
match object), which made regex calls most of a Check's decision time.

So a pattern is read once, at load time, by a deliberately small parser that
knows only literal characters, escaped punctuation, groups, alternation,
``?`` and the outer ``^``/``$``. When it reads the whole pattern, the pattern
denotes a finite set of strings (at most ``MAX_LITERALS``) and a search is one
of ``in``, ``startswith``, ``endswith`` or a substring test. Anything else (a
character class, ``.``, a repeat, a flag, an escape such as ``\\d``) runs on
RE2, called through its compiled program directly. ``$`` means the end of the
text, as in RE2 (not Python's "end or before a final newline").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import re2

MAX_LITERALS = 64
"""Strings a pattern may expand to and still be matched without RE2 (``(a|b)(c|d)?`` is six)."""

_METACHARACTERS = frozenset("\\.+*?()|[]{}^$")


class Matcher(Protocol):
    """A compiled pattern with search semantics: does it match anywhere in ``text``?"""

    def matches(self, text: str) -> bool: ...


class Exact:
    """``^(a|b)$``: the text is one of the strings. ``names`` lets claim lookups skip the scan."""

    __slots__ = ("names",)

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def matches(self, text: str) -> bool:
        return text in self.names


class Prefix:
    __slots__ = ("_prefixes",)

    def __init__(self, prefixes: tuple[str, ...]) -> None:
        self._prefixes = prefixes

    def matches(self, text: str) -> bool:
        return text.startswith(self._prefixes)


class Suffix:
    __slots__ = ("_suffixes",)

    def __init__(self, suffixes: tuple[str, ...]) -> None:
        self._suffixes = suffixes

    def matches(self, text: str) -> bool:
        return text.endswith(self._suffixes)


class Contains:
    __slots__ = ("_parts",)

    def __init__(self, parts: tuple[str, ...]) -> None:
        self._parts = parts

    def matches(self, text: str) -> bool:
        return any(part in text for part in self._parts)


class Re2Program:
    """An RE2 program searched through the wrapper's compiled object, skipping its per-call Python.

    Only a yes/no is needed, so the match offsets the public ``search`` converts
    from bytes to characters are never looked at. Should a future wrapper not
    expose the compiled object, the public API is used instead (same answers,
    slower); tests compare both on every kind of pattern.
    """

    __slots__ = ("_match", "_public")

    def __init__(self, compiled: Any) -> None:
        self._public = compiled
        program = getattr(compiled, "_regexp", None)
        self._match = getattr(program, "Match", None)

    def matches(self, text: str) -> bool:
        if self._match is None:
            return self._public.search(text) is not None
        encoded = text.encode("utf-8")
        spans = self._match(_UNANCHORED, encoded, 0, len(encoded))
        return bool(spans[0][0] >= 0)


_UNANCHORED: Any = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", 0)


LiteralForm = tuple[Callable[[tuple[str, ...]], Matcher], tuple[str, ...]]
"""How a literal pattern matches (:class:`Exact`, :class:`Prefix`, ...) and the strings it denotes."""


def literal_form(source: str) -> LiteralForm | None:
    """``source`` as a string-operation matcher's kind and strings, or None when it needs RE2."""
    anchored_start = source.startswith("^")
    body = source[1:] if anchored_start else source
    anchored_end = body.endswith("$") and not _escaped_at(body, len(body) - 1)
    if anchored_end:
        body = body[:-1]
    parser = _Parser(body)
    try:
        alternatives = parser.alternation()
    except _Unsupported:
        return None
    if parser.position != len(body):
        return None  # a stray ')' or similar: leave it to RE2
    if parser.top_level_branches > 1 and (anchored_start or anchored_end):
        return None  # '^a|b' anchors only its first branch
    strings = tuple(sorted(alternatives))
    if anchored_start and anchored_end:
        return _exact, strings
    if anchored_start:
        return Prefix, strings
    if anchored_end:
        return Suffix, strings
    return Contains, strings


def literal_matcher(source: str) -> Matcher | None:
    """The string-operation matcher exactly equivalent to ``source``, or None when it needs RE2."""
    form = literal_form(source)
    return None if form is None else form[0](form[1])


def _exact(strings: tuple[str, ...]) -> Matcher:
    return Exact(frozenset(strings))


def _escaped_at(text: str, index: int) -> bool:
    """Is ``text[index]`` preceded by an odd number of backslashes?"""
    count = 0
    while index > 0 and text[index - 1] == "\\":
        count += 1
        index -= 1
    return count % 2 == 1


class _Unsupported(Exception):
    pass


class _Parser:
    """Reads the literal subset of RE2 syntax into the set of strings it denotes."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0
        self.top_level_branches = 0
        self._depth = 0

    def alternation(self) -> set[str]:
        branches = [self._sequence()]
        while self._peek() == "|":
            self.position += 1
            branches.append(self._sequence())
        if self._depth == 0:
            self.top_level_branches = len(branches)
        return _union(branches)

    def _sequence(self) -> set[str]:
        strings = {""}
        while (char := self._peek()) is not None and char not in "|)":
            atom = self._atom()
            if self._peek() == "?":
                self.position += 1
                if self._peek() in ("?", "+"):
                    raise _Unsupported  # lazy or possessive forms
                atom = atom | {""}
            if self._peek() in ("*", "+", "{"):
                raise _Unsupported
            strings = {head + tail for head in strings for tail in atom}
            if len(strings) > MAX_LITERALS:
                raise _Unsupported
        return strings

    def _atom(self) -> set[str]:
        char = self.text[self.position]
        if char == "(":
            self.position += 1
            if self.text.startswith("?:", self.position):
                self.position += 2
            elif self._peek() == "?":
                raise _Unsupported  # flags, named groups, lookaround
            self._depth += 1
            inner = self.alternation()
            self._depth -= 1
            if self._peek() != ")":
                raise _Unsupported
            self.position += 1
            return inner
        if char == "\\":
            escaped = self.text[self.position + 1: self.position + 2]
            # RE2 reads a backslash before ASCII punctuation as that character; letters and digits are classes.
            if not escaped or not escaped.isascii() or escaped.isalnum() or escaped == "_":
                raise _Unsupported
            self.position += 2
            return {escaped}
        if char in _METACHARACTERS:
            raise _Unsupported
        self.position += 1
        return {char}

    def _peek(self) -> str | None:
        return self.text[self.position] if self.position < len(self.text) else None


def _union(branches: list[set[str]]) -> set[str]:
    result: set[str] = set()
    for branch in branches:
        result |= branch
    if len(result) > MAX_LITERALS:
        raise _Unsupported
    return result
