"""Tokens over time and tokens with odd contents: maximum age vs the cache, odd claims, revoked keys.

Three providers share the test IdP's JWKS and are told apart by ``iss``:

* ``aged`` (the IdP's issuer): ``maxTokenAgeSeconds: 3``, no clock skew;
* ``rotating``: ``jwksRefreshSeconds: 1``;
* ``plain``: defaults.

The proxy admits ``user-`` subs only. Odd tokens are signed from raw JSON bytes
with the IdP's key (a lone surrogate, numbers no float holds, unknown ``crit``
headers): each must get a 401 or the decision its claims deserve, never a 5xx.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from extauthz.demo.idp import SigningKey
from tests.e2e.security.harness import Seen, attack, label, lenient_stack, policy, sign_raw
from tests.e2e.stack import Stack

pytestmark = pytest.mark.envoy

MAX_AGE = 3
ROTATING = "https://rotating.example.test"
PLAIN = "https://plain.example.test"
POLICY = policy(
    {"name": "orders-api", "defaultRuleEffect": "deny",
     "upstream": {"identityHeaders": {"x-auth-sub": "{{sub}}"}},
     "rules": [{"effect": "allow", "token": [{"claim": {"pattern": "^sub$"}, "value": {"pattern": "^user-"}}]}]},
    providers=[
        {"name": "aged", "issuer": "ISSUER", "jwksUri": "JWKS_URI", "audiences": ["orders-api"],
         "maxTokenAgeSeconds": MAX_AGE, "clockSkewSeconds": 0},
        {"name": "rotating", "issuer": ROTATING, "jwksUri": "JWKS_URI", "audiences": ["orders-api"],
         "jwksRefreshSeconds": 1},
        {"name": "plain", "issuer": PLAIN, "jwksUri": "JWKS_URI", "audiences": ["orders-api"]},
    ],
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with lenient_stack(tmp_path_factory.mktemp("lifetime"), POLICY) as s:
        yield s


# --- 10. maxTokenAgeSeconds against the token cache -----------------------------------------------

AGE = "10. Token age vs cache"


@dataclass
class Aging:
    tokens: dict[str, str]
    first: dict[str, Seen]
    iat: int


@pytest.fixture(scope="module")
def aging(stack: Stack) -> Aging:
    """Tokens issued a second ago, each used once now (so it is verified and cached)."""
    iat = int(time.time()) - 1
    tokens = {name: stack.idp.token(sub="user-1", iat=iat) for name in ("same path", "other path", "HEAD")}
    first = {name: attack(stack, "GET", "/v1/a", token=token) for name, token in tokens.items()}
    return Aging(tokens, first, iat)


def _past_max_age(iat: int) -> None:
    wait = iat + MAX_AGE + 1.2 - time.time()
    if wait > 0:
        time.sleep(wait)


AGED = {
    "cached, then past max age (same path)": "same path",
    "cached, then past max age (other path)": "other path",
    "cached, then past max age (HEAD)": "HEAD",
}


@pytest.mark.parametrize("variant", AGED)
def test_a_cached_token_is_refused_once_older_than_max_age(
    stack: Stack, aging: Aging, record: Any, variant: str
) -> None:
    name = AGED[variant]
    first = aging.first[name]
    _past_max_age(aging.iat)
    target = "/v1/a" if name == "same path" else "/v1/b?page=2"
    later = attack(stack, "HEAD" if name == "HEAD" else "GET", target, token=aging.tokens[name])
    record(AGE, wrongly_allowed=later.reached, leaked=later.status >= 500,
           saw=f"{first.status} then {label(later)}")
    assert first.status == 200, ("a token of age ~1 s must be accepted", first.status, first.body)
    assert later.status == 401 and not later.reached, (later.status, later.body[:200])


AGE_CLAIMS: dict[str, dict[str, Any]] = {
    "iat 60 s old": {"iat": -60},
    "iat 10 s in the future": {"iat": 10},
    "no iat": {"iat": None},
}


@pytest.mark.parametrize("variant", AGE_CLAIMS)
def test_tokens_without_an_acceptable_age_are_refused(stack: Stack, record: Any, variant: str) -> None:
    claims = dict(AGE_CLAIMS[variant])
    if claims["iat"] is not None:
        claims["iat"] += int(time.time())
    seen = attack(stack, "GET", "/v1/a", token=stack.idp.token(sub="user-1", **claims))
    record(AGE, wrongly_allowed=seen.reached, leaked=seen.status >= 500, saw=label(seen))
    assert seen.status == 401 and not seen.reached, (seen.status, seen.body[:200])


# --- 11. odd claims and headers -------------------------------------------------------------------

ODD = "11. Odd claims"


def _raw_token(key: SigningKey, header: str, claims: str, iss: str = PLAIN) -> str:
    now = int(time.time())
    head = '{"alg":"RS256","typ":"JWT","kid":"%s"%s}' % (key.kid, header)  # noqa: UP031 - raw JSON on purpose
    body = '{"iss":"%s","aud":"orders-api","iat":%d,"exp":%d%s}' % (iss, now, now + 600, claims)  # noqa: UP031
    try:
        raw = body.encode("utf-8", "surrogateescape")  # "\udcff" stands for the byte 0xFF
    except UnicodeEncodeError:
        raw = body.encode("utf-8", "surrogatepass")  # other surrogates as their (invalid) UTF-8 bytes
    return sign_raw(key, head.encode(), raw)


DEEP = '"a":' + "[" * 5000 + "]" * 5000
# (extra header members, extra claims, may the policy allow it?)
ODD_TOKENS: dict[str, tuple[str, str, bool]] = {
    "sub lone surrogate": ("", r',"sub":"\ud800"', False),
    "sub user- + lone surrogate": ("", r',"sub":"user-\udfff"', True),
    "sub user- + raw surrogate bytes": ("", ',"sub":"user-\ud800"', True),
    "sub user- + byte 0xFF": ("", ',"sub":"user-\udcff"', True),
    "claim 10**400": ("", f',"sub":"user-1","big":{10**400}', True),
    "sub 10**400": ("", f',"sub":{10**400}', False),
    "exp 10**400": ("", f',"sub":"user-1","exp":{10**400}', True),
    "exp 1e400": ("", ',"sub":"user-1","exp":1e400', True),
    "iat 10**400": ("", f',"sub":"user-1","iat":{10**400}', False),
    "nbf 1e400": ("", ',"sub":"user-1","nbf":1e400', False),
    "claim NaN": ("", ',"sub":"user-1","x":NaN', True),
    "claim nested 5000 deep": ("", ',"sub":"user-1",' + DEEP, True),
    "sub an object": ("", ',"sub":{"id":"user-1"}', False),
    "sub a list": ("", ',"sub":["user-1","admin"]', False),
    "iss a list": ("", ',"sub":"user-1","iss":["%s"]' % PLAIN, False),  # noqa: UP031
    "unknown crit": (',"crit":["exp-ext"],"exp-ext":1', ',"sub":"user-1"', False),
    "empty crit": (',"crit":[]', ',"sub":"user-1"', False),
    "crit b64 false": (',"crit":["b64"],"b64":false', ',"sub":"user-1"', False),
    "crit not a list": (',"crit":"exp-ext"', ',"sub":"user-1"', False),
}


@pytest.mark.parametrize("variant", ODD_TOKENS)
def test_odd_tokens_get_a_decision_never_a_5xx(stack: Stack, record: Any, variant: str) -> None:
    header, claims, may_allow = ODD_TOKENS[variant]
    token = _raw_token(stack.idp.keys[0], header, claims)
    seen = attack(stack, "GET", "/v1/odd", token=token)
    record(ODD, wrongly_allowed=seen.reached and not may_allow, leaked=seen.status >= 500 or bool(seen.error),
           saw=label(seen))
    assert not seen.error and seen.status < 500, (seen.status, seen.error, seen.body[:300])
    assert seen.status in ((200, 401, 403) if may_allow else (401, 403)), (seen.status, seen.body[:300])
    assert seen.reached == (seen.status == 200)
    if "crit" in variant:
        assert seen.status == 401, "a JWS with a crit header the verifier does not understand must be rejected"
    if seen.reached:
        sub = [v for k, v in seen.upstream[0]["header_list"] if k == "x-auth-sub"]
        assert all(v.isprintable() for v in sub), sub


def test_control_a_plain_raw_token_is_accepted(stack: Stack) -> None:
    seen = attack(stack, "GET", "/v1/odd", token=_raw_token(stack.idp.keys[0], "", ',"sub":"user-1"'))
    assert seen.status == 200 and json.loads(seen.body)["headers"]["x-auth-sub"] == "user-1"


# --- 12. revoked keys -----------------------------------------------------------------------------

REVOKED = "12. Revoked keys"
REVOCATION_DEADLINE = 5.0  # the provider refreshes every second


@dataclass
class Revocation:
    tokens: dict[str, str]
    before: dict[str, int]
    removed_at: float


@pytest.fixture(scope="module")
def revocation(stack: Stack) -> Revocation:
    """A second key appears at the IdP, signs tokens (some used, so cached), then disappears."""
    key = stack.idp.rotate()
    deadline = time.monotonic() + 5
    probe = stack.idp.token(sub="user-1", iss=ROTATING, key=key)
    while attack(stack, "GET", "/v1/r", token=probe).status != 200 and time.monotonic() < deadline:
        time.sleep(0.2)  # the new key is picked up by the refresh (or the unknown-kid refetch)
    tokens = {
        "cached": probe,
        "cached, other path": stack.idp.token(sub="user-2", iss=ROTATING, key=key),
        "never used": stack.idp.token(sub="user-3", iss=ROTATING, key=key),
        "never used, without kid": sign_raw(
            key, b'{"alg":"RS256","typ":"JWT"}',
            json.dumps({"iss": ROTATING, "aud": "orders-api", "sub": "user-4",
                        "iat": int(time.time()), "exp": int(time.time()) + 600}).encode()),
    }
    before = {"cached": attack(stack, "GET", "/v1/r", token=probe).status}
    before["cached, other path"] = attack(stack, "GET", "/v1/r2", token=tokens["cached, other path"]).status
    stack.idp.keys.remove(key)
    return Revocation(tokens, before, time.monotonic())


@pytest.mark.parametrize("variant", ["cached", "cached, other path", "never used", "never used, without kid"])
def test_tokens_of_a_removed_key_are_refused_within_the_refresh_interval(
    stack: Stack, revocation: Revocation, record: Any, variant: str
) -> None:
    token = revocation.tokens[variant]
    deadline = revocation.removed_at + REVOCATION_DEADLINE
    while True:
        seen = attack(stack, "GET", "/v1/r", token=token)
        if seen.status != 200 or time.monotonic() >= deadline:
            break
        time.sleep(0.25)
    record(REVOKED, wrongly_allowed=seen.status == 200, leaked=seen.status >= 500, saw=label(seen))
    assert revocation.before.get(variant, 200) == 200, "the token was accepted while its key was published"
    assert seen.status == 401, (f"still {seen.status} {REVOCATION_DEADLINE}s after the key left the JWKS",
                                seen.body[:200])
