"""The token layer against tokens over time and hostile contents, with keys served over HTTP.

Maximum age against the verified-token cache, tokens no JSON encoder would
write (each must end in a :class:`TokenError`, never another exception), and
keys that leave the IdP's JWKS (tokens they verified leave the cache with them).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import httpx
import jwt
import pytest

from extauthz.core.authorizer import Authorizer
from extauthz.core.claims import Claims
from extauthz.core.identity import TokenError
from extauthz.core.request import HttpRequest
from extauthz.demo.idp import IdentityProvider, SigningKey
from extauthz.identity import jwks as jwks_module
from extauthz.identity.verifier import TokenCache, Verifier
from extauthz.policy.loader import parse_policy
from extauthz.policy.model import Policy

T = TypeVar("T")


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    with IdentityProvider() as provider:
        yield provider


def policy_for(idp: IdentityProvider, extra: str = "") -> Policy:
    text = (
        f"providers:\n  - name: idp\n    issuer: {idp.issuer}\n    audiences: [orders-api]\n"
        f"    jwksUri: {idp.jwks_uri}\n{extra}proxies:\n  - name: api\n"
    )
    return parse_policy(text)


def run(policy: Policy, body: Callable[[Verifier], Awaitable[T]], cache: TokenCache | None = None,
        clock: Callable[[], float] = time.time) -> T:
    async def main() -> T:
        async with httpx.AsyncClient() as client:
            verifier = Verifier(policy.providers, client, cache or TokenCache(100, 300, clock), clock=clock)
            await verifier.start()
            try:
                return await body(verifier)
            finally:
                await verifier.close()

    return asyncio.run(main())


def sign_raw(key: SigningKey, header: bytes, payload: bytes) -> str:
    return key.sign_bytes(header, payload)


def raw_token(idp: IdentityProvider, header: str = "", claims: str = ',"sub":"user-1"') -> str:
    """A token from raw JSON text; ``header`` and ``claims`` are appended members (leading comma)."""
    now = int(time.time())
    key = idp.keys[0]
    head = '{"alg":"RS256","typ":"JWT","kid":"%s"%s}' % (key.kid, header)  # noqa: UP031 - raw JSON on purpose
    body = '{"iss":"%s","aud":"orders-api","iat":%d,"exp":%d%s}' % (idp.issuer, now, now + 600, claims)  # noqa: UP031
    return sign_raw(key, head.encode(), body.encode("utf-8", "surrogatepass"))


def outcome(idp: IdentityProvider, token: str, extra: str = "") -> Claims | TokenError:
    """The verifier's answer to a token, twice (the second may come from the cache): claims or a TokenError."""

    async def body(v: Verifier) -> Claims | TokenError:
        answers: list[Claims | TokenError] = []
        for _ in range(2):
            try:
                answers.append(await v.verify(token, ["idp"]))
            except TokenError as error:
                answers.append(error)
        first, second = answers
        assert type(first) is type(second), answers
        return first

    return run(policy_for(idp, extra), body)


def refusal(idp: IdentityProvider, token: str, extra: str = "") -> TokenError:
    answer = outcome(idp, token, extra)
    assert isinstance(answer, TokenError), answer
    assert answer.status == 401 and answer.rfc6750_error == "invalid_token"
    answer.reason.encode("utf-8")  # the reason reaches logs and headers
    return answer


# --- maxTokenAgeSeconds against the cache ---------------------------------------------------------

AGED = "    maxTokenAgeSeconds: 3\n    clockSkewSeconds: 0\n"


def test_a_cached_token_is_refused_once_older_than_max_age(idp: IdentityProvider) -> None:
    now = [time.time()]
    cache = TokenCache(100, 300, lambda: now[0])
    token = idp.token(sub="user-1", iat=int(now[0]) - 1)

    async def body(v: Verifier) -> tuple[str | None, str, str]:
        first = (await v.verify(token, ["idp"])).sub
        now[0] += 4  # the token is now ~5 s old, past the 3 s limit
        with pytest.raises(TokenError) as cached:
            await v.verify(token, ["idp"])
        with pytest.raises(TokenError) as uncached:
            await v.verify(idp.token(sub="user-2", iat=int(now[0]) - 5), ["idp"])
        return first, cached.value.code, uncached.value.code

    assert run(policy_for(idp, AGED), body, cache, lambda: now[0]) == ("user-1", "token_too_old", "token_too_old")


def test_a_cached_token_within_max_age_is_served_from_the_cache(idp: IdentityProvider) -> None:
    now = [time.time()]
    cache = TokenCache(100, 300, lambda: now[0])
    token = idp.token(sub="user-1", iat=int(now[0]) - 1)

    async def body(v: Verifier) -> int:
        await v.verify(token, ["idp"])
        now[0] += 1
        await v.verify(token, ["idp"])
        return cache.hits

    assert run(policy_for(idp, AGED), body, cache, lambda: now[0]) == 1


def test_the_cache_entry_ends_at_iat_plus_max_age_plus_skew(idp: IdentityProvider) -> None:
    now = [float(int(time.time()))]
    cache = TokenCache(100, 300, lambda: now[0])
    iat = int(now[0]) - 1
    token = idp.token(sub="user-1", iat=iat)

    async def body(v: Verifier) -> tuple[bool, bool]:
        await v.verify(token, ["idp"])
        now[0] = iat + 3 + 2 - 0.01  # maxTokenAgeSeconds 3, clockSkewSeconds 2
        still = cache.get(TokenCache.key(token)) is not None
        now[0] = iat + 3 + 2 + 0.01
        return still, cache.get(TokenCache.key(token)) is not None

    extra = "    maxTokenAgeSeconds: 3\n    clockSkewSeconds: 2\n"
    assert run(policy_for(idp, extra), body, cache, lambda: now[0]) == (True, False)


def test_a_cached_token_only_serves_proxies_trusting_its_provider() -> None:
    with IdentityProvider() as a, IdentityProvider() as b:
        policy = parse_policy(f"""
providers:
  - {{name: a, issuer: {a.issuer}, audiences: [orders-api], jwksUri: {a.jwks_uri}}}
  - {{name: b, issuer: {b.issuer}, audiences: [orders-api], jwksUri: {b.jwks_uri}}}
proxies: [{{name: p}}]
""")
        token = a.token(sub="from-a")

        async def body(v: Verifier) -> str:
            await v.verify(token, ["a"])
            with pytest.raises(TokenError) as info:
                await v.verify(token, ["b"])
            return info.value.code

        assert run(policy, body) == "token_wrong_issuer"


# --- tokens with hostile contents ------------------------------------------------------------------


def test_unknown_crit_header_is_refused(idp: IdentityProvider) -> None:
    token = jwt.encode({"iss": idp.issuer, "aud": "orders-api", "exp": int(time.time()) + 60, "sub": "u"},
                       idp.keys[0].private, algorithm="RS256",
                       headers={"kid": idp.keys[0].kid, "crit": ["foo"], "foo": 1})
    assert refusal(idp, token).code == "token_invalid"


@pytest.mark.parametrize("header", [
    ',"crit":[]',
    ',"crit":"exp"',
    ',"crit":[1]',
    ',"crit":["exp"]',
    ',"crit":["b64"],"b64":false',
    ',"crit":["b64"],"b64":true',
    ',"crit":["\\ud800"],"\\ud800":1',
])
def test_every_crit_header_is_refused(idp: IdentityProvider, header: str) -> None:
    assert refusal(idp, raw_token(idp, header)).code in ("token_invalid", "token_malformed")


def test_a_kid_that_is_not_a_string_is_refused(idp: IdentityProvider) -> None:
    token = sign_raw(idp.keys[0], b'{"alg":"RS256","kid":5}', json.dumps(
        {"iss": idp.issuer, "aud": "orders-api", "exp": int(time.time()) + 60}).encode())
    assert refusal(idp, token).code in ("token_invalid", "token_malformed")


@pytest.mark.parametrize("claims", [
    r',"sub":"\ud800"',
    r',"sub":"user-\udfff"',
    r',"sub":"user-1","groups":["a",{"b":"\udc00x"}]',
    r',"sub":"user-1","\ud83d":1',
])
def test_a_lone_surrogate_in_the_payload_is_malformed(idp: IdentityProvider, claims: str) -> None:
    error = refusal(idp, raw_token(idp, claims=claims))
    assert error.code == "token_malformed"
    assert "surrogate" in error.reason


def test_a_lone_surrogate_in_the_header_is_malformed(idp: IdentityProvider) -> None:
    error = refusal(idp, raw_token(idp, header=r',"x":"\ud800"'))
    assert error.code == "token_malformed"
    assert "surrogate" in error.reason


def test_a_surrogate_pair_is_a_character_not_a_lone_surrogate(idp: IdentityProvider) -> None:
    answer = outcome(idp, raw_token(idp, claims=r',"sub":"user-\ud83d\ude00"'))
    assert isinstance(answer, Claims) and answer.sub == "user-\U0001f600"


def test_raw_surrogate_bytes_and_invalid_utf8_are_malformed(idp: IdentityProvider) -> None:
    assert refusal(idp, raw_token(idp, claims=',"sub":"user-\ud800"')).code == "token_malformed"
    now = int(time.time())
    payload = b'{"iss":"%s","aud":"orders-api","exp":%d,"sub":"user-\xff"}' % (idp.issuer.encode(), now + 60)
    assert refusal(idp, sign_raw(idp.keys[0], b'{"alg":"RS256"}', payload)).code == "token_malformed"


def test_a_huge_integer_in_a_plain_claim_does_not_break_the_verifier(idp: IdentityProvider) -> None:
    answer = outcome(idp, raw_token(idp, claims=f',"sub":"user-1","big":{10**400},"n":[{-(10**400)}]'))
    assert isinstance(answer, Claims)
    assert answer.payload["big"] == 10**400 and answer.lookup("big") == str(10**400)


def test_a_huge_exp_is_accepted_and_cached(idp: IdentityProvider) -> None:
    token = raw_token(idp, claims=f',"sub":"user-1","exp":{10**400}')

    async def body(v: Verifier) -> tuple[str | None, str | None, int]:
        first = (await v.verify(token, ["idp"])).sub
        second = (await v.verify(token, ["idp"])).sub
        return first, second, v.cache.hits

    assert run(policy_for(idp), body) == ("user-1", "user-1", 1)


@pytest.mark.parametrize(("claims", "extra"), [
    (f',"sub":"user-1","iat":{10**400}', ""),
    (f',"sub":"user-1","iat":{-(10**400)}', AGED),
    (f',"sub":"user-1","nbf":{10**400}', ""),
    (f',"sub":{10**400}', ""),
    (',"sub":"user-1","exp":1e400', ""),
    (',"sub":"user-1","exp":-1e400', ""),
    (',"sub":"user-1","nbf":1e400', ""),
    (',"sub":"user-1","iat":NaN', AGED),
    (',"sub":"user-1","exp":Infinity', ""),
    (',"sub":"user-1","x":NaN', ""),
    (',"sub":"user-1","x":-Infinity', ""),
    (',"sub":"user-1","x":1' + "0" * 5000, ""),
    (',"sub":"user-1","a":' + "[" * 5000 + "]" * 5000, ""),
    (',"sub":{"id":"user-1"}', ""),
    (',"sub":"user-1","jti":5', ""),
    (',"sub":"user-1","aud":{"x":1}', ""),
])
def test_odd_numbers_and_shapes_are_refused(idp: IdentityProvider, claims: str, extra: str) -> None:
    refusal(idp, raw_token(idp, claims=claims), extra)


@pytest.mark.parametrize("opening", ["[", '{"a":'])
def test_nesting_up_to_and_past_the_parser_limit_gets_claims_or_a_token_error(
    idp: IdentityProvider, opening: str
) -> None:
    closing = "]" if opening == "[" else "1}"

    async def body(v: Verifier) -> set[str]:
        seen = set()
        for depth in range(900, 1100, 10):
            nested = opening * depth + closing[:-1] + closing[-1] * depth
            try:
                await v.verify(raw_token(idp, claims=f',"sub":"user-1","a":{nested}'), ["idp"])
                seen.add("claims")
            except TokenError as error:
                assert error.status == 401
                seen.add(error.code)
        return seen

    assert "token_malformed" in run(policy_for(idp), body)


class FailingCache(TokenCache):
    """A cache that fails on lookup: stands for any failure no check anticipated."""

    def get(self, key: bytes) -> Claims | None:
        raise RecursionError("maximum recursion depth exceeded")


def test_an_unanticipated_failure_on_a_token_is_a_401_not_an_exception(idp: IdentityProvider) -> None:
    async def body(v: Verifier) -> tuple[str, int]:
        with pytest.raises(TokenError) as info:
            await v.verify(idp.token(sub="user-1"), ["idp"])
        return info.value.code, info.value.status

    assert run(policy_for(idp), body, FailingCache(10, 60)) == ("token_invalid", 401)


def test_a_json_array_payload_is_malformed(idp: IdentityProvider) -> None:
    assert refusal(idp, sign_raw(idp.keys[0], b'{"alg":"RS256"}', b'[{"iss":1}]')).code == "token_malformed"


def test_a_payload_that_is_not_json_is_malformed(idp: IdentityProvider) -> None:
    assert refusal(idp, sign_raw(idp.keys[0], b'{"alg":"RS256"}', b"hello")).code == "token_malformed"


@pytest.mark.parametrize("header", [b'["RS256"]', b'"RS256"', b"RS256", b"null", b""])
def test_a_header_that_is_not_an_object_is_malformed(idp: IdentityProvider, header: bytes) -> None:
    token = sign_raw(idp.keys[0], header, json.dumps({"iss": idp.issuer}).encode())
    assert refusal(idp, token).code == "token_malformed"


@pytest.mark.parametrize("token", ["a.b", "a.b.c.d", "é.é.é", "\ud800.x.y", "..", "a\x00.b.c", " " * 3])
def test_text_that_is_no_compact_jws_is_malformed(idp: IdentityProvider, token: str) -> None:
    assert refusal(idp, token).code == "token_malformed"


def test_a_plain_raw_token_is_accepted(idp: IdentityProvider) -> None:
    answer = outcome(idp, raw_token(idp))
    assert isinstance(answer, Claims) and answer.sub == "user-1"


def test_odd_tokens_end_in_a_401_challenge_at_the_authorizer(idp: IdentityProvider) -> None:
    crit = jwt.encode({"iss": idp.issuer, "aud": "orders-api", "exp": int(time.time()) + 60, "sub": "u"},
                      idp.keys[0].private, algorithm="RS256",
                      headers={"kid": idp.keys[0].kid, "crit": ["foo"], "foo": 1})
    surrogate = raw_token(idp, claims=r',"sub":"\ud800"')
    big = raw_token(idp, claims=f',"sub":"user-1","big":{10**400}')
    policy = parse_policy(
        f"providers:\n  - name: idp\n    issuer: {idp.issuer}\n    audiences: [orders-api]\n"
        f"    jwksUri: {idp.jwks_uri}\nproxies:\n  - name: api\n    rules: [{{effect: allow}}]\n"
    )

    async def body(v: Verifier) -> list[tuple[int, str, str]]:
        authorizer = Authorizer(policy, v)
        answers = []
        for token in (crit, surrogate, big):
            request = HttpRequest.from_target("GET", "/orders", headers={"authorization": f"Bearer {token}"})
            decision = await authorizer.check(request)
            answers.append((decision.status, decision.code, decision.www_authenticate))
        return answers

    challenge = 'Bearer realm="extauthz", error="invalid_token"'
    assert run(policy, body) == [(401, "invalid_token", challenge), (401, "invalid_token", challenge),
                                 (200, "allowed", "")]


# --- keys that leave the JWKS ----------------------------------------------------------------------


def test_a_removed_key_takes_its_cached_tokens_with_it(idp: IdentityProvider) -> None:
    idp.rotate()  # the JWKS keeps a key once the first one is gone
    revoked = idp.keys[0]
    token = idp.token(sub="user-1", key=revoked)

    async def body(v: Verifier) -> tuple[int, bool, str]:
        await v.verify(token, ["idp"])
        await v.verify(token, ["idp"])
        hits = v.cache.hits
        idp.keys.remove(revoked)
        assert await v.keysets["idp"].refresh()
        purged = v.cache.get(TokenCache.key(token)) is None
        with pytest.raises(TokenError) as info:
            await v.verify(token, ["idp"])
        return hits, purged, info.value.code

    assert run(policy_for(idp), body) == (1, True, "token_unknown_key")


def test_a_refresh_that_keeps_the_key_keeps_the_cache(idp: IdentityProvider) -> None:
    token = idp.token(sub="user-1")

    async def body(v: Verifier) -> int:
        await v.verify(token, ["idp"])
        idp.rotate()
        assert await v.keysets["idp"].refresh()
        await v.verify(token, ["idp"])
        return v.cache.hits

    assert run(policy_for(idp), body) == 1


def test_an_unknown_kid_refetch_that_drops_a_key_purges_its_tokens(idp: IdentityProvider) -> None:
    revoked = idp.keys[0]
    token = idp.token(sub="user-1")

    async def body(v: Verifier) -> tuple[str | None, str]:
        await v.verify(token, ["idp"])
        idp.keys = [SigningKey()]  # the IdP rotated: the old key is gone, a new one signs
        newer = (await v.verify(idp.token(sub="user-2", key=idp.keys[0]), ["idp"])).sub
        with pytest.raises(TokenError) as info:
            await v.verify(token, ["idp"])
        assert revoked not in idp.keys
        return newer, info.value.code

    assert run(policy_for(idp), body) == ("user-2", "token_unknown_key")


def test_the_background_refresh_revokes_within_jwks_refresh_seconds(idp: IdentityProvider) -> None:
    idp.rotate()
    revoked = idp.keys[0]
    token = idp.token(sub="user-1", key=revoked)

    async def body(v: Verifier) -> tuple[str, float]:
        await v.verify(token, ["idp"])
        idp.keys.remove(revoked)
        removed_at = time.monotonic()
        while time.monotonic() - removed_at < 5:
            try:
                await v.verify(token, ["idp"])
            except TokenError as error:
                return error.code, time.monotonic() - removed_at
            await asyncio.sleep(0.1)
        return "still accepted", time.monotonic() - removed_at

    code, after = run(policy_for(idp, "    jwksRefreshSeconds: 1\n"), body)
    assert code == "token_unknown_key" and after < 2.5, (code, after)


def test_a_removed_key_without_kid_takes_its_cached_tokens_with_it(idp: IdentityProvider) -> None:
    revoked = idp.keys[0]
    del revoked.jwk["kid"]
    other = SigningKey("ES256")  # another type, so the kid-less RS256 token has exactly one candidate key
    idp.keys.append(other)
    claims = {"iss": idp.issuer, "aud": "orders-api", "exp": int(time.time()) + 600, "sub": "user-1"}
    token = jwt.encode(claims, revoked.private, algorithm="RS256")

    async def body(v: Verifier) -> tuple[str | None, bool, str]:
        first = (await v.verify(token, ["idp"])).sub
        idp.keys = [other]
        assert await v.keysets["idp"].refresh()
        purged = v.cache.get(TokenCache.key(token)) is None
        with pytest.raises(TokenError) as info:
            await v.verify(token, ["idp"])
        return first, purged, info.value.code

    assert run(policy_for(idp), body) == ("user-1", True, "token_unknown_key")


def test_a_kid_republished_with_other_key_material_purges_its_tokens(idp: IdentityProvider) -> None:
    old = idp.keys[0]
    token = idp.token(sub="user-1")

    async def body(v: Verifier) -> tuple[bool, str]:
        await v.verify(token, ["idp"])
        idp.keys = [SigningKey(kid=old.kid)]
        assert await v.keysets["idp"].refresh()
        purged = v.cache.get(TokenCache.key(token)) is None
        with pytest.raises(TokenError) as info:
            await v.verify(token, ["idp"])
        return purged, info.value.code

    assert run(policy_for(idp), body) == (True, "token_bad_signature")


def test_a_purge_touches_only_the_provider_whose_key_left() -> None:
    with IdentityProvider() as a, IdentityProvider() as b:
        a.rotate()
        policy = parse_policy(f"""
providers:
  - {{name: a, issuer: {a.issuer}, audiences: [orders-api], jwksUri: {a.jwks_uri}}}
  - {{name: b, issuer: {b.issuer}, audiences: [orders-api], jwksUri: {b.jwks_uri}}}
proxies: [{{name: p}}]
""")
        from_a, from_b = a.token(sub="a"), b.token(sub="b")

        async def body(v: Verifier) -> tuple[bool, bool]:
            await v.verify(from_a, ["a", "b"])
            await v.verify(from_b, ["a", "b"])
            del a.keys[0]
            assert await v.keysets["a"].refresh()
            return (v.cache.get(TokenCache.key(from_a)) is None,
                    v.cache.get(TokenCache.key(from_b)) is not None)

        assert run(policy, body) == (True, True)


def test_a_failed_refresh_keeps_keys_and_cache(idp: IdentityProvider) -> None:
    token = idp.token(sub="user-1")

    async def body(v: Verifier) -> int:
        await v.verify(token, ["idp"])
        idp.down = True
        assert not await v.keysets["idp"].refresh()
        await v.verify(token, ["idp"])
        return v.cache.hits

    assert run(policy_for(idp), body) == 1


def test_revocation_is_bounded_to_about_a_minute_by_default(idp: IdentityProvider) -> None:
    policy = policy_for(idp)
    assert policy.providers["idp"].jwks_refresh_seconds == 60
    assert policy.server.token_cache_ttl_seconds == 60
    assert jwks_module.UNKNOWN_KID_REFETCH_SECONDS <= 60
