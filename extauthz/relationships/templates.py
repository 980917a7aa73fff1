"""Fill relationship templates (``journey:{{journeyId}}``) with validated request values.

A value interpolated into a tuple string comes from the caller (a path segment,
a header) or from a token, and OpenFGA's tuple syntax gives ``:`` and ``#`` a
meaning: ``journey:{{id}}`` with an id of ``x#viewer`` would name a userset, not
an object. The policy language (docs/relationships.md) therefore rejects any value that contains whitespace, ``#``,
``:`` or a control character, either as received or after one percent-decoding
(an application behind Envoy may decode ``%3A`` into ``:``). A rejected value
makes the condition unresolved, which fails closed. Values are interpolated as
received, never decoded, so what is checked is what is sent.

Templates are split into literal and variable parts once, when the resolver is
built for a policy; a request only joins strings.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import unquote

from extauthz.policy.model import thaw
from extauthz.policy.patterns import PLACEHOLDER, Template
from extauthz.relationships.base import Cause, Unresolvable

# Whitespace (including Unicode spaces, which `\s` covers for str), the tuple
# separators, C0/C1 controls and the invisible format characters that render as nothing.
_FORBIDDEN = re.compile(r"[\s#:\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\ufeff]")


# OpenFGA's own limit for an object (256) and a user (512), type included: a longer value
# can name nothing, and answers are cached per value, so it must not cost cache memory.
MAX_VALUE_LENGTH = 256


def valid_value(value: str) -> bool:
    """Non-empty, at most 256 characters, no whitespace, ``#``, ``:`` or control character, also once decoded."""
    if not value or len(value) > MAX_VALUE_LENGTH or _FORBIDDEN.search(value) is not None:
        return False
    return "%" not in value or _FORBIDDEN.search(unquote(value, errors="replace")) is None


class TupleString:
    """A compiled ``type:{{var}}`` template whose interpolated values are validated."""

    __slots__ = ("_parts", "source")

    def __init__(self, template: Template) -> None:
        self.source = template.source
        self._parts = template.parts  # split once by the loader

    def render(self, values: Mapping[str, str]) -> str:
        out: list[str] = []
        for is_variable, text in self._parts:
            if not is_variable:
                out.append(text)
                continue
            value = values.get(text)
            if value is None:
                raise Unresolvable(Cause.UNRESOLVED_VARIABLE, f"variable {text!r} in {self.source!r} is unresolved")
            if not valid_value(value):
                # The value itself is not logged: it is caller-controlled and may be hostile.
                raise Unresolvable(Cause.INVALID_VALUE, f"variable {text!r} in {self.source!r} has a value that "
                                   "may not be interpolated (empty, whitespace, '#', ':' or control character)")
            out.append(value)
        return "".join(out)


JsonRenderer = Callable[[Mapping[str, str]], Any]


def compile_json(value: object) -> JsonRenderer:
    """A renderer for a frozen JSON value whose strings may hold ``{{var}}`` placeholders.

    Used for condition ``context``: the values are data for OpenFGA's CEL
    conditions, not tuple syntax, so they are substituted as they are (strings
    stay strings); an unresolved variable still makes the condition unresolved.
    A value without placeholders renders to the same prebuilt object every time.
    """
    if not _has_placeholder(value):
        constant = thaw(value)
        return lambda values: constant
    if isinstance(value, str):
        template = Template.parse(value)

        def render_string(values: Mapping[str, str]) -> str:
            text = template.render(values)
            if text is None:
                raise Unresolvable(Cause.UNRESOLVED_VARIABLE, f"a variable in context value {value!r} is unresolved")
            return text

        return render_string
    if isinstance(value, Mapping):
        items = [(str(k), compile_json(v)) for k, v in value.items()]
        return lambda values: {k: render(values) for k, render in items}
    if isinstance(value, (list, tuple)):
        elements = [compile_json(v) for v in value]
        return lambda values: [render(values) for render in elements]
    constant = value
    return lambda values: constant


def _has_placeholder(value: object) -> bool:
    if isinstance(value, str):
        return PLACEHOLDER.search(value) is not None
    if isinstance(value, Mapping):
        return any(_has_placeholder(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_has_placeholder(v) for v in value)
    return False

