"""Rule evaluation (docs/policy.md, Rules): priority order, deny wins, default effect, fail closed.

Conditions are three-valued: true, false, or unresolved (a variable that could not
be resolved, a relationship backend that failed). Unresolved counts as matched in
a deny rule and as not matched in an allow rule, so an error can only ever deny.

Relationship conditions are the expensive ones, so they are evaluated last and
lazily: only for rules whose cheap conditions all match, and only while the
decision can still change. A matched deny makes every lookup moot. Allow
lookups run only when no allow has matched and the default would deny (with a
default allow they cannot change the outcome). Deny lookups run only when the
outcome would otherwise be allow (when nothing allows, a deny changes nothing).
Each of the two steps hands all its conditions to the resolver at once, so a
decision costs at most two round trips and the backend can batch them.

A request may read differently to the service than to Envoy (a decoded path,
a method override; see :mod:`extauthz.core.normalize`). Every reading is
decided on its own, and the request is allowed only if every reading is: a
deny rule that matches any reading denies, and each reading needs an allow of
its own (relationship questions included, about the object that reading names).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from extauthz.core.claims import Claims
from extauthz.core.normalize import READS_AS_GET, method_matches
from extauthz.core.request import HttpRequest
from extauthz.core.variables import resolve
from extauthz.policy.matchers import Exact, Matcher
from extauthz.policy.model import Effect, Presence, Proxy, Rule


class Outcome(StrEnum):
    MATCHED = "matched"
    NOT_MATCHED = "not matched"
    PENDING = "pending"
    SKIPPED = "skipped"


@dataclass(frozen=True)
class RuleTrace:
    """Why one rule did or did not match; shown by ``extauthz explain``."""

    rule: Rule
    outcome: Outcome
    reason: str


@dataclass(frozen=True)
class Verdict:
    effect: Effect
    rule: Rule | None
    trace: tuple[RuleTrace, ...]


class RelationshipResolver(Protocol):
    """Answers rules' relationship conditions: True/False, or None when unresolved.

    ``resolve_all`` receives every condition one evaluation step needs, so the
    resolver can answer them in one round trip (OpenFGA BatchCheck) instead of one
    call per rule; answers come back in the order asked.
    """

    async def resolve_all(
        self, pending: Sequence[tuple[Rule, Mapping[str, str]]], request: HttpRequest, claims: Claims
    ) -> list[bool | None]: ...

    async def aclose(self) -> None:
        """Release connection pools and background work (the policy was replaced or the server stops)."""
        ...


class NoRelationships:
    """Used when no backend is configured: every relationship condition is unresolved."""

    async def resolve_all(
        self, pending: Sequence[tuple[Rule, Mapping[str, str]]], request: HttpRequest, claims: Claims
    ) -> list[bool | None]:
        return [None] * len(pending)

    async def aclose(self) -> None:
        return None


_NO_VALUES: dict[str, str] = {}  # never written to: rules without variables only read it


def _presence(found: bool, presence: Presence) -> bool:
    return found if presence is Presence.MUST_EXIST else not found


def _cheap(rule: Rule, request: HttpRequest, claims: Claims, explain: bool) -> tuple[bool | None, str, dict[str, str]]:
    """Evaluate every non-relationship condition; (result, reason, variable values).

    The reason is formatted only when ``explain`` asks for it: a Check that
    serves traffic never shows it, and formatting was a good part of its cost.
    """
    if rule.methods is not None and not method_matches(rule.methods, request.method):
        return False, f"method {request.method} not in {sorted(rule.methods)}" if explain else "", _NO_VALUES
    values = resolve(rule.variables, request, claims) if rule.uses_values else _NO_VALUES
    unresolved: list[str] = []
    if rule.path is not None:
        regex = rule.path.pattern.bind(values)
        if regex is None:
            unresolved.append(f"path pattern {rule.path.pattern.source!r}")
        else:
            found = regex.matches(request.path)
            if not _presence(found, rule.path.presence):
                return False, f"path {request.path!r} {'does not match' if not found else 'matches'} " \
                    f"{rule.path.pattern.source!r} ({rule.path.presence.value})" if explain else "", values
    for condition in rule.token:
        name_re = condition.claim.bind(values)
        value_re = condition.value.bind(values) if condition.value is not None else None
        if name_re is None or (condition.value is not None and value_re is None):
            unresolved.append(f"token condition on {condition.claim.source!r}")
            continue
        found = _claim_found(name_re, value_re, claims)
        if not _presence(found, condition.presence):
            if not explain:
                return False, "", values
            what = condition.claim.source + (f" = {condition.value.source!r}" if condition.value else "")
            return False, f"claim {what} is {'present' if found else 'absent'} " \
                f"({condition.presence.value})", values
    if unresolved:
        return None, "unresolved: " + ", ".join(unresolved), values
    return True, "all conditions match" if explain else "", values


def _claim_found(name_re: Matcher, value_re: Matcher | None, claims: Claims) -> bool:
    """Is there a claim whose name matches, with (if asked) a value that matches? An exact name is looked up."""
    if type(name_re) is Exact:
        for name in name_re.names:
            for _, spelled in claims.named(name):
                if value_re is None:
                    return True
                if spelled is not None:
                    for value in spelled:
                        if value_re.matches(value):
                            return True
        return False
    for name, spelled in claims.flat:
        if name_re.matches(name) and (value_re is None or (
                spelled is not None and any(value_re.matches(v) for v in spelled))):
            return True
    return False


Test = Callable[[HttpRequest, Claims], bool]
"""One compiled condition, or a whole compiled rule: does it match this reading and these claims?"""


@dataclass(frozen=True, slots=True)
class CompiledRule:
    """A rule without relationship conditions, turned into one test at load time (see :func:`compile_rules`)."""

    rule: Rule
    deny: bool
    test: Test


def compile_rules(proxy: Proxy) -> tuple[CompiledRule, ...]:
    """The proxy's rules as tests, for policies without relationship conditions (the serving path).

    Computed once per policy: every condition is decided by the same
    comparisons :func:`_cheap` makes, minus the work that depends only on the
    policy (method sets widened for HEAD/OPTIONS once, static patterns bound
    once, exact claim names read straight from the payload). A rule whose
    patterns hold variables keeps the general path. ``explain`` and
    relationship rules always take the general path, which writes the trace.
    """
    return tuple(CompiledRule(rule, rule.effect is Effect.DENY, _compile(rule)) for rule in proxy.rules)


def _compile(rule: Rule) -> Test:
    if rule.uses_values:
        def general(request: HttpRequest, claims: Claims) -> bool:
            result = _cheap(rule, request, claims, False)[0]
            return rule.effect is Effect.DENY if result is None else result  # fail closed on unresolved
        return general
    tests: list[Test] = []
    if rule.methods is not None:
        methods = rule.methods | READS_AS_GET if "GET" in rule.methods else rule.methods
        tests.append(lambda request, claims: request.method in methods)
    if rule.path is not None:
        path_matches = _static(rule.path.pattern.bind(_NO_VALUES)).matches
        if rule.path.presence is Presence.MUST_EXIST:
            tests.append(lambda request, claims: path_matches(request.path))
        else:
            tests.append(lambda request, claims: not path_matches(request.path))
    for condition in rule.token:
        found = _claim_test(_static(condition.claim.bind(_NO_VALUES)),
                            None if condition.value is None else _static(condition.value.bind(_NO_VALUES)))
        tests.append(found if condition.presence is Presence.MUST_EXIST else _negated(found))
    if len(tests) == 1:
        return tests[0]
    checks = tuple(tests)

    def test(request: HttpRequest, claims: Claims) -> bool:
        for check in checks:  # noqa: SIM110 - a loop: all() over a generator costs ~1 µs more per rule
            if not check(request, claims):
                return False
        return True
    return test


def _static(matcher: Matcher | None) -> Matcher:
    assert matcher is not None, "a pattern without variables always binds"
    return matcher


def _negated(test: Test) -> Test:
    return lambda request, claims: not test(request, claims)


_ABSENT = object()


def _claim_test(name_re: Matcher, value_re: Matcher | None) -> Test:
    """:func:`_claim_found` for one condition; a single exact top-level name reads its string value directly."""
    names = name_re.names if type(name_re) is Exact else frozenset()
    if len(names) != 1 or "." in next(iter(names)):
        return lambda request, claims: _claim_found(name_re, value_re, claims)
    (name,) = names
    if value_re is None:
        return lambda request, claims: name in claims.payload
    value_matches = value_re.matches

    def found(request: HttpRequest, claims: Claims) -> bool:
        value = claims.payload.get(name, _ABSENT)
        if type(value) is str:
            return value_matches(value)
        # Absent, or not a string (a list, a number, an object): spelled as _claim_found spells it.
        return value is not _ABSENT and _claim_found(name_re, value_re, claims)
    return found


async def evaluate(
    proxy: Proxy, request: HttpRequest, claims: Claims, relationships: RelationshipResolver, explain: bool = True,
    compiled: Sequence[CompiledRule] | None = None,
) -> Verdict:
    """Decide every reading of ``request``; it is allowed only if each reading is.

    The first denied reading decides (its trace says which reading it was); a
    request without a single reading is denied. ``compiled`` is
    :func:`compile_rules` of ``proxy``, made once per policy by the caller.
    """
    views = request.views
    if views is None:
        return Verdict(Effect.DENY, None, ())
    if not explain and not proxy.has_relationships:  # the serving path of most policies: no awaits, no trace
        rules = compile_rules(proxy) if compiled is None else compiled
        first: Verdict | None = None
        for view in views:
            verdict = _plain(rules, proxy.default_effect, view, claims)
            if verdict.effect is Effect.DENY:
                return verdict
            first = first or verdict
        assert first is not None
        return first
    first = await _evaluate(proxy, views[0], claims, relationships, explain)
    if first.effect is Effect.DENY or len(views) == 1:
        return first
    for view in views[1:]:
        verdict = await _evaluate(proxy, view, claims, relationships, explain)
        if verdict.effect is Effect.DENY:
            note = f" [as the service may read it: {view.method} {view.path}]"
            return Verdict(verdict.effect, verdict.rule,
                           tuple(RuleTrace(t.rule, t.outcome, t.reason + note) for t in verdict.trace))
    return first


def _plain(rules: Sequence[CompiledRule], default: Effect, request: HttpRequest, claims: Claims) -> Verdict:
    """Rules without relationship conditions, no trace: stop at the first matched deny, skip allows once one matched."""
    allow: Rule | None = None
    for compiled in rules:
        if compiled.deny:
            if compiled.test(request, claims):
                return Verdict(Effect.DENY, compiled.rule, ())
        elif allow is None and compiled.test(request, claims):
            allow = compiled.rule  # a second allow changes nothing; only a deny still could
    if allow is not None:
        return Verdict(Effect.ALLOW, allow, ())
    return Verdict(default, None, ())


async def _evaluate(
    proxy: Proxy, request: HttpRequest, claims: Claims, relationships: RelationshipResolver, explain: bool,
) -> Verdict:
    trace: list[RuleTrace] = []
    deny: Rule | None = None
    allow: Rule | None = None
    pending: list[tuple[Rule, dict[str, str]]] = []
    for rule in proxy.rules:
        result, reason, values = _cheap(rule, request, claims, explain)
        if result is None:
            # Fail closed: unresolved matches a deny rule and never an allow rule.
            result = rule.effect is Effect.DENY
            reason += " -> counted as " + ("matched (deny rule)" if result else "not matched (allow rule)")
        if not result:
            trace.append(RuleTrace(rule, Outcome.NOT_MATCHED, reason))
        elif rule.is_relationship:
            pending.append((rule, values))
            trace.append(RuleTrace(rule, Outcome.PENDING, reason + "; relationship check pending"))
        else:
            trace.append(RuleTrace(rule, Outcome.MATCHED, reason))
            if rule.effect is Effect.DENY and deny is None:
                deny = rule
            elif rule.effect is Effect.ALLOW and allow is None:
                allow = rule
    if deny is not None:
        return _verdict(Effect.DENY, deny, trace, pending, "a deny rule already matched")

    async def ask(step: list[tuple[Rule, dict[str, str]]]) -> Rule | None:
        """Resolve one step's conditions together; the first matched rule in priority order."""
        answers = await relationships.resolve_all(step, request, claims)
        first: Rule | None = None
        for (rule, _), answer in zip(step, answers, strict=True):
            condition = rule.fga or rule.authzen
            assert condition is not None
            if answer is None:
                matched = rule.effect is Effect.DENY
                note = "relationship unresolved -> counted as " + ("matched" if matched else "not matched")
            else:
                matched = _presence(answer, condition.presence)
                note = f"relationship {'exists' if answer else 'does not exist'} ({condition.presence.value})"
            _settle(trace, rule, Outcome.MATCHED if matched else Outcome.NOT_MATCHED, note)
            if matched and first is None:
                first = rule
        return first

    allows = [(r, v) for r, v in pending if r.effect is Effect.ALLOW]
    denies = [(r, v) for r, v in pending if r.effect is Effect.DENY]
    # Step 1: allow lookups matter only when nothing allowed yet and the default denies.
    if allow is None and proxy.default_effect is Effect.DENY:
        if allows:
            allow = await ask(allows)
        if allow is None:
            return _verdict(Effect.DENY, None, trace, pending, "nothing allows, so the default denies anyway")
    # Step 2: the outcome is allow now, unless a deny rule matches.
    if denies:
        denied = await ask(denies)
        if denied is not None:
            return _verdict(Effect.DENY, denied, trace, pending, "a deny rule matched")
    if allow is not None:
        return _verdict(Effect.ALLOW, allow, trace, pending, "an allow rule already matched")
    return _verdict(proxy.default_effect, None, trace, pending, "the default allows anyway")


def _settle(trace: list[RuleTrace], rule: Rule, outcome: Outcome, note: str) -> None:
    for i, entry in enumerate(trace):
        if entry.rule is rule:
            trace[i] = RuleTrace(rule, outcome, entry.reason.replace("relationship check pending", note))


def _verdict(
    effect: Effect, rule: Rule | None, trace: list[RuleTrace],
    pending: list[tuple[Rule, dict[str, str]]], why: str,
) -> Verdict:
    for other, _ in pending:
        if any(t.rule is other and t.outcome is Outcome.PENDING for t in trace):
            _settle(trace, other, Outcome.SKIPPED, f"relationship check skipped: {why}")
    return Verdict(effect, rule, tuple(trace))
