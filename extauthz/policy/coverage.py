"""Warn when an allow rule admits paths that a response filter meant for them does not cover.

A filter scoped to ``^/v1/orders$`` protects the list; if a rule allows
``^/v1/orders``, then ``/v1/orders/o-2`` or ``/v1/orders.json`` reach the
service and come back unfiltered. Whether two regexes cover each other cannot
be decided in general, so this is a lint: for each filter it builds a path the
filter's pattern matches, tries the spellings a service may also answer
(``/x``, ``.json`` appended), and reports each one some allow rule admits and
no filter of the proxy covers. The filter scope itself already ignores a
trailing slash, ``;parameters`` and percent-encodings (docs/SECURITY.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any

from extauthz.core.scope import request_in_scope
from extauthz.policy.model import Effect, Filter, Policy, Presence, Proxy, Rule
from extauthz.policy.patterns import PLACEHOLDER

# The stdlib's own regex parser (untyped, private): for the constructs read here RE2's syntax is the same.
sre: Any = importlib.import_module("re._parser")
c: Any = importlib.import_module("re._constants")

_SUFFIXES = ("/x1", ".json")
_SAMPLE = "v1"


@dataclass(frozen=True)
class Drift:
    proxy: str
    filter_index: int
    rule_index: int
    path: str

    def __str__(self) -> str:
        return (f"proxy {self.proxy}: allow rule #{self.rule_index} admits {self.path!r}, which no filter covers "
                f"(filter #{self.filter_index} is meant for that resource); widen the filter's path scope "
                f"or narrow the rule")


def scope_drift(policy: Policy) -> list[Drift]:
    found: list[Drift] = []
    for proxy in policy.proxies:
        for flt in proxy.filters:
            if flt.path is None:
                continue  # applies to every path
            base = example(PLACEHOLDER.sub(_SAMPLE, flt.path.source))
            if base is None or not base.startswith("/"):
                continue
            for path in (base + suffix for suffix in _SUFFIXES):
                if _covered(proxy, path):
                    continue
                rule = next((r for r in proxy.rules if _admits(r, flt, path)), None)
                if rule is not None:
                    found.append(Drift(proxy.name, flt.index, rule.index, path))
    return found


def _covered(proxy: Proxy, path: str) -> bool:
    values = {name: _SAMPLE for flt in proxy.filters for name in (flt.path.variables if flt.path else ())}
    return any(request_in_scope(f, ("GET",), (path,), values) for f in proxy.filters)


def _admits(rule: Rule, flt: Filter, path: str) -> bool:
    """Could this allow rule let a request for ``path`` through with a method the filter is for?"""
    if rule.effect is not Effect.ALLOW:
        return False
    if rule.methods is not None and flt.methods is not None and not rule.methods & flt.methods:
        return False
    if rule.path is None:
        return True
    compiled = rule.path.pattern.bind({name: _SAMPLE for name in rule.path.pattern.variables})
    if compiled is None:
        return False
    return (compiled.matches(path)) == (rule.path.presence is Presence.MUST_EXIST)


def example(pattern: str) -> str | None:
    """A short string the pattern matches (search semantics), or None for constructs not handled."""
    try:
        parsed = sre.parse(pattern)
    except Exception:  # noqa: BLE001 - RE2 accepts syntax Python's parser may not: just no example
        return None
    out: list[str] = []
    return "".join(out) if _walk(parsed, out) else None


def _walk(items: Any, out: list[str]) -> bool:
    for op, av in items:
        if op is c.LITERAL:
            out.append(chr(av))
        elif op in (c.NOT_LITERAL, c.ANY):
            out.append("a" if av != ord("a") else "b")
        elif op is c.IN:
            out.append(_member(av))
        elif op in (c.MAX_REPEAT, c.MIN_REPEAT, c.POSSESSIVE_REPEAT):
            low, _, sub = av
            for _ in range(low):
                if not _walk(sub, out):
                    return False
        elif op is c.SUBPATTERN:
            if not _walk(av[-1], out):
                return False
        elif op is c.BRANCH:
            if not _walk(av[1][0], out):
                return False
        elif op is c.AT:
            continue
        else:
            return False
    return True


def _member(items: Any) -> str:
    """A character of a ``[...]`` set: its first member, or a letter for a negated set."""
    for op, av in items:
        if op is c.NEGATE:
            return "a"
        if op is c.LITERAL:
            return chr(av)
        if op is c.RANGE:
            return chr(av[0])
        if op is c.CATEGORY:
            return "1" if av is c.CATEGORY_DIGIT else "a"
    return "a"
