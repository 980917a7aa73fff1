"""``extauthz diff`` and ``extauthz test --against``: what changes between two policies, before a rollout.

Two questions get two answers. *What did the author change?* The compiled
policies are compared, not their text: proxies by name, providers and backends
by name, rules, filters and public paths by content (a rule that only moved is
reported as moved; comments, quoting and key order are invisible), so a
reformatted file reports "no change in decisions' inputs". *Which decisions
change?* Every case of a test file (the ``extauthz test`` format) is decided by
both policies with the same runner ``extauthz test`` uses, and the cases whose
outcome differs are listed with both rule traces.

A case's outcome is its result, status, code, proxy, deciding rule, monitor
flag, and, when both policies allow, the headers set on and removed from the
upstream request. The deciding rule is compared by identity, through the same
lining-up of rules the summary uses: rule #4 that became #2 because two rules
before it were removed (or that was edited) still decides alike, and a test
file full of renumbered cases would hide the few that matter. A case that
cannot run against the second policy (its token names a provider that policy no
longer defines) is an outcome of its own, so a renamed provider shows up as
changed cases rather than as an unusable test file.

Relationship conditions are scripted by the test file, by rule index, and the
script applies to both policies by index: an answer given for ``rule: 3`` is the
answer for whatever rule is #3 in the second policy too. Indexes are what a test
file names, and matching rules across policies by content would guess wrong as
soon as the rule itself changed; so a rule that moves to another index loses its
scripted answer in the second policy (unscripted conditions stay unresolved and
fail closed, as in production), which shows up as a changed case to look at.

Tokens given as claims are minted for each policy's own provider, so ``iss`` and
``aud`` default to what *each* accepts: to see the effect of a changed issuer or
audience, name them in the claims. Secrets (an HMAC key, the upstream
credential, a password in a URL) are compared but never printed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from extauthz.core.claims import Claims
from extauthz.core.request import HttpRequest
from extauthz.policy.errors import Issue, PolicyError
from extauthz.policy.model import (
    Filter,
    FilterOperation,
    IdentityHeader,
    Policy,
    Proxy,
    PublicPath,
    Rule,
    Variable,
    thaw,
)
from extauthz.policy.patterns import Pattern, Template
from extauthz.server.validation import load_for_serving
from extauthz.toolbox.explain import Explanation, decide

if TYPE_CHECKING:
    from extauthz.toolbox.testing import Case, Suite

SAME, DIFFERENT, INVALID = 0, 1, 2
"""Exit codes, as diff(1): no difference, differences, invalid input."""


# --- running cases -----------------------------------------------------------


class ScriptedRelationships:
    """Answers relationship conditions from the test case; unscripted rules stay unresolved."""

    def __init__(self, answers: Mapping[int, bool]) -> None:
        self.answers = answers

    async def resolve_all(
        self, pending: Sequence[tuple[Rule, Mapping[str, str]]], request: HttpRequest, claims: Claims
    ) -> list[bool | None]:
        return [self.answers.get(rule.index) for rule, _ in pending]

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True)
class Run:
    """One case decided by one policy: the explanation, or why the case cannot run against that policy."""

    explanation: Explanation | None
    error: str = ""

    def summary(self) -> str:
        return self.explanation.summary() if self.explanation is not None else f"cannot run: {self.error}"

    def render(self) -> str:
        return self.explanation.render() if self.explanation is not None else f"cannot run: {self.error}"

    def as_json(self) -> dict[str, Any]:
        return self.explanation.as_json() if self.explanation is not None else {"error": self.error}


class CaseError(ValueError):
    """A case that cannot be decided by a policy (a token for a provider it does not define)."""

    def __init__(self, case: Case, reason: str, file: Path | None = None) -> None:
        super().__init__(f"{file or 'line '}{':' if file else ''}{case.line}: test {case.name!r}: {reason}")
        self.case = case
        self.reason = reason
        self.file = file
        """The test file, once known (:func:`compare` runs several)."""


async def run_cases(policy: Policy, cases: Sequence[Case], *, tolerate: bool = False) -> list[Run]:
    """Decide every case with ``policy``, offline, exactly as ``extauthz test`` does.

    A case that cannot be run raises :class:`CaseError`: the test file does not
    fit the policy it tests. With ``tolerate`` (the policy compared with) that
    becomes the case's outcome instead, to be listed as a change.
    """
    runs = []
    async with httpx.AsyncClient() as http:  # never used for keys: the minting variant's are inline
        for case in cases:
            relationships = ScriptedRelationships(case.relationships)
            try:
                runs.append(Run(await decide(policy, case.request, case.identity, http, relationships)))
            except ValueError as exc:  # e.g. a token for a provider the policy does not define
                if not tolerate:
                    raise CaseError(case, str(exc)) from None
                runs.append(Run(None, str(exc)))
            finally:
                await relationships.aclose()
    return runs


# --- comparing outcomes ------------------------------------------------------


def _rule_label(got: Explanation) -> str:
    return f"rule #{got.rule}" if got.rule is not None else ("default" if got.trace else "no rule")


def _flag(value: bool) -> str:
    return "true" if value else "false"


RuleMap = Mapping[tuple[str, int], int]
"""Which rule of the second policy each rule of the first became (:func:`rule_correspondence`)."""


def _same_rule(a: Explanation, b: Explanation, rules: RuleMap) -> bool:
    if a.rule is not None and b.rule is not None and a.proxy == b.proxy:
        return rules.get((a.proxy, a.rule)) == b.rule
    return _rule_label(a) == _rule_label(b)


def differences(before: Run, after: Run, rules: RuleMap) -> tuple[str, ...]:
    """How two outcomes of one case differ, each as ``what old -> new``; empty when the decision is the same.

    The deciding rule is compared through ``rules``: one renumbered because
    others were added or removed before it, or edited, still decides alike.
    """
    a, b = before.explanation, after.explanation
    if a is None or b is None:
        return () if before.summary() == after.summary() else (f"outcome {before.summary()} -> {after.summary()}",)
    found = []
    if a.proxy != b.proxy:
        found.append(f"proxy {a.proxy or '-'} -> {b.proxy or '-'}")
    if a.result != b.result:
        found.append(f"result {a.result} -> {b.result}")
    if a.status != b.status:
        found.append(f"status {a.status} -> {b.status}")
    if a.code != b.code:
        found.append(f"code {a.code} -> {b.code}")
    if not _same_rule(a, b, rules):
        found.append(f"rule {_rule_label(a).removeprefix('rule ')} -> {_rule_label(b).removeprefix('rule ')}")
    if a.monitored != b.monitored:
        found.append(f"monitored {_flag(a.monitored)} -> {_flag(b.monitored)}")
    if a.allowed and b.allowed:  # a denied request has no upstream request to compare
        old, new = dict(a.upstream_headers), dict(b.upstream_headers)
        for name in sorted(old.keys() | new.keys()):
            if old.get(name) != new.get(name):
                shown = [repr(h[name]) if name in h else "not set" for h in (old, new)]
                found.append(f"upstream header {name} {shown[0]} -> {shown[1]}")
        for name in sorted(set(a.removed_headers) ^ set(b.removed_headers)):
            removed = [name in h for h in (a.removed_headers, b.removed_headers)]
            found.append(f"upstream removes {name} {_flag(removed[0])} -> {_flag(removed[1])}")
    return tuple(found)


@dataclass(frozen=True)
class CaseChange:
    file: Path
    case: Case
    before: Run
    after: Run
    differences: tuple[str, ...]

    def render(self, labels: tuple[str, str]) -> list[str]:
        width = max(map(len, labels))
        lines = [f"CHANGED  {self.case.name}  ({self.file}:{self.case.line})"]
        lines += [f"      {label:<{width}}  {run.summary()}" for label, run in zip(labels, (self.before, self.after),
                                                                                    strict=True)]
        lines.append("      differs: " + "; ".join(self.differences))
        for label, run in zip(labels, (self.before, self.after), strict=True):
            lines.append(f"      {label} trace:")
            lines.extend("        " + line for line in run.render().splitlines())
        return lines

    def as_json(self, labels: tuple[str, str]) -> dict[str, Any]:
        return {"file": str(self.file), "line": self.case.line, "name": self.case.name,
                "differences": list(self.differences),
                labels[0]: self.before.as_json(), labels[1]: self.after.as_json()}


def case_changes(file: Path, cases: Sequence[Case], before: Sequence[Run], after: Sequence[Run],
                 rules: RuleMap) -> list[CaseChange]:
    """The cases whose decision differs, in file order."""
    changes = []
    for case, old, new in zip(cases, before, after, strict=True):
        found = differences(old, new, rules)
        if found:
            changes.append(CaseChange(file, case, old, new, found))
    return changes


def count_line(changed: int, total: int) -> str:
    return f"{changed} of {total} cases change"


def render_case_changes(changes: Sequence[CaseChange], total: int, labels: tuple[str, str]) -> list[str]:
    """The changed cases with both outcomes and traces, then the count (``extauthz diff --tests`` and
    ``extauthz test --against`` print exactly this)."""
    lines = [line for change in changes for line in change.render(labels)]
    lines.append(count_line(len(changes), total))
    return lines


# --- comparing policies ------------------------------------------------------


@dataclass(frozen=True)
class _Opaque:
    """A value compared by a digest and shown by a description: a secret, or key material too long to print."""

    shown: str
    digest: str


def _digest(value: object) -> str:
    raw = value if isinstance(value, bytes) else json.dumps(thaw(value), sort_keys=True, default=str).encode()
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class _Numbered:
    """A public path with its place in the list, so its summary line can name it."""

    index: int
    path: Pattern
    methods: frozenset[str] | None


def _numbered(paths: Iterable[PublicPath]) -> list[_Numbered]:
    return [_Numbered(i, p.path, p.methods) for i, p in enumerate(paths)]


_NOT_SHOWN = "not shown"
_POSITIONAL = (Rule, Filter, FilterOperation, _Numbered)
"""Their ``index`` is the place in the file, not content: comparing by content leaves it out."""
_NAMES = {"default_effect": "defaultRuleEffect", "default_operation": "defaultFilterOperation", "obj": "object",
          "jwks_inline": "jwks"}
_RENAMES: Mapping[type, Mapping[str, str]] = {
    Rule: {"path": "pattern", "path.pattern": "pattern", "path.presence": "pattern presence"},
    Filter: {"path": "pattern"},
    _Numbered: {"path": "pattern"},
}


def _camel(name: str) -> str:
    if name in _NAMES:
        return _NAMES[name]
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def _redacted(url: str) -> str:
    """A URL without the password of its userinfo (``redis://:secret@redis:6379`` -> ``redis://:***@...``)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return url
    if not password:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[2]}"))


def _variable(variable: Variable) -> str:
    where = {"jwtClaim": variable.key, "header": variable.key, "query": variable.key,
             "pathSegment": str(variable.index)}.get(variable.source.value, "")
    return f"{variable.name} ({variable.source.value}{' ' + where if where else ''})"


def _jwks(value: Mapping[str, object]) -> _Opaque:
    keys = value.get("keys")
    kids = [str(k.get("kid", "?")) for k in keys if isinstance(k, Mapping)] if isinstance(keys, Sequence) else []
    return _Opaque(f"inline JWKS, {len(kids)} key{'s' * (len(kids) != 1)}: {', '.join(kids)}", _digest(value))


def _fields(value: object, *, skip_defaults: bool = False, omit: Iterable[str] = ()) -> dict[str, Any]:
    """A policy object as ``{field: value}`` with dotted names as in the policy file and printable leaves.

    Compiled matchers and positions in the file do not take part, secrets only
    by a digest: two objects that decide alike give equal dictionaries.
    ``skip_defaults`` leaves out what the file need not say (to show what an
    added object holds); ``omit`` names top-level fields compared elsewhere.
    """
    out: dict[str, Any] = {}
    _flatten(value, "", out, skip_defaults, frozenset(omit))
    renames = next((names for kind, names in _RENAMES.items() if isinstance(value, kind)), {})
    return {renames.get(name, name): leaf for name, leaf in out.items()}


def _flatten(value: object, prefix: str, out: dict[str, Any], skip_defaults: bool,
             omit: frozenset[str] = frozenset()) -> None:
    if isinstance(value, (Pattern, Template)):
        out[prefix] = value.source
    elif isinstance(value, Variable):
        out[prefix] = _variable(value)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for field in dataclasses.fields(value):
            name = f"{prefix}.{_camel(field.name)}" if prefix else _camel(field.name)
            if not field.compare or name in omit or (field.name == "index" and isinstance(value, _POSITIONAL)):
                continue
            item = getattr(value, field.name)
            if skip_defaults and item in (field.default, None, (), "", b"", frozenset(), {}):
                continue
            if item == () and not str(field.type).startswith("tuple[str"):
                continue  # no conditions, operations...: as absent as the indexed fields a non-empty one has
            if not field.repr:  # the model marks secrets so: compared, never shown
                out[name] = _Opaque(_NOT_SHOWN, _digest(item)) if item else None
            elif field.name == "jwks_inline" and isinstance(item, Mapping):
                out[name] = _jwks(item)
            elif isinstance(item, str) and field.name.endswith(("url", "uri")):
                out[name] = _Opaque(_redacted(item), _digest(item)) if _redacted(item) != item else item
            else:
                _flatten(item, name, out, skip_defaults)
    elif isinstance(value, tuple) and value and all(isinstance(v, IdentityHeader) for v in value):
        for header in value:
            out[f"{prefix}.{header.name}"] = header.value.source
    elif isinstance(value, tuple) and value and all(isinstance(v, (Variable, str)) for v in value):
        out[prefix] = [_variable(v) if isinstance(v, Variable) else v for v in value]
    elif isinstance(value, tuple) and value and all(dataclasses.is_dataclass(v) for v in value):
        ordered = sorted(value, key=lambda v: v.index) if all(isinstance(v, FilterOperation) for v in value) else value
        for i, item in enumerate(ordered):
            _flatten(item, f"{prefix}[{i}]", out, skip_defaults)
    elif isinstance(value, (frozenset, set)):
        out[prefix] = sorted(value, key=str)
    elif isinstance(value, Enum):
        out[prefix] = value.value
    elif isinstance(value, (Mapping, tuple, list)):
        out[prefix] = thaw(value)
    else:
        out[prefix] = value


def _show(value: object) -> str:
    if value is None:
        return "(unset)"
    if isinstance(value, bool):
        return _flag(value)
    if isinstance(value, _Opaque):
        return f"({value.shown})" if value.shown == _NOT_SHOWN else value.shown
    if isinstance(value, str):
        return repr(value) if value else "(unset)"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _json(value: object) -> object:
    return value.shown if isinstance(value, _Opaque) else value


def _key(fields: Mapping[str, Any]) -> str:
    """A hashable identity of an object's content, for lining up two lists."""
    return json.dumps({k: v.digest if isinstance(v, _Opaque) else v for k, v in fields.items()},
                      sort_keys=True, default=str)


@dataclass(frozen=True)
class FieldChange:
    name: str
    old: Any
    new: Any

    def text(self) -> str:
        if isinstance(self.new, _Opaque) and _show(self.old) == _show(self.new):  # a secret, or keys with same ids
            return f"{self.name} changed ({self.new.shown})"
        return f"{self.name} {_show(self.old)} -> {_show(self.new)}"


def _field_changes(old: Mapping[str, Any], new: Mapping[str, Any]) -> tuple[FieldChange, ...]:
    names = list(old) + [name for name in new if name not in old]
    return tuple(FieldChange(n, old.get(n), new.get(n)) for n in names if old.get(n) != new.get(n))


def _content(fields: Mapping[str, Any]) -> str:
    return "; ".join(f"{name} {_show(value)}" for name, value in fields.items())


@dataclass(frozen=True)
class PolicyChange:
    """One line of the summary: ``where: item change: details``."""

    where: str
    """``proxy orders``, ``provider corp-idp``, ``openfga fga``, ``server``..."""
    change: str
    """added, removed, changed, moved"""
    item: str = ""
    """``rule #3 (deny) "notes"``, ``filter #0``, ``publicPath #1``; empty when the change is ``where``'s own."""
    fields: tuple[FieldChange, ...] = ()
    content: Mapping[str, Any] | None = None
    """What an added object holds (its fields that are not defaults)."""

    def text(self) -> str:
        head = f"{self.where}: {self.item} {self.change}" if self.item else f"{self.where} {self.change}"
        if self.fields:
            return f"{head}: " + "; ".join(change.text() for change in self.fields)
        return f"{head}: {_content(self.content)}" if self.content else head

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {"where": self.where, "item": self.item, "change": self.change,
                                    "text": self.text()}
        if self.fields:
            document["fields"] = {c.name: {"old": _json(c.old), "new": _json(c.new)} for c in self.fields}
        if self.content:
            document["content"] = {name: _json(value) for name, value in self.content.items()}
        return document


def _label(kind: str, old: Any, new: Any) -> str:
    """``rule #3 (deny) "notes"``; ``rule #3 -> #4 ...`` when its place in the file changed."""
    item = new if new is not None else old
    number = f"#{old.index} -> #{new.index}" if old is not None and new is not None and old.index != new.index \
        else f"#{item.index}"
    effect = getattr(item, "effect", None)
    notes = getattr(item, "notes", "")
    return f"{kind} {number}" + (f" ({effect.value})" if effect is not None else "") + (f' "{notes}"' if notes else "")


def _similarity(old: Mapping[str, Any], new: Mapping[str, Any]) -> float:
    names = old.keys() | new.keys()
    return sum(old.get(n) == new.get(n) for n in names) / len(names) if names else 1.0


def _pairs(old: Sequence[Mapping[str, Any]], olds: range, new: Sequence[Mapping[str, Any]], news: range,
           ) -> list[tuple[int, int]]:
    """Which of a run of differing objects are edits of one another: the most alike first, if at least half alike.

    Pairing by position would report an unrelated rule as "changed" whenever a
    rule is removed in front of another that was edited.
    """
    scored = sorted(((_similarity(old[i], new[j]), i, j) for i in olds for j in news), key=lambda s: -s[0])
    pairs: list[tuple[int, int]] = []
    for score, i, j in scored:
        if score >= 0.5 and all(i != a and j != b for a, b in pairs):
            pairs.append((i, j))
    return pairs


@dataclass(frozen=True)
class _Alignment:
    """Two lists of rules (filters, public paths) lined up by content, as positions in each."""

    same: tuple[tuple[int, int], ...]
    changed: tuple[tuple[int, int], ...]
    moved: tuple[tuple[int, int], ...]
    removed: tuple[int, ...]
    added: tuple[int, ...]


def _align(old: Sequence[Mapping[str, Any]], new: Sequence[Mapping[str, Any]]) -> _Alignment:
    """Identical objects in the same relative order are the same object; in a run of differing ones, those
    at least half alike are edits of one another; one removed here and added there unchanged has moved."""
    old_keys, new_keys = [_key(f) for f in old], [_key(f) for f in new]
    same: list[tuple[int, int]] = []
    changed: list[tuple[int, int]] = []
    removed: list[int] = []
    added: list[int] = []
    matcher = difflib.SequenceMatcher(None, old_keys, new_keys, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            same.extend(zip(range(i1, i2), range(j1, j2), strict=True))
            continue
        pairs = _pairs(old, range(i1, i2), new, range(j1, j2))
        changed.extend(pairs)
        removed.extend(i for i in range(i1, i2) if all(i != a for a, _ in pairs))
        added.extend(j for j in range(j1, j2) if all(j != b for _, b in pairs))
    moved = []
    for i in list(removed):
        j = next((j for j in added if new_keys[j] == old_keys[i]), None)
        if j is not None:
            removed.remove(i)
            added.remove(j)
            moved.append((i, j))
    return _Alignment(tuple(same), tuple(changed), tuple(moved), tuple(removed), tuple(added))


def _list_changes(where: str, kind: str, old: Sequence[Any], new: Sequence[Any]) -> list[PolicyChange]:
    """What was added, removed, changed, moved; in file order (the new file's; a removed object where it
    stood in the old one)."""
    old_fields, new_fields = [_fields(o) for o in old], [_fields(n) for n in new]
    lined = _align(old_fields, new_fields)
    out = [((new[j].index, 1), PolicyChange(where, "changed", _label(kind, old[i], new[j]),
                                            _field_changes(old_fields[i], new_fields[j])))
           for i, j in lined.changed]
    out += [((new[j].index, 1), PolicyChange(where, "moved", _label(kind, old[i], new[j]))) for i, j in lined.moved]
    out += [((old[i].index, 0), PolicyChange(where, "removed", _label(kind, old[i], None))) for i in lined.removed]
    out += [((new[j].index, 1), PolicyChange(where, "added", _label(kind, None, new[j]),  # effect, notes: in the label
                                             content=_fields(new[j], skip_defaults=True, omit={"effect", "notes"})))
            for j in lined.added]
    return [change for _, change in sorted(out, key=lambda entry: entry[0])]


def _by_index(items: Iterable[Any]) -> list[Any]:
    """Rules and filters in the file's order: held in evaluation order, but the file's is what an author edits
    (a move within one priority changes the evaluation order too, and is reported)."""
    return sorted(items, key=lambda item: item.index)


def rule_correspondence(old: Policy, new: Policy) -> dict[tuple[str, int], int]:
    """``(proxy, old rule index) -> new rule index`` for every rule that is still there, edited or moved.

    A case decided by rule #4 in one policy and #2 in the other is decided by
    the same rule when two rules before it were removed: that is no change.
    """
    found = {}
    for proxy in old.proxies:
        other = new.proxy_named(proxy.name)
        if other is None:
            continue
        before, after = _by_index(proxy.rules), _by_index(other.rules)
        lined = _align([_fields(r) for r in before], [_fields(r) for r in after])
        for i, j in (*lined.same, *lined.changed, *lined.moved):
            found[(proxy.name, before[i].index)] = after[j].index
    return found


_PROXY_LISTS = ("rules", "filters", "publicPaths")


def _proxy_changes(name: str, old: Proxy | None, new: Proxy | None) -> list[PolicyChange]:
    """A proxy's own settings on one line, then its public paths, rules and filters one line each."""
    where = f"proxy {name}"
    if new is None:
        assert old is not None
        return [PolicyChange(where, "removed", content={"rules": len(old.rules), "filters": len(old.filters)})]
    if old is None:  # every rule and filter of it is added: listed like additions to an empty proxy
        own = _fields(new, skip_defaults=True, omit={"name", *_PROXY_LISTS})
        head = PolicyChange(where, "added", content={**own, "rules": len(new.rules), "filters": len(new.filters)})
        return [head, *_items(where, Proxy(name=name, providers=()), new)]
    found = _field_changes(_fields(old, omit=_PROXY_LISTS), _fields(new, omit=_PROXY_LISTS))
    return ([PolicyChange(where, "changed", fields=found)] if found else []) + _items(where, old, new)


def _items(where: str, old: Proxy, new: Proxy) -> list[PolicyChange]:
    return [
        *_list_changes(where, "publicPath", _numbered(old.public_paths), _numbered(new.public_paths)),
        *_list_changes(where, "rule", _by_index(old.rules), _by_index(new.rules)),
        *_list_changes(where, "filter", _by_index(old.filters), _by_index(new.filters)),
    ]


def _named_changes(kind: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> list[PolicyChange]:
    """Objects matched by name (providers, relationship backends)."""
    out = []
    for name in [*old, *(n for n in new if n not in old)]:
        where = f"{kind} {name}"
        if name not in new:
            out.append(PolicyChange(where, "removed"))
        elif name not in old:
            out.append(PolicyChange(where, "added", content=_fields(new[name], skip_defaults=True, omit={"name"})))
        else:
            found = _field_changes(_fields(old[name]), _fields(new[name]))
            if found:
                out.append(PolicyChange(where, "changed", fields=found))
    return out


def _single_changes(where: str, old: object, new: object) -> list[PolicyChange]:
    found = _field_changes(_fields(old), _fields(new))
    return [PolicyChange(where, "changed", fields=found)] if found else []


def policy_changes(old: Policy, new: Policy) -> list[PolicyChange]:
    """What differs between two compiled policies, in the order a reader checks it."""
    out = _named_changes("provider", old.providers, new.providers)
    for name in [*(p.name for p in old.proxies), *(p.name for p in new.proxies if old.proxy_named(p.name) is None)]:
        out += _proxy_changes(name, old.proxy_named(name), new.proxy_named(name))
    common_old = [p.name for p in old.proxies if new.proxy_named(p.name) is not None]
    common_new = [p.name for p in new.proxies if old.proxy_named(p.name) is not None]
    if common_old != common_new:  # hosts are matched in order, and a lone proxy is everyone's
        out.append(PolicyChange("proxies", "changed", fields=(FieldChange("order", common_old, common_new),)))
    out += _named_changes("openfga", old.openfga, new.openfga)
    out += _named_changes("authzen", old.authzen, new.authzen)
    out += _single_changes("relationship cache", old.relationship_cache, new.relationship_cache)
    out += _single_changes("server", old.server, new.server)
    return out


# --- the command -------------------------------------------------------------


def load_policies(*files: Path) -> list[Policy]:
    """Each policy with the checks ``extauthz serve`` applies; one PolicyError with every file's issues."""
    policies: list[Policy] = []
    issues: list[Issue] = []
    for file in files:
        try:
            policies.append(load_for_serving(file))
        except PolicyError as exc:
            issues.extend(exc.issues)
    if issues:
        raise PolicyError(issues)
    return policies


@dataclass(frozen=True)
class SuiteChanges:
    file: Path
    total: int
    changes: tuple[CaseChange, ...]


LABELS = ("old", "new")


@dataclass(frozen=True)
class PolicyDiff:
    """Everything ``extauthz diff`` found; ``suites`` is None without ``--tests``."""

    old: Policy
    new: Policy
    changes: tuple[PolicyChange, ...]
    suites: tuple[SuiteChanges, ...] | None

    @property
    def case_changes(self) -> list[CaseChange]:
        return [change for suite in self.suites or () for change in suite.changes]

    @property
    def total(self) -> int:
        return sum(suite.total for suite in self.suites or ())

    @property
    def status(self) -> int:
        """With tests, only decisions count: a change no case notices is what the tests are asked about."""
        if self.suites is None:
            return DIFFERENT if self.changes else SAME
        return DIFFERENT if self.case_changes else SAME

    def render(self) -> str:
        lines = [f"old  {self.old.source} (policy {self.old.digest})",
                 f"new  {self.new.source} (policy {self.new.digest})"]
        if self.suites is None:
            lines.extend(change.text() for change in self.changes)
            lines.append(_count(len(self.changes), "change") if self.changes else "no change in decisions' inputs")
            return "\n".join(lines)
        lines.extend(render_case_changes(self.case_changes, self.total, LABELS))
        if self.changes and not self.case_changes:
            lines.append(f"the policies differ ({_count(len(self.changes), 'change')}) but no test case's decision "
                         "does: run without --tests to see what changed")
        return "\n".join(lines)

    def as_json(self) -> dict[str, Any]:
        document: dict[str, Any] = {
            "old": {"file": self.old.source, "digest": self.old.digest},
            "new": {"file": self.new.source, "digest": self.new.digest},
            "differ": self.status == DIFFERENT,
            "changes": [change.as_json() for change in self.changes],
        }
        if self.suites is not None:
            document["tests"] = {
                "files": [str(suite.file) for suite in self.suites], "cases": self.total,
                "changed": [change.as_json(LABELS) for change in self.case_changes],
                "summary": count_line(len(self.case_changes), self.total),
            }
        return document


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


async def compare(old: Policy, new: Policy, suites: Sequence[Suite] | None = None) -> PolicyDiff:
    """Compare two loaded policies, and their decisions on every case of ``suites``.

    A case that cannot run against ``old`` raises :class:`CaseError`: the test
    file does not fit the policy compared from, as ``extauthz test`` would say.
    """
    compared = None
    if suites is not None:
        compared = []
        rules = rule_correspondence(old, new)
        for suite in suites:
            try:
                before = await run_cases(old, suite.cases)
            except CaseError as exc:
                raise CaseError(exc.case, exc.reason, suite.file) from None
            after = await run_cases(new, suite.cases, tolerate=True)
            compared.append(SuiteChanges(suite.file, len(suite.cases),
                                         tuple(case_changes(suite.file, suite.cases, before, after, rules))))
    return PolicyDiff(old, new, tuple(policy_changes(old, new)), None if compared is None else tuple(compared))
