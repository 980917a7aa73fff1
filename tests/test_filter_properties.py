"""Properties of the filter engine (docs/response-filtering.md), checked on generated documents and filters.

Filters are generated as policy objects and loaded through the real loader; the
checks below re-derive what may appear with Python's ``re`` on the generated
pattern texts, independently of the engine's RE2 path matching.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from extauthz.filtering.engine import bind
from extauthz.policy.loader import load_filter

KEYS = ("a", "b", "id", "owner")
ROW_FIELDS = ("id", "owner")
VALUES = ("me", "you", "x.y", "", "a|b")
UNRESOLVED = "{{missing}}"  # declared below, never given a value

settings.register_profile("filters", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("filters")

scalars = st.one_of(st.none(), st.booleans(), st.integers(-2, 2), st.sampled_from(VALUES))
# Arrays of objects with the row fields, so row operations have rows to match.
rows = st.lists(
    st.fixed_dictionaries(
        {"id": st.sampled_from(VALUES)},
        optional={"owner": st.sampled_from(VALUES), "a": scalars, "b": st.lists(scalars, max_size=2)},
    ),
    min_size=1, max_size=4,
)
documents = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=4), rows,
                               st.dictionaries(st.sampled_from(KEYS), children, max_size=4)),
    max_leaves=30,
)
random_paths = st.lists(st.sampled_from(KEYS), max_size=3).map(".".join)


@dataclass(frozen=True)
class Op:
    effect: str
    path: str
    """The jsonPath pattern text."""
    field: str | None = None
    value: str | None = None
    priority: int = 100

    def as_policy(self) -> dict[str, Any]:
        out: dict[str, Any] = {"effect": self.effect, "jsonPath": {"pattern": self.path}, "priority": self.priority}
        if self.field is not None:
            out["matchField"] = {"pattern": self.field}
            out["matchValue"] = {"pattern": self.value}
        return out


def exact(path: str) -> str:
    return "^" + re.escape(path) + "$"


@st.composite
def path_patterns(draw: st.DrawFn, paths: st.SearchStrategy[str]) -> str:
    path = draw(paths)
    kind = draw(st.sampled_from(["exact"] * 5 + ["subtree"] * 2 + ["unresolved", "any-key"]))
    if kind == "subtree":
        return "^" + re.escape(path) + r"(\..*)?$"
    if kind == "unresolved":
        return "^" + UNRESOLVED + "$"
    if kind == "any-key":
        return "^" + (re.escape(path) + r"\." if path else "") + "[a-z]+$"
    return exact(path)


@st.composite
def operations(draw: st.DrawFn, paths: st.SearchStrategy[str], row_paths_exact: bool = False) -> Op:
    effect = draw(st.sampled_from(["retain", "destroy"]))
    priority = draw(st.integers(0, 20))
    if draw(st.booleans()):
        return Op(effect, draw(path_patterns(paths)), priority=priority)
    json_path = exact(draw(paths)) if row_paths_exact else draw(path_patterns(paths))
    value = draw(st.sampled_from(["^{{callerSub}}$", "^me$", "^(me|you)$", ".*", "^" + UNRESOLVED + "$"]))
    return Op(effect, json_path, exact(draw(st.sampled_from(ROW_FIELDS))), value, priority)


@dataclass(frozen=True)
class Case:
    document: Any
    default: str
    ops: list[Op]
    sub: str


@st.composite
def cases(draw: st.DrawFn, row_paths_exact: bool = False, min_ops: int = 0) -> Case:
    """A document, then operations mostly on paths that exist in it."""
    document = draw(documents)
    present = sorted(all_paths(document))
    paths = st.one_of(st.sampled_from(present), st.sampled_from(present), st.sampled_from(present), random_paths)
    ops = draw(st.lists(operations(paths, row_paths_exact), min_size=min_ops, max_size=5))
    return Case(document, draw(st.sampled_from(["retain", "destroy"])), ops, draw(st.sampled_from(VALUES)))


def as_filter(default: str, ops: list[Op]) -> dict[str, Any]:
    return {
        "variables": [{"name": "callerSub", "source": "jwtClaim", "key": "sub"},
                      {"name": "missing", "source": "jwtClaim", "key": "never_present"}],
        "defaultFilterOperation": default,
        "operations": [o.as_policy() for o in ops],
    }


def run(default: str, ops: list[Op], document: Any, sub: str) -> Any:
    return bind(load_filter(as_filter(default, ops)), {"callerSub": sub}).apply(document)


# --- independent oracles ---------------------------------------------------------------


def matches(pattern: str, text: str, sub: str, restrictive_means_match: bool) -> bool:
    """Python's re on the substituted pattern; an unresolved variable resolves as the engine must."""
    if UNRESOLVED in pattern:
        return restrictive_means_match
    return re.search(pattern.replace("{{callerSub}}", re.escape(sub)), text) is not None


def is_subdocument(out: Any, original: Any) -> bool:
    """Objects keep a subset of keys, arrays a subsequence of elements, scalars stay equal."""
    if isinstance(original, dict):
        return isinstance(out, dict) and all(k in original and is_subdocument(v, original[k]) for k, v in out.items())
    if isinstance(original, list):
        if not isinstance(out, list):
            return False
        position = 0
        for item in out:  # greedy earliest embedding is optimal for subsequences
            while position < len(original) and not is_subdocument(item, original[position]):
                position += 1
            if position == len(original):
                return False
            position += 1
        return True
    return type(out) is type(original) and out == original


def child(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def check_allowed(out: Any, ops: list[Op], sub: str, allowlist: bool) -> None:
    """Nothing a destroy field operation selects appears; in destroy mode, only retained paths appear."""
    retain_fields = [o.path for o in ops if o.effect == "retain" and o.field is None]
    destroy_fields = [o.path for o in ops if o.effect == "destroy" and o.field is None]
    retain_rows = [o.path for o in ops if o.effect == "retain" and o.field is not None]

    def walk(value: Any, path: str, retained: bool, in_row: bool, root: bool) -> None:
        if any(matches(p, path, sub, True) for p in destroy_fields):
            # Only the root survives a destroy, as an empty container (or null for a scalar).
            assert root and value in ({}, [], None), f"destroyed path {path!r} appears: {value!r}"
            return
        retained = retained or any(matches(p, path, sub, False) for p in retain_fields)
        addressed = isinstance(value, list) and any(matches(p, path, sub, True) for p in retain_rows)
        if allowlist:
            container = isinstance(value, (dict, list)) and (bool(value) or addressed)
            holder = container or (root and value in ({}, [], None))
            assert retained or in_row or holder, f"value at {path!r} is outside the retained set: {value!r}"
        if isinstance(value, list):
            for item in value:
                walk(item, path, retained, in_row or addressed, False)
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(item, child(path, key), retained, in_row, False)

    walk(out, "", False, False, True)


def all_paths(value: Any, path: str = "") -> set[str]:
    found = {path}
    if isinstance(value, dict):
        for key, item in value.items():
            found |= all_paths(item, child(path, key))
    elif isinstance(value, list):
        for item in value:
            found |= all_paths(item, path)
    return found


# --- properties ------------------------------------------------------------------------------


# Shapes that must always be tried: a destroy under a retained ancestor, a row both retained and
# destroyed, rows of a top-level array.
PINNED = (
    Case({"a": {"b": 1, "c": [2]}}, "destroy", [Op("retain", "^a$"), Op("destroy", r"^a\.b$")], "me"),
    Case({"a": [{"id": "me", "owner": "me"}, {"id": "you"}]}, "destroy",
         [Op("retain", "^a$", "^id$", "^{{callerSub}}$"), Op("destroy", "^a$", "^owner$", "^me$")], "me"),
    Case([{"id": "me", "b": [1]}, {"id": "you"}], "destroy", [Op("retain", "^$", "^id$", "^(me|you)$"),
                                                              Op("retain", "^id$")], "me"),
)


@given(cases())
@example(PINNED[1])
@example(PINNED[2])
def test_output_is_always_a_subdocument_of_the_input(case: Case) -> None:
    out = run(case.default, case.ops, case.document, case.sub)
    assert (out is None and not isinstance(case.document, (dict, list))) or is_subdocument(out, case.document)


@given(cases())
@example(PINNED[0])
@example(PINNED[1])
@example(PINNED[2])
def test_only_the_retained_set_appears_and_nothing_destroyed(case: Case) -> None:
    out = run(case.default, case.ops, case.document, case.sub)
    check_allowed(out, case.ops, case.sub, allowlist=case.default == "destroy")


@given(cases(row_paths_exact=True))
@example(PINNED[1])
@example(PINNED[2])
def test_filtering_is_idempotent(case: Case) -> None:
    ops, sub = case.ops, case.sub
    if case.default == "destroy":
        # Row tests read the original element; filtering twice gives the same result when the
        # field a kept row was tested on is still there: the row is kept whole, or that field is
        # retained, and no destroy operation removes it.
        present = all_paths(case.document)
        retain_fields = [o.path for o in ops if o.effect == "retain" and o.field is None]
        destroy_fields = [o.path for o in ops if o.effect == "destroy" and o.field is None]
        for row in (o for o in ops if o.effect == "retain" and o.field is not None):
            array = re.sub(r"\\(.)", r"\1", row.path[1:-1])
            field = child(array, row.field[1:-1] if row.field else "")
            inside = [p for p in present if p.startswith(array + ".") or (not array and p)]
            whole = not any(matches(r, p, sub, False) for r in retain_fields for p in inside)
            assume(whole or any(matches(r, field, sub, False) for r in retain_fields))
            assume(not any(matches(d, field, sub, True) for d in destroy_fields))
    once = run(case.default, ops, case.document, sub)
    assert run(case.default, ops, once, sub) == once


@given(cases(min_ops=2), st.randoms(use_true_random=False))
def test_priorities_never_change_the_result(case: Case, rnd: Any) -> None:
    priorities = [o.priority for o in case.ops]
    rnd.shuffle(priorities)
    shuffled = [Op(o.effect, o.path, o.field, o.value, p) for o, p in zip(case.ops, priorities, strict=True)]
    assert run(case.default, shuffled, case.document, case.sub) == run(case.default, case.ops, case.document, case.sub)


METACHARACTERS = ".*+?()[]{}|^$\\-/\n\t user123é"
SEED_FILTER = {  # seed 003's allowlist (without its notes); also the workload of bench/filter_engine.py
    "variables": [{"name": "callerSub", "source": "jwtClaim", "key": "sub"}],
    "defaultFilterOperation": "destroy",
    "operations": [
        {"effect": "retain", "jsonPath": {"pattern": "^orders$"}, "matchField": {"pattern": "^userId$"},
         "matchValue": {"pattern": "^{{callerSub}}$"}, "priority": 10},
        {"effect": "retain", "jsonPath": {"pattern": "^orders\\.(orderId|userId|amount|status)$"}, "priority": 5},
    ],
}


@given(st.text(alphabet=METACHARACTERS, min_size=1, max_size=12),
       st.lists(st.text(alphabet=METACHARACTERS, max_size=12), max_size=6))
def test_a_variable_full_of_regex_metacharacters_matches_only_itself(sub: str, others: list[str]) -> None:
    candidates = [sub, sub + "\n", "\n" + sub, sub + sub, sub[:-1], *others]
    rows = [{"orderId": i, "userId": user, "secret": True} for i, user in enumerate(candidates)]
    out = bind(load_filter(SEED_FILTER), {"callerSub": sub}).apply({"orders": rows})
    assert out == {"orders": [{"orderId": r["orderId"], "userId": sub} for r in rows if r["userId"] == sub]}


# Row elements whose fields nest, repeat in arrays, and hide behind "" keys: the shapes where a row test that
# looks a plain key up could disagree with one that scans the whole row.
ROW_KEYS = ("id", "", "owner", "id.x", "x")
row_elements = st.recursive(
    scalars,
    lambda children: st.one_of(st.lists(children, max_size=3),
                               st.dictionaries(st.sampled_from(ROW_KEYS), children, max_size=4)),
    max_leaves=12,
)


@given(st.lists(row_elements, min_size=1, max_size=5), st.sampled_from(["destroy", "retain"]),
       st.sampled_from(["retain", "destroy"]), st.sampled_from((*VALUES, "1", "true")),
       st.sampled_from([("^id$", "^[i]d$"), ("^(id|owner)$", "^(i[d]|owner)$")]))
def test_a_row_test_on_plain_keys_decides_as_the_same_pattern_written_as_a_regex(
    array: list[Any], default: str, effect: str, value: str, fields: tuple[str, str],
) -> None:
    """``^id$`` is matched by key lookups, ``^[i]d$`` (the same language) by scanning the row: same rows kept."""
    literal, regex = fields
    outputs = [run(default, [Op(effect, "^rows$", field, f"^{re.escape(value)}$")], {"rows": array}, "me")
               for field in (literal, regex)]
    assert outputs[0] == outputs[1]
