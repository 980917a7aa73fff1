"""The response filter engine (docs/response-filtering.md): shape one parsed JSON document for one caller.

Pure on purpose: no protobuf, no I/O. The ext_proc adapter, the tests and the
benchmark all call :func:`bind` once per response (variables in, compiled
regexes out) and :meth:`BoundFilter.apply` on the parsed body.

The model, in short:

* A value's *path* is the dotted chain of object keys from the root; arrays are
  transparent (an element of ``orders`` has the path ``orders``, its ``amount``
  the path ``orders.amount``, nested arrays likewise); the root is ``""``.
* A *field operation* (no ``matchField``) selects values whose path matches
  ``jsonPath``, with their subtrees. A *row operation* addresses the arrays whose
  path matches ``jsonPath`` and tests each element: the element matches when some
  scalar inside it, at a path relative to the element (``userId``,
  ``owner.id``; ``""`` for a scalar element) that matches ``matchField``, has a
  value matching ``matchValue``. Strings are tested as they are, numbers and
  booleans in their JSON spelling; ``null`` never matches.
* ``destroy`` default (allowlist): a value survives only when a retain field
  operation selects it or an ancestor, or it lies in a row that a retain row
  operation kept and no retain field operation selects anything inside that
  array (the row is then kept whole). Containers survive when they hold a
  survivor; an array a retain row operation addresses always survives, empty
  if no row matched, and in it only matching rows survive.
* ``retain`` default (denylist): everything survives except what a destroy
  operation selects (fields with their subtrees, rows whole). Retain
  operations cannot add anything in this mode.
* Destroy always wins over retain. Row tests read the original element, so a
  field operation cannot hide the field a row test needs (field operations are
  applied before row operations). Because of these two rules the result does
  not depend on the order of the operations: priorities only order evaluation,
  and no re-prioritisation can widen what a caller sees.
* An unresolved variable makes its operation restrictive: a pattern that
  grants (a retain field selection, a retain row test) matches nothing; a
  pattern that takes away (any pattern of a destroy operation, and the
  ``jsonPath`` of a retain row operation, which puts arrays under row
  filtering) matches everything. So the seed filter for a token without
  ``sub`` yields ``{"orders": []}``.

The root always survives as a container of its own type (``{}``, ``[]``); a
scalar root that does not survive becomes ``null``.

Speed: every distinct path is matched against the patterns once per document
(a trie of :class:`_PathNode`), so a 1 MB array of similar rows costs regex
work per distinct key, not per value.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Final, TypeAlias, cast

from extauthz.core.claims import spell
from extauthz.policy.matchers import Exact, Matcher
from extauthz.policy.model import Filter, FilterEffect, FilterOperation

JsonValue: TypeAlias = "dict[str, JsonValue] | list[JsonValue] | str | int | float | bool | None"


class _Drop(Enum):
    """Marker for "this value does not survive" (``None`` is a JSON value)."""

    DROP = 0


_DROP: Final = _Drop.DROP
_ABSENT: Final = object()


class _MatchAll:
    """Stands in for an unresolved pattern wherever matching takes something away."""

    def matches(self, text: str) -> bool:
        return True


_MATCH_ALL: Final = _MatchAll()


@dataclass(frozen=True)
class RowTest:
    """One bound row operation: the arrays it addresses and the element test."""

    operation: FilterOperation
    json_path: Matcher
    match_field: Matcher
    match_value: Matcher
    unconditional: bool = False
    """A destroy row operation with an unresolved variable: every addressed row matches."""
    never: bool = False
    """A retain row operation with an unresolved variable: it still addresses its arrays, no row matches."""


@dataclass(frozen=True)
class BoundFilter:
    """A filter with its variables substituted and its patterns compiled, for one response."""

    filter: Filter
    retain_fields: tuple[Matcher, ...]
    destroy_fields: tuple[Matcher, ...]
    retain_rows: tuple[RowTest, ...]
    destroy_rows: tuple[RowTest, ...]
    unresolved: tuple[int, ...] = ()
    """Indexes of operations made restrictive by an unresolved variable (for logs)."""

    @property
    def allowlist(self) -> bool:
        return self.filter.default_operation is FilterEffect.DESTROY

    def apply(self, document: JsonValue) -> JsonValue:
        """The part of ``document`` this caller may see; ``document`` itself is not modified."""
        return _Run(self).apply(document)


def _or_all(compiled: Matcher | None) -> Matcher:
    return _MATCH_ALL if compiled is None else compiled


def bind(filter: Filter, values: Mapping[str, str]) -> BoundFilter:
    """Substitute the caller's variable values (regex-escaped) into every operation.

    An unresolved variable always resolves towards showing less: a pattern that
    *grants* (a retain field selection, a retain row test) matches nothing, a
    pattern that *takes away* (anything in a destroy operation, and the
    ``jsonPath`` of a retain row operation, which puts an array under row
    filtering) matches everything. Operations keep the loader's (priority, file
    order) order.
    """
    retain_fields: list[Matcher] = []
    destroy_fields: list[Matcher] = []
    retain_rows: list[RowTest] = []
    destroy_rows: list[RowTest] = []
    unresolved: list[int] = []
    for op in filter.operations:
        retain = op.effect is FilterEffect.RETAIN
        json_path = op.json_path.bind(values)
        if not op.is_row:
            if json_path is None:
                unresolved.append(op.index)
                if retain:
                    continue
            (retain_fields if retain else destroy_fields).append(_or_all(json_path))
            continue
        assert op.match_field is not None and op.match_value is not None  # the loader pairs them
        match_field, match_value = op.match_field.bind(values), op.match_value.bind(values)
        test_unresolved = match_field is None or match_value is None
        if json_path is None or test_unresolved:
            unresolved.append(op.index)
        test = RowTest(
            op, _or_all(json_path), _or_all(match_field), _or_all(match_value),
            unconditional=not retain and test_unresolved,
            never=retain and test_unresolved,
        )
        (retain_rows if retain else destroy_rows).append(test)
    return BoundFilter(
        filter, tuple(retain_fields), tuple(destroy_fields), tuple(retain_rows), tuple(destroy_rows),
        tuple(unresolved),
    )


def apply_filters(filters: Iterable[BoundFilter], document: JsonValue) -> JsonValue:
    """Apply several filters in turn; each one can only take more away."""
    for bound in filters:
        document = bound.apply(document)
    return document


# --- one run over one document ------------------------------------------------


class _PathNode:
    """What the operations say about one path; created on first sight, then reused."""

    __slots__ = ("children", "destroy", "destroy_rows", "path", "retain", "retain_rows")

    def __init__(self, path: str, retain: bool, destroy: bool, retain_rows: tuple[_RowMatcher, ...],
                 destroy_rows: tuple[_RowMatcher, ...]) -> None:
        self.path = path
        self.retain = retain
        self.destroy = destroy
        self.retain_rows = retain_rows
        self.destroy_rows = destroy_rows
        self.children: dict[str, _PathNode] = {}


class _FieldNode:
    """One field path relative to a row, with the row test's verdict on its name."""

    __slots__ = ("children", "name", "selected")

    def __init__(self, name: str, selected: bool) -> None:
        self.name = name
        self.selected = selected
        self.children: dict[str, _FieldNode] = {}


class _RowMatcher:
    """A row test with per-document caches: a trie of relative field paths, and value verdicts."""

    __slots__ = ("_fields", "_names", "_values", "test")

    def __init__(self, test: RowTest) -> None:
        self.test = test
        self._fields = _FieldNode("", test.match_field.matches(""))
        self._values: dict[str, bool] = {}
        names = test.match_field.names if type(test.match_field) is Exact else ()
        self._names: tuple[str, ...] = tuple(sorted(names)) if all(n and "." not in n for n in names) else ()
        """``matchField`` is one or more plain keys (``^userId$``): see :meth:`matches`."""

    def matches(self, element: JsonValue) -> bool:
        if self.test.unconditional:
            return True
        if self.test.never:
            return False
        if self._names and type(element) is dict and "" not in element:
            # Only the element's own keys can have these relative paths (a nested path holds a dot, and
            # only a "" key can lead to a nested path without one): look them up instead of scanning the row.
            for name in self._names:
                value = element.get(name, _ABSENT)
                if type(value) is str:
                    verdict = self._values.get(value)
                    if verdict is None:
                        verdict = self._values[value] = self.test.match_value.matches(value)
                    if verdict:
                        return True
                elif value is not _ABSENT and self._found(cast(JsonValue, value)):
                    return True
            return False
        return self._scan(element, self._fields)

    def _found(self, value: JsonValue) -> bool:
        """A scalar at the looked-up path, or in arrays there (transparent); an object's fields are deeper."""
        if isinstance(value, list):
            return any(self._found(item) for item in value)
        if value is None or isinstance(value, dict):
            return False
        return self._value(value)

    def _child(self, node: _FieldNode, key: str) -> _FieldNode:
        name = f"{node.name}.{key}" if node.name else key
        child = node.children[key] = _FieldNode(name, self.test.match_field.matches(name))
        return child

    def _value(self, value: str | int | float | bool) -> bool:
        text = value if isinstance(value, str) else spell(value)
        verdict = self._values.get(text)
        if verdict is None:
            verdict = self._values[text] = self.test.match_value.matches(text)
        return verdict

    def _scan(self, value: JsonValue, node: _FieldNode) -> bool:
        if isinstance(value, dict):
            children = node.children
            for key, child in value.items():
                field = children.get(key) or self._child(node, key)
                if isinstance(child, (dict, list)):
                    if self._scan(child, field):
                        return True
                elif child is not None and field.selected and self._value(child):
                    return True
            return False
        if isinstance(value, list):
            return any(self._scan(item, node) for item in value)
        if value is None:
            return False
        return node.selected and self._value(value)


def _any_matches(matchers: tuple[Matcher, ...], path: str) -> bool:
    for matcher in matchers:  # noqa: SIM110 - a loop: most filters have none or one, and any() costs more
        if matcher.matches(path):
            return True
    return False


class _Run:
    def __init__(self, bound: BoundFilter) -> None:
        self.bound = bound
        self.retain_rows = tuple(_RowMatcher(t) for t in bound.retain_rows)
        self.destroy_rows = tuple(_RowMatcher(t) for t in bound.destroy_rows)
        self.any_retain_field = bool(bound.retain_fields)
        self.root = self._node("")

    def _node(self, path: str) -> _PathNode:
        b = self.bound
        return _PathNode(
            path,
            _any_matches(b.retain_fields, path),
            _any_matches(b.destroy_fields, path),
            tuple(m for m in self.retain_rows if m.test.json_path.matches(path)) if self.retain_rows else (),
            tuple(m for m in self.destroy_rows if m.test.json_path.matches(path)) if self.destroy_rows else (),
        )

    def _child(self, node: _PathNode, key: str) -> _PathNode:
        """Create (first sight of a path) the node for ``key`` below ``node``."""
        child = node.children[key] = self._node(f"{node.path}.{key}" if node.path else key)
        return child

    def apply(self, document: JsonValue) -> JsonValue:
        allowlist = self.bound.allowlist
        result = self._allow(document, self.root, False) if allowlist else self._deny(document, self.root)
        if result is _DROP:
            if isinstance(document, dict):
                return {}
            if isinstance(document, list):
                return []
            return None
        return result

    # -- destroy default: only what is retained survives -----------------------

    def _allow(self, value: JsonValue, node: _PathNode, keep: bool) -> JsonValue | _Drop:
        if node.destroy:
            return _DROP
        keep = keep or node.retain
        if isinstance(value, dict):
            out: dict[str, JsonValue] = {}
            children = node.children
            for key, child in value.items():
                below = children.get(key) or self._child(node, key)
                if below.destroy:
                    continue
                if isinstance(child, (dict, list)):
                    kept = self._allow(child, below, keep)
                    if kept is not _DROP:
                        out[key] = kept
                elif keep or below.retain:  # scalars inline: the hot path of big documents
                    out[key] = child
            return out if (out or keep) else _DROP
        if isinstance(value, list):
            return self._allow_array(value, node, keep)
        return value if keep else _DROP

    def _allow_array(self, array: list[JsonValue], node: _PathNode, keep: bool) -> JsonValue | _Drop:
        addressed = bool(node.retain_rows)
        # Kept rows are kept whole unless a retain field operation reaches inside this array.
        whole = keep or (addressed and not self._selects_inside(array, node))
        out: list[JsonValue] = []
        destroy_rows, retain_rows = node.destroy_rows, node.retain_rows
        for element in array:
            if isinstance(element, list):
                kept = self._allow_array(element, node, keep)
            elif destroy_rows and any(m.matches(element) for m in destroy_rows):
                continue
            elif addressed:
                # One row operation is the common case: call it without building a generator per row.
                if not (retain_rows[0].matches(element) if len(retain_rows) == 1
                        else any(m.matches(element) for m in retain_rows)):
                    continue
                kept = self._allow(element, node, whole)
            else:
                kept = self._allow(element, node, keep)
            if kept is not _DROP:
                out.append(kept)
        return out if (out or keep or addressed) else _DROP

    def _selects_inside(self, value: JsonValue, node: _PathNode) -> bool:
        """Does a retain field operation select any value below the elements of this array?"""
        if not self.any_retain_field:
            return False
        if isinstance(value, list):
            return any(self._selects_inside(item, node) for item in value)
        if isinstance(value, dict):
            for key, child in value.items():
                below = node.children.get(key) or self._child(node, key)
                if below.retain or self._selects_inside(child, below):
                    return True
        return False

    # -- retain default: everything survives except what is destroyed ----------

    def _deny(self, value: JsonValue, node: _PathNode) -> JsonValue | _Drop:
        if node.destroy:
            return _DROP
        if isinstance(value, dict):
            out: dict[str, JsonValue] = {}
            children = node.children
            for key, child in value.items():
                below = children.get(key) or self._child(node, key)
                if below.destroy:
                    continue
                if isinstance(child, (dict, list)):
                    kept = self._deny(child, below)
                    if kept is not _DROP:
                        out[key] = kept
                else:
                    out[key] = child
            return out
        if isinstance(value, list):
            return self._deny_array(value, node)
        return value

    def _deny_array(self, array: list[JsonValue], node: _PathNode) -> list[JsonValue]:
        out: list[JsonValue] = []
        destroy_rows = node.destroy_rows
        for element in array:
            if isinstance(element, list):
                out.append(self._deny_array(element, node))
            elif not destroy_rows or not any(m.matches(element) for m in destroy_rows):
                kept = self._deny(element, node)
                if kept is not _DROP:
                    out.append(kept)
        return out
