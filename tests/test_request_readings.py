"""How a request reads to the service: paths, methods and hosts (docs/SECURITY.md).

Unit tests on the pure core plus Hypothesis properties: whatever the bytes, a
deny that holds for the decoded path holds for the raw one, an allow never
holds for a reading it does not match, and the Check's hand-off survives the
trip through metadata unchanged.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from extauthz.core.claims import Claims
from extauthz.core.handoff import Handoff
from extauthz.core.normalize import method_matches, normalize_host, override_methods, path_views
from extauthz.core.request import HttpRequest
from extauthz.core.rules import NoRelationships, evaluate
from extauthz.policy.loader import load_rule
from extauthz.policy.model import Effect, Proxy


def decide(rules: list[dict[str, Any]], method: str, target: str, default: str = "deny",
           headers: dict[str, str] | None = None) -> Effect:
    parsed = sorted((load_rule(r, i) for i, r in enumerate(rules)), key=lambda r: (r.priority, r.index))
    proxy = Proxy(name="p", providers=(), default_effect=Effect(default), rules=tuple(parsed))
    request = HttpRequest.from_target(method, target, headers=headers or {})
    return asyncio.run(evaluate(proxy, request, Claims.of({}), NoRelationships())).effect


IMPERSONATE = {"effect": "deny", "path": {"path": {"pattern": "^/v1/users/[^/]+:impersonate$"}}}
USERS = {"effect": "allow", "path": {"path": {"pattern": "^/v1/users/"}}}
PUBLIC = {"effect": "allow", "path": {"path": {"pattern": "^/v1/public/"}}}
ADMIN_ONLY_DENY = {"effect": "deny", "path": {"path": {"pattern": "^/v1/admin"}}}


@pytest.mark.parametrize("target", [
    "/v1/users/u1:impersonate", "/v1/users/u1%3Aimpersonate", "/v1/users/u1%3aimpersonate",
    "/v1/users/u1%3Aimpersonate;x=1", "/v1/users/u1%3A%69mpersonate",
])
def test_a_deny_holds_on_any_reading_of_the_path(target: str) -> None:
    assert decide([USERS, IMPERSONATE], "POST", target) is Effect.DENY


@pytest.mark.parametrize("target", [
    "/v1/public/..;/admin", "/v1/public/%2e%2e/admin", "/v1/public/..%3B/admin", "/v1/public/..\\admin",
])
def test_an_allow_must_hold_on_every_reading_of_the_path(target: str) -> None:
    assert decide([PUBLIC], "GET", target) is Effect.DENY
    assert decide([ADMIN_ONLY_DENY], "GET", target, default="allow") is Effect.DENY


def test_plain_paths_have_one_reading_and_keep_working() -> None:
    assert path_views("/v1/users/u1") == ("/v1/users/u1",)
    assert decide([USERS, IMPERSONATE], "GET", "/v1/users/u1%20smith") is Effect.ALLOW


@pytest.mark.parametrize("path", ["/v1/a%00b", "/v1/%FF", "/v1/a%0d%0ab", "/v1/%C3"])
def test_paths_without_a_single_reading_are_refused(path: str) -> None:
    assert path_views(path) is None


def test_head_and_options_read_as_get() -> None:
    deny_get = {"effect": "deny", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/orders"}}}
    for method in ("GET", "HEAD", "OPTIONS"):
        assert decide([deny_get], method, "/v1/orders", default="allow") is Effect.DENY
    assert decide([deny_get], "POST", "/v1/orders", default="allow") is Effect.ALLOW
    assert method_matches(frozenset({"GET"}), "HEAD") and not method_matches(frozenset({"HEAD"}), "GET")


@pytest.mark.parametrize("how", [
    {"headers": {"x-http-method-override": "DELETE"}}, {"headers": {"x-http-method": "delete"}},
    {"headers": {"x-method-override": "GET, DELETE"}}, {"query": "_method=DELETE"}, {"query": "_METHOD=delete"},
    {"query": "%5Fmethod=DELETE"},
])
def test_a_method_override_is_decided_as_each_method_it_names(how: dict[str, Any]) -> None:
    allow_post = {"effect": "allow", "methods": ["POST"]}
    deny_delete = {"effect": "deny", "methods": ["DELETE"]}
    target = "/v1/orders/1" + (f"?{how['query']}" if "query" in how else "")
    assert decide([allow_post, deny_delete], "POST", target, headers=how.get("headers")) is Effect.DENY
    # Allowed only when every named method is allowed.
    allow_both = {"effect": "allow", "methods": ["POST", "DELETE", "GET"]}
    assert decide([allow_both], "POST", target, headers=how.get("headers")) is Effect.ALLOW


def test_an_override_that_is_not_a_method_has_no_reading() -> None:
    assert override_methods({"x-http-method-override": "DELETE /x"}, {}) is None
    assert override_methods({}, {"_method": ["GET"]}) == ("GET",)


@pytest.mark.parametrize("raw, expected", [
    ("Admin.Example.Test", "admin.example.test"), ("admin.example.test.", "admin.example.test"),
    ("admin.example.test:8443", "admin.example.test"), ("admin.example.test.:443", "admin.example.test"),
    ("[::1]:8080", "[::1]"), ("", ""),
])
def test_hosts_compare_without_case_port_or_trailing_dot(raw: str, expected: str) -> None:
    assert normalize_host(raw) == expected


@pytest.mark.parametrize("raw", [
    "user@admin.example.test", "admin.example.test:", "admin.example.test:x", "a..b", "admin example", "[::1",
    "admin.example.test..", "a:1:2",
])
def test_ambiguous_hosts_have_no_reading(raw: str) -> None:
    assert normalize_host(raw) is None


# --- properties ------------------------------------------------------------

plain_segment = st.text(alphabet=st.sampled_from("abc:;@.-_~ 2AF!$&'()*+,="), min_size=1, max_size=8).filter(
    lambda s: s.strip(".") != "")  # "." and ".." segments are resolved before anyone matches


@settings(max_examples=300, deadline=None)
@given(st.lists(plain_segment, min_size=1, max_size=4), st.data())
def test_property_percent_encoding_never_escapes_a_deny(parts: list[str], data: st.DataObject) -> None:
    """Encode any characters of a path: a deny written for its plain spelling still holds."""
    plain = "/" + "/".join(parts)
    encoded = "/" + "/".join(
        "".join(quote(c, safe="") if data.draw(st.booleans()) else c for c in part) for part in parts
    )
    deny = {"effect": "deny", "path": {"path": {"pattern": "^" + re.escape(plain) + "$"}}}
    assert decide([deny], "GET", encoded, default="allow") is Effect.DENY


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from("abc/%2FAe;.\\:0"), max_size=16))
def test_property_an_allow_holds_only_where_every_reading_is_inside_it(tail: str) -> None:
    target = "/v1/public/" + tail
    if decide([PUBLIC], "GET", target) is Effect.ALLOW:
        views = path_views(target)
        assert views is not None and all(v.startswith("/v1/public/") for v in views)
        assert views[0] == target


@settings(max_examples=200, deadline=None)
@given(
    st.text(min_size=1, max_size=12), st.lists(st.text(max_size=12), min_size=1, max_size=3),
    st.lists(st.dictionaries(st.text(max_size=6), st.text(max_size=12), max_size=3), max_size=3),
)
def test_property_the_handoff_round_trips(proxy: str, paths: list[str], values: list[dict[str, str]]) -> None:
    handoff = Handoff("d-1", proxy, "digest", ("GET", "DELETE"), tuple(paths), "api.example", tuple(values))
    assert Handoff.from_metadata(handoff.to_metadata()) == handoff


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(["v", "proxy", "paths", "methods", "filterValues", "policy"]),
                       st.one_of(st.none(), st.integers(), st.text(max_size=4), st.lists(st.integers(), max_size=2))))
def test_property_a_malformed_handoff_is_none_never_an_error(data: dict[str, Any]) -> None:
    assert Handoff.from_metadata(data) is None
