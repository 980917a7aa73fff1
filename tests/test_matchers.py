"""Literal patterns are matched with string operations; the answers must be RE2's, always."""

from __future__ import annotations

import re

import pytest
import re2
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.policy.matchers import Contains, Exact, Prefix, Re2Program, Suffix, literal_matcher
from extauthz.policy.patterns import Pattern, compile_regex

ALPHABET = "ab/-.$^\\é\n"


def re2_says(source: str, text: str) -> bool:
    return re2.search(source, text) is not None


# Pieces of RE2 syntax, literal ones and the ones that must fall back to RE2.
atom = st.one_of(
    st.sampled_from(["a", "b", "/", "-", "é", "\\.", "\\$", "\\^", "\\-", "\\/", "\\\\", "\\ ", "\\_"]),
    st.sampled_from([".", "a*", "b+", "[ab]", "\\d", "a{2}", "(?i)a", "\\b", "a??", "(?:a|b)"]),
)


@st.composite
def patterns(draw: st.DrawFn, depth: int = 0) -> str:
    parts: list[str] = []
    for _ in range(draw(st.integers(0, 4))):
        if depth < 2 and draw(st.booleans()):
            branches = draw(st.lists(patterns(depth + 1), min_size=1, max_size=3))
            group = draw(st.sampled_from(["(", "(?:"])) + "|".join(branches) + ")"
            parts.append(group + draw(st.sampled_from(["", "?"])))
        else:
            parts.append(draw(atom) + draw(st.sampled_from(["", "", "?"])))
    body = "".join(parts)
    if depth == 0 and draw(st.booleans()):
        body = body + "|" + "".join(draw(st.lists(atom, max_size=2)))
    prefix = draw(st.sampled_from(["", "^"])) if depth == 0 else ""
    suffix = draw(st.sampled_from(["", "$"])) if depth == 0 else ""
    return prefix + body + suffix


@settings(max_examples=1200, deadline=None)
@given(patterns(), st.lists(st.text(ALPHABET, max_size=8), min_size=1, max_size=6))
def test_every_compiled_pattern_answers_as_re2_does(source: str, texts: list[str]) -> None:
    try:
        re2.compile(source)
    except re2.error:
        return
    matcher = compile_regex(source)
    for text in [*texts, source.strip("^$").replace("\\", "")]:
        assert matcher.matches(text) == re2_says(source, text), (source, text, type(matcher).__name__)


@pytest.mark.parametrize(("source", "kind"), [
    ("^sub$", Exact),
    ("^/v1/(products|orders)/?", Prefix),
    ("^/v1/users/", Prefix),
    ("\\.json$", Suffix),
    ("admin", Contains),
    ("^(?:a|b)(c|d)?$", Exact),
    ("^/v1/.*", Re2Program),
    ("^a|b", Re2Program),
    ("^[0-9]+$", Re2Program),
    ("(?i)^admin$", Re2Program),
])
def test_literal_patterns_skip_re2_and_the_rest_keep_it(source: str, kind: type) -> None:
    assert type(compile_regex(source)) is kind


def test_dollar_means_the_end_of_the_text_as_in_re2() -> None:
    matcher = compile_regex("^/admin$")
    assert not matcher.matches("/admin\n")  # Python's re would say yes here
    assert re.search("^/admin$", "/admin\n") is not None and not re2_says("^/admin$", "/admin\n")


def test_a_huge_alternation_is_left_to_re2() -> None:
    source = "^(" + "|".join(f"p{i}" for i in range(100)) + ")$"
    assert literal_matcher(source) is None
    assert compile_regex(source).matches("p42")


def test_re2_programs_answer_through_the_public_api_when_the_wrapper_changes() -> None:
    compiled = re2.compile("^/v1/[a-z]+/é")
    direct, public = Re2Program(compiled), Re2Program(compiled)
    public._match = None  # what a wrapper without the compiled program gives
    for text in ("/v1/abc/é", "/v1/ABC/é", "x/v1/abc/é", "/v1/é/é"):
        assert direct.matches(text) == public.matches(text) == re2_says("^/v1/[a-z]+/é", text)


def test_interpolated_values_are_literals_whatever_they_hold() -> None:
    pattern = Pattern.parse("^/v1/tenants/{{t}}/")
    for value in (".*", "a|b", "(x)", "é$", "a\\b", "[0-9]"):
        bound = pattern.bind({"t": value})
        assert bound is not None and isinstance(bound, Prefix)
        assert bound.matches(f"/v1/tenants/{value}/orders")
        assert not bound.matches("/v1/tenants/other/orders")


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text("ab", max_size=2),
    lambda children: st.lists(children, max_size=2) | st.dictionaries(st.text("ab.", max_size=3), children, max_size=3),
    max_leaves=8,
)


@settings(max_examples=400, deadline=None)
@given(st.dictionaries(st.text("ab.", max_size=3), json_values, max_size=4), st.text("ab.", max_size=5))
def test_a_claim_named_exactly_is_found_as_the_flattened_scan_finds_it(payload: dict[str, object], name: str) -> None:
    from extauthz.core.claims import Claims

    claims = Claims.of(payload)
    assert sorted(claims.named(name), key=repr) == sorted((e for e in claims.flat if e[0] == name), key=repr)


@st.composite
def templates(draw: st.DrawFn) -> str:
    """A pattern from the same pieces with ``{{x}}``/``{{y}}`` among them, a quantifier sometimes right after."""
    source = draw(patterns())
    pieces = [source[:i] for i in range(len(source) + 1)]
    cut = len(draw(st.sampled_from(pieces)))
    variable = draw(st.sampled_from(["{{x}}", "{{y}}", "{{x}}?", "({{x}}|a)", "{{x}}{{y}}"]))
    return source[:cut] + variable + source[cut:]


# Values may hold the private-use characters the literal templates are read with: they must stay plain text.
MARKERS = "\ue000\ue001\ue100\ue101"


@settings(max_examples=1500, deadline=None)
@given(templates(), st.text(ALPHABET + "*(|)[" + MARKERS, max_size=5), st.text(ALPHABET + MARKERS, max_size=3),
       st.lists(st.text(ALPHABET, max_size=10), min_size=1, max_size=6))
def test_a_bound_placeholder_pattern_answers_as_re2_does_on_the_escaped_source(
        source: str, x: str, y: str, texts: list[str]) -> None:
    """Bound without RE2 or the cache where only the values are not literal: RE2's answers all the same."""
    try:
        pattern = Pattern.parse(source)
    except ValueError:
        return
    filled = source.replace("{{x}}", re.escape(x)).replace("{{y}}", re.escape(y))
    try:
        re2.compile(filled)
    except re2.error:
        return  # an empty value before a quantifier: nothing to compare with
    matcher = pattern.bind({"x": x, "y": y})
    assert matcher is not None
    for text in [*texts, x, y, x + y, "/" + x + "/", filled.strip("^$").replace("\\", "")]:
        assert matcher.matches(text) == re2_says(filled, text), (source, x, y, text, type(matcher).__name__)

