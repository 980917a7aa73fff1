"""Paths as the service may read them: decoded once, dot segments resolved, ``;params`` cut.

Default deny. Users may act on ``/v1/users/...`` except impersonation
(``/v1/users/<id>:impersonate``), e-mail-addressed users and ``.../secrets``; anyone
may GET ``/v1/public/...``; only admins reach ``/v1/admin``. The service behind
decodes ``%3A``, ``%40``, ``%3B``, cuts ``;params`` and resolves ``..`` itself, so
each attack below names a denied resource in the service's reading and must not
reach it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.security.harness import attack, label, lenient_stack, policy
from tests.e2e.stack import Stack

pytestmark = pytest.mark.envoy

CLS = "7. Path readings"
NOT_ADMIN = [{"claim": {"pattern": "^role$"}, "value": {"pattern": "^admin$"}, "presence": "must_absent"}]
POLICY = policy({"name": "orders-api", "defaultRuleEffect": "deny", "rules": [
    {"effect": "deny", "path": {"path": {"pattern": "^/v1/users/[^/]+:impersonate$"}}, "notes": "no impersonation"},
    {"effect": "deny", "path": {"path": {"pattern": "^/v1/users/[^/]*@"}}, "token": NOT_ADMIN,
     "notes": "users addressed by e-mail are for admins"},
    {"effect": "deny", "path": {"path": {"pattern": "^/v1/users/[^/]+/secrets$"}}, "notes": "no secrets"},
    {"effect": "allow", "path": {"path": {"pattern": "^/v1/users/"}}, "notes": "users"},
    {"effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/public/"}}, "notes": "public"},
    {"effect": "allow", "path": {"path": {"pattern": "^/v1/admin"}},
     "token": [{"claim": {"pattern": "^role$"}, "value": {"pattern": "^admin$"}}], "notes": "admins"},
]})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with lenient_stack(tmp_path_factory.mktemp("paths"), POLICY) as s:
        yield s


REFUSED = (403,)
UNREADABLE = (400,)
# Envoy turns an encoded slash or backslash into a redirect to the decoded path, which then meets the rules.
REDIRECTED = (307, 400, 403)
ATTACKS: dict[str, tuple[str, tuple[int, ...]]] = {
    "impersonate plain": ("/v1/users/u1:impersonate", REFUSED),
    "impersonate %3A": ("/v1/users/u1%3Aimpersonate", REFUSED),
    "impersonate %3a": ("/v1/users/u1%3aimpersonate", REFUSED),
    "impersonate %3A;x=1": ("/v1/users/u1%3Aimpersonate;x=1", REFUSED),
    "impersonate %3A%3Bx": ("/v1/users/u1%3Aimpersonate%3Bx", REFUSED),
    "impersonate %69mpersonate": ("/v1/users/u1:%69mpersonate", REFUSED),
    "impersonate via ../": ("/v1/users/u2/..%2F..%2Fusers/u1%3Aimpersonate", REDIRECTED),
    "e-mail %40": ("/v1/users/root%40corp.example", REFUSED),
    "e-mail %40 ;x": ("/v1/users/root%40corp.example;x=1", REFUSED),
    "secrets ;v=1": ("/v1/users/u1/secrets;v=1", REFUSED),
    "secrets %3Bv=1": ("/v1/users/u1/secrets%3Bv=1", REFUSED),
    "secrets %3B": ("/v1/users/u1/secrets%3B", REFUSED),
    "secrets %73ecrets": ("/v1/users/u1/%73ecrets", REFUSED),
    "public ..;/admin": ("/v1/public/..;/admin", REFUSED),
    "public ..;x=1/admin": ("/v1/public/..;x=1/admin", REFUSED),
    "public %2e%2e;/admin": ("/v1/public/%2e%2e;/admin", REFUSED),
    "public %2e%2e/admin": ("/v1/public/%2e%2e/admin", REFUSED),
    "public .%2e/admin": ("/v1/public/.%2e/admin", REFUSED),
    "public %2E%2E%3B/admin": ("/v1/public/%2E%2E%3B/admin", REFUSED),
    "public ..%2Fadmin": ("/v1/public/..%2Fadmin", REDIRECTED),
    "public ..%5Cadmin": ("/v1/public/..%5Cadmin", REDIRECTED),
    "public x/..;/..;/admin": ("/v1/public/x/..;/..;/admin", REFUSED),
    "%00 in path": ("/v1/public/x%00", UNREADABLE),
    "%00 before ;": ("/v1/public/x%00;/../../admin", UNREADABLE),
    "%FF (not UTF-8)": ("/v1/public/x%FF", UNREADABLE),
    "overlong %C0%AE%C0%AE": ("/v1/public/%C0%AE%C0%AE/admin", UNREADABLE),
    "%0D%0A in path": ("/v1/public/x%0D%0Ax-injected:%201", UNREADABLE),
    "%7F in path": ("/v1/public/x%7F", UNREADABLE),
    "secrets/ (trailing slash)": ("/v1/users/u1/secrets/", REFUSED),
    "secrets;/ (trailing slash)": ("/v1/users/u1/secrets;/", REFUSED),
    "impersonate %3A/ (trailing slash)": ("/v1/users/u1%3Aimpersonate/", REFUSED),
}


@pytest.mark.parametrize("variant", ATTACKS)
def test_denied_readings_never_reach_the_upstream(stack: Stack, record: Any, variant: str) -> None:
    target, expected = ATTACKS[variant]
    seen = attack(stack, "GET", target, token=stack.idp.token(sub="user-1"))
    record(CLS, wrongly_allowed=seen.reached, leaked=seen.status >= 500, saw=label(seen))
    assert not seen.reached, seen.upstream
    assert seen.status in expected, (seen.status, seen.error, seen.body[:300])


@pytest.mark.parametrize("target", ["/v1/public/docs", "/v1/users/u1", "/v1/users/u1;v=2", "/v1/public/a%20b"])
def test_control_allowed_paths_pass(stack: Stack, target: str) -> None:
    seen = attack(stack, "GET", target, token=stack.idp.token(sub="user-1"))
    assert seen.status == 200 and seen.reached, (seen.status, seen.body[:200])


def test_control_admins_reach_admin_paths(stack: Stack) -> None:
    seen = attack(stack, "GET", "/v1/admin", token=stack.idp.token(sub="root", role="admin"))
    assert seen.status == 200 and seen.reached
