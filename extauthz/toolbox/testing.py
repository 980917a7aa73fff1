"""``extauthz test``: policy unit tests in YAML, run offline, for CI (like ``opa test``).

A test file names a policy and lists requests with the outcome each must get::

    policy: policy.yaml              # relative to this file
    tests:
      - name: a user reads orders
        request: {method: GET, path: /v1/orders, headers: {x-env: prod}}
        token: {claims: {sub: user-123, tenant_id: acme}}
        expect: {result: allow, rule: 2, headers: {x-auth-sub: user-123}}

Tokens are given as claims and minted with a throwaway local key against a
variant of the policy whose providers only differ in their key source (see
:mod:`extauthz.toolbox.minting`), so issuer, audience, algorithm and expiry are
still checked for real. Relationship conditions make no network call: each test
may script them per rule
(``relationships: [{rule: 3, exists: true}]``); unscripted ones stay
unresolved, which fails closed as in production.

Exit codes: 0 every test passed, 1 some test failed, 2 the test file or the
policy is invalid (the policy gets exactly the checks ``extauthz serve`` applies).

With ``--against OTHER`` the cases are also decided by a second policy and the
ones whose decision differs are listed after the results (as ``extauthz diff
--tests`` lists them): expectations are checked against the tested policy only,
so the exit code means what it always does. Cases are run, and their outcomes
compared, by :mod:`extauthz.toolbox.diff`, the one runner of both commands.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from extauthz.core.request import HttpRequest
from extauthz.policy.errors import Issue, PolicyError
from extauthz.policy.model import Policy
from extauthz.policy.source import LDict, LList, read_document
from extauthz.toolbox.diff import (
    CaseError,
    Run,
    case_changes,
    load_policies,
    render_case_changes,
    rule_correspondence,
    run_cases,
)
from extauthz.toolbox.explain import Explanation, Identity, build_request

PASSED, FAILED, INVALID = 0, 1, 2


@dataclass(frozen=True)
class Expectation:
    result: str
    status: int | None = None
    code: str | None = None
    rule: int | str | None = None
    """A rule index, or ``default`` when no rule decided."""
    headers: Mapping[str, str] = field(default_factory=dict)
    monitored: bool | None = None

    def mismatches(self, got: Explanation) -> list[str]:
        wrong = []
        if got.result != self.result:
            wrong.append(f"result: expected {self.result}, got {got.result}")
        if self.status is not None and got.status != self.status:
            wrong.append(f"status: expected {self.status}, got {got.status}")
        if self.code is not None and got.code != self.code:
            wrong.append(f"code: expected {self.code}, got {got.code}")
        if self.rule is not None:
            decided: int | str = "default" if got.rule is None else got.rule
            if decided != self.rule:
                wrong.append(f"rule: expected {_rule_name(self.rule)}, got {_rule_name(decided)}")
        if self.monitored is not None and got.monitored != self.monitored:
            wrong.append(f"monitored: expected {self.monitored}, got {got.monitored}")
        upstream = dict(got.upstream_headers)
        for name, value in self.headers.items():
            if upstream.get(name) != value:
                shown = "not set" if name not in upstream else repr(upstream[name])
                wrong.append(f"upstream header {name}: expected {value!r}, got {shown}")
        return wrong


def _rule_name(rule: int | str) -> str:
    return f"rule #{rule}" if isinstance(rule, int) else "default (no rule)"


@dataclass(frozen=True)
class Case:
    name: str
    line: int
    request: HttpRequest
    identity: Identity
    expect: Expectation
    relationships: Mapping[int, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class Suite:
    file: Path
    policy_file: Path
    cases: tuple[Case, ...]


# --- parsing ---------------------------------------------------------------


class _Reader:
    """Strict reading of the test file: unknown fields and wrong types are errors with a line."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.issues: list[Issue] = []

    def error(self, line: int, where: str, message: str) -> None:
        self.issues.append(Issue(self.file, line, where, message))

    def mapping(self, value: object, where: str, line: int, allowed: set[str]) -> LDict | None:
        if not isinstance(value, LDict):
            self.error(line, where, "must be an object")
            return None
        for key in value:
            if key not in allowed:
                self.error(value.lines[key], f"{where}.{key}", f"unknown field; allowed: {', '.join(sorted(allowed))}")
        return value

    def strings(self, value: object, where: str, line: int) -> dict[str, str]:
        if value is None:
            return {}
        if not isinstance(value, LDict):
            self.error(line, where, "must be an object of strings")
            return {}
        out = {}
        for key, item in value.items():
            if isinstance(item, (str, int, float)) and not isinstance(item, bool):
                out[key] = str(item)
            else:
                self.error(value.lines[key], f"{where}.{key}", "must be a string")
        return out


def _case(reader: _Reader, where: str, line: int, raw: object) -> Case | None:
    case = reader.mapping(raw, where, line, {"name", "request", "token", "expect", "relationships"})
    if case is None:
        return None
    name = case.get("name")
    if not isinstance(name, str) or not name:
        reader.error(case.line, f"{where}.name", "every test needs a name")
        name = where
    request = reader.mapping(case.get("request"), f"{where}.request", case.lines.get("request", case.line),
                             {"method", "path", "headers", "host", "proxy"})
    expect = reader.mapping(case.get("expect"), f"{where}.expect", case.lines.get("expect", case.line),
                            {"result", "status", "code", "rule", "headers", "monitored"})
    if request is None or expect is None:
        return None
    method, path = request.get("method", "GET"), request.get("path")
    if not isinstance(method, str) or not isinstance(path, str) or not path.startswith("/"):
        reader.error(request.line, f"{where}.request", "needs method and a path starting with /")
        return None
    http = build_request(method, path, reader.strings(request.get("headers"), f"{where}.request.headers",
                                                      request.line),
                         str(request.get("host", "")), str(request.get("proxy", "")))
    identity = Identity()
    if "token" in case:
        token = reader.mapping(case["token"], f"{where}.token", case.lines["token"],
                               {"claims", "provider", "expiresIn"})
        if token is not None:
            claims = token.get("claims", {})
            if not isinstance(claims, dict):
                reader.error(token.line, f"{where}.token.claims", "must be an object of claims")
                claims = {}
            expires = token.get("expiresIn", 3600)
            if not isinstance(expires, int) or isinstance(expires, bool):
                reader.error(token.line, f"{where}.token.expiresIn", "must be seconds (negative: already expired)")
                expires = 3600
            identity = Identity(claims=_plain(claims), provider=str(token.get("provider", "")), expires_in=expires)
    result = expect.get("result")
    if result not in ("allow", "deny"):
        reader.error(expect.lines.get("result", expect.line), f"{where}.expect.result", "must be allow or deny")
        return None
    rule = expect.get("rule")
    if rule is not None and rule != "default" and (not isinstance(rule, int) or isinstance(rule, bool)):
        reader.error(expect.lines["rule"], f"{where}.expect.rule", "must be a rule index or 'default'")
        rule = None
    status = expect.get("status")
    if status is not None and not isinstance(status, int):
        reader.error(expect.lines["status"], f"{where}.expect.status", "must be an HTTP status code")
        status = None
    monitored = expect.get("monitored")
    answers: dict[int, bool] = {}
    scripted = case.get("relationships", [])
    for i, entry in enumerate(scripted if isinstance(scripted, list) else [None]):
        rel_where = f"{where}.relationships[{i}]"
        answer = reader.mapping(entry, rel_where, case.lines.get("relationships", case.line), {"rule", "exists"})
        if answer is None:
            continue
        index, exists = answer.get("rule"), answer.get("exists")
        if not isinstance(index, int) or isinstance(index, bool) or not isinstance(exists, bool):
            reader.error(answer.line, rel_where, "needs rule (an index) and exists (true or false)")
            continue
        answers[index] = exists
    return Case(
        name=name, line=case.line, request=http, identity=identity,
        expect=Expectation(
            result=result, status=status,
            code=str(expect["code"]) if "code" in expect else None, rule=rule,
            headers=reader.strings(expect.get("headers"), f"{where}.expect.headers", expect.line),
            monitored=monitored if isinstance(monitored, bool) else None,
        ),
        relationships=answers,
    )


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_suite(file: Path, policy_override: Path | None = None) -> Suite:
    """Parse a test file; raises :class:`PolicyError` (file:line: field: message) when it is invalid."""
    reader = _Reader(str(file))
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise PolicyError([Issue(str(file), 0, "", f"cannot read test file: {exc.strerror}")]) from None
    document = read_document(raw, str(file))
    root = reader.mapping(document, "<root>", 1, {"policy", "tests"})
    if root is None:
        raise PolicyError(reader.issues)
    policy = root.get("policy")
    if policy_override is not None:
        policy_file = policy_override
    elif isinstance(policy, str):
        policy_file = (file.parent / policy) if not Path(policy).is_absolute() else Path(policy)
    else:
        reader.error(root.line, "policy", "name the policy file to test (relative to this file)")
        policy_file = Path()
    tests = root.get("tests")
    cases: list[Case] = []
    if not isinstance(tests, LList) or not tests:
        reader.error(root.lines.get("tests", root.line), "tests", "must be a non-empty list of tests")
    else:
        for i, raw in enumerate(tests):
            found = _case(reader, f"tests[{i}]", tests.lines[i], raw)
            if found is not None:
                cases.append(found)
    names = [c.name for c in cases]
    for name in sorted({n for n in names if names.count(n) > 1}):
        reader.error(next(c.line for c in cases if c.name == name), "tests", f"test name {name!r} is used twice")
    if reader.issues:
        raise PolicyError(sorted(reader.issues, key=lambda i: i.line))
    return Suite(file, policy_file, tuple(cases))


# --- running ---------------------------------------------------------------


@dataclass(frozen=True)
class CaseResult:
    case: Case
    got: Explanation
    problems: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return not self.problems


async def run_suite(suite: Suite, policy: Policy, only: str = "") -> list[CaseResult]:
    """Every case (whose name matches ``only``) decided by ``policy`` and checked against its expectation."""
    pattern = re.compile(only) if only else None
    cases = [case for case in suite.cases if pattern is None or pattern.search(case.name)]
    results = []
    for case, run in zip(cases, await run_cases(policy, cases), strict=True):
        assert run.explanation is not None  # run_cases raises rather than tolerate a case that cannot run
        results.append(CaseResult(case, run.explanation, tuple(case.expect.mismatches(run.explanation))))
    return results


def report(suite: Suite, policy: Policy, results: list[CaseResult], verbose: bool = False) -> tuple[str, int]:
    """The text to print and the exit code."""
    lines = [f"{suite.file}: testing {suite.policy_file} (policy {policy.digest})"]
    for result in results:
        case = result.case
        lines.append(f"{'PASS' if result.passed else 'FAIL'}  {case.name}  ->  {result.got.summary()}")
        if not result.passed:
            lines.append(f"      {suite.file}:{case.line}")
            lines.extend(f"      {problem}" for problem in result.problems)
        if not result.passed or verbose:
            lines.extend("      " + line for line in result.got.render().splitlines())
    failed = sum(not r.passed for r in results)
    lines.append(f"{len(results) - failed} passed, {failed} failed")
    return "\n".join(lines), FAILED if failed else PASSED


AGAINST_LABELS = ("policy", "against")


async def compare_against(suite: Suite, policy: Policy, results: list[CaseResult], other: Policy) -> str:
    """The cases of ``results`` whose decision ``other`` changes, with both outcomes and traces."""
    cases = [result.case for result in results]
    before = [Run(result.got) for result in results]  # decided once: the very outcomes the tests checked
    after = await run_cases(other, cases, tolerate=True)
    changes = case_changes(suite.file, cases, before, after, rule_correspondence(policy, other))
    lines = [f"{suite.file}: against {other.source} (policy {other.digest})",
             *render_case_changes(changes, len(cases), AGAINST_LABELS)]
    return "\n".join(lines)


async def run_file(file: Path, policy_override: Path | None = None, only: str = "",
                   verbose: bool = False, against: Path | None = None) -> tuple[str, int]:
    """Load, run and report one test file; invalid input gives exit code 2 and the issues.

    ``against``: also decide every case with this policy and list the cases whose
    decision differs; the exit code still reports the expectations only.
    """
    try:
        suite = load_suite(file, policy_override)
        policy, *others = load_policies(suite.policy_file, *([against] if against is not None else []))
    except PolicyError as exc:
        return f"{file}: cannot run:\n{exc}", INVALID
    try:
        results = await run_suite(suite, policy, only)
    except CaseError as exc:  # e.g. a token for a provider the policy does not define
        return f"{file}:{exc.case.line}: test {exc.case.name!r} cannot run: {exc.reason}", INVALID
    text, code = report(suite, policy, results, verbose)
    for other in others:
        text += "\n" + await compare_against(suite, policy, results, other)
    return text, code
