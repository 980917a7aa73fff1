"""Token verification (docs/policy.md, providers) against a real IdP serving JWKS over HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization

from extauthz.core.identity import TokenError
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


def policy_for(idp: IdentityProvider, provider_yaml: str = "    jwksUri: JWKS_URI\n",
               base_dir: Path | None = None) -> Policy:
    text = (
        "providers:\n  - name: idp\n    issuer: ISSUER\n    audiences: [orders-api]\n"
        + provider_yaml
        + "proxies:\n  - name: api\n"
    )
    return parse_policy(text.replace("JWKS_URI", idp.jwks_uri).replace("ISSUER", idp.issuer), base_dir=base_dir)


def run_with_verifier(policy: Policy, body: Callable[[Verifier], Awaitable[T]],
                      cache: TokenCache | None = None) -> T:
    async def main() -> T:
        async with httpx.AsyncClient() as client:
            verifier = Verifier(policy.providers, client, cache or TokenCache(100, 300))
            await verifier.start()
            try:
                return await body(verifier)
            finally:
                await verifier.close()

    return asyncio.run(main())


def verify(idp: IdentityProvider, token: str, provider_yaml: str = "    jwksUri: JWKS_URI\n",
           base_dir: Path | None = None) -> dict[str, Any]:
    policy = policy_for(idp, provider_yaml, base_dir)

    async def body(v: Verifier) -> dict[str, Any]:
        return dict((await v.verify(token, ["idp"])).payload)

    return run_with_verifier(policy, body)


def refused(idp: IdentityProvider, token: str, provider_yaml: str = "    jwksUri: JWKS_URI\n") -> TokenError:
    with pytest.raises(TokenError) as info:
        verify(idp, token, provider_yaml)
    return info.value


def test_valid_token_from_jwks_uri(idp: IdentityProvider) -> None:
    assert verify(idp, idp.token(sub="user-1"))["sub"] == "user-1"


def test_keys_from_oidc_discovery(idp: IdentityProvider) -> None:
    assert verify(idp, idp.token(sub="u"), "    discovery: true\n")["sub"] == "u"


def test_keys_from_file_and_inline(idp: IdentityProvider, tmp_path: Path) -> None:
    (tmp_path / "jwks.json").write_text(json.dumps(idp.jwks()))
    assert verify(idp, idp.token(sub="f"), "    jwksFile: jwks.json\n", base_dir=tmp_path)["sub"] == "f"
    inline = f"    jwks: {json.dumps(idp.jwks())}\n"
    assert verify(idp, idp.token(sub="i"), inline)["sub"] == "i"


def test_es256_and_ps256(idp: IdentityProvider) -> None:
    ec_key = SigningKey("ES256")
    idp.keys.append(ec_key)
    assert verify(idp, idp.token(sub="e", key=ec_key))["sub"] == "e"
    rsa = SigningKey("PS256")
    idp.keys.append(rsa)
    config = "    jwksUri: JWKS_URI\n    algorithms: [PS256]\n"
    assert verify(idp, idp.token(sub="p", key=rsa), config)["sub"] == "p"


def test_algorithm_outside_the_allowed_list(idp: IdentityProvider) -> None:
    ec_key = SigningKey("ES256")
    idp.keys.append(ec_key)
    assert refused(idp, idp.token(key=ec_key), "    jwksUri: JWKS_URI\n    algorithms: [RS256]\n").code == \
        "token_bad_algorithm"


def test_alg_none_is_refused(idp: IdentityProvider) -> None:
    token = jwt.encode({"iss": idp.issuer, "aud": "orders-api", "exp": time.time() + 60}, None, algorithm="none")
    assert refused(idp, token).code == "token_bad_algorithm"


def test_hmac_confusion_with_the_public_key_is_refused(idp: IdentityProvider) -> None:
    pem = idp.keys[0].private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    header = base64.urlsafe_b64encode(json.dumps({"alg": "HS256", "kid": idp.keys[0].kid}).encode()).rstrip(b"=")
    payload = base64.urlsafe_b64encode(json.dumps(
        {"iss": idp.issuer, "aud": "orders-api", "exp": int(time.time()) + 60}).encode()).rstrip(b"=")
    import hashlib
    import hmac
    sig = base64.urlsafe_b64encode(hmac.new(pem, header + b"." + payload, hashlib.sha256).digest()).rstrip(b"=")
    token = b".".join([header, payload, sig]).decode()
    assert refused(idp, token).code == "token_bad_algorithm"
    assert refused(idp, token, "    jwksUri: JWKS_URI\n    algorithms: [RS256, ES256]\n").code == "token_bad_algorithm"


def test_expired_token(idp: IdentityProvider) -> None:
    assert refused(idp, idp.token(ttl=-120)).code == "token_expired"


def test_clock_skew_tolerates_just_expired_tokens(idp: IdentityProvider) -> None:
    token = idp.token(ttl=-10, sub="s")
    assert verify(idp, token, "    jwksUri: JWKS_URI\n    clockSkewSeconds: 30\n")["sub"] == "s"
    assert refused(idp, token, "    jwksUri: JWKS_URI\n    clockSkewSeconds: 0\n").code == "token_expired"


def test_not_yet_valid_and_issued_in_the_future(idp: IdentityProvider) -> None:
    assert refused(idp, idp.token(nbf=int(time.time()) + 600)).code == "token_not_yet_valid"
    assert refused(idp, idp.token(iat=int(time.time()) + 600)).code == "token_not_yet_valid"


def test_exp_is_required_by_default(idp: IdentityProvider) -> None:
    token = idp.keys[0].sign({"iss": idp.issuer, "aud": "orders-api", "sub": "x"})
    assert refused(idp, token).code == "token_missing_claim"
    assert verify(idp, token, "    jwksUri: JWKS_URI\n    requireExp: false\n")["sub"] == "x"


def test_wrong_audience_and_untrusted_issuer(idp: IdentityProvider) -> None:
    assert refused(idp, idp.token(audience="billing-api")).code == "token_wrong_audience"
    assert refused(idp, idp.token(iss="https://evil.example")).code == "token_wrong_issuer"


def test_tampered_payload_fails_the_signature(idp: IdentityProvider) -> None:
    head, _, sig = idp.token(sub="user-1").split(".")
    forged = base64.urlsafe_b64encode(json.dumps(
        {"iss": idp.issuer, "aud": "orders-api", "exp": int(time.time()) + 60, "sub": "admin"}
    ).encode()).rstrip(b"=").decode()
    assert refused(idp, f"{head}.{forged}.{sig}").code == "token_bad_signature"


def test_garbage_is_malformed(idp: IdentityProvider) -> None:
    assert refused(idp, "not-a-jwt").code == "token_malformed"


@pytest.mark.parametrize("hint", ["jku", "x5u", "jwk", "x5c"])
def test_header_hints_never_supply_keys(idp: IdentityProvider, hint: str) -> None:
    attacker = SigningKey()
    with IdentityProvider() as evil:
        evil.keys = [attacker]
        value: Any = {"jku": evil.jwks_uri, "x5u": evil.jwks_uri, "jwk": attacker.jwk, "x5c": ["MIIB"]}[hint]
        token = attacker.sign({"iss": idp.issuer, "aud": "orders-api", "exp": int(time.time()) + 60},
                              {hint: value})
        assert refused(idp, token).code == "token_unknown_key"
        assert evil.jwks_requests == 0


def test_hs256_with_a_secret_file(idp: IdentityProvider, tmp_path: Path) -> None:
    secret = b"s" * 40
    (tmp_path / "secret").write_bytes(secret)
    token = jwt.encode({"iss": idp.issuer, "aud": "orders-api", "exp": int(time.time()) + 60, "sub": "h"},
                       secret, algorithm="HS256")
    config = "    algorithms: [HS256]\n    hmacSecretFile: secret\n"
    assert verify(idp, token, config, base_dir=tmp_path)["sub"] == "h"
    wrong = jwt.encode({"iss": idp.issuer, "aud": "orders-api", "exp": int(time.time()) + 60},
                       b"w" * 40, algorithm="HS256")
    with pytest.raises(TokenError) as info:
        verify(idp, wrong, config, base_dir=tmp_path)
    assert info.value.code == "token_bad_signature"


def test_rotation_new_kid_is_fetched_without_restart(idp: IdentityProvider) -> None:
    policy = policy_for(idp)

    async def body(v: Verifier) -> str | None:
        assert (await v.verify(idp.token(sub="old"), ["idp"])).sub == "old"
        new_key = idp.rotate()
        return (await v.verify(idp.token(sub="new", key=new_key), ["idp"])).sub

    assert run_with_verifier(policy, body) == "new"


def test_unknown_kid_refetches_at_most_once_per_interval(
    idp: IdentityProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jwks_module, "UNKNOWN_KID_REFETCH_SECONDS", 0.5)
    policy = policy_for(idp)
    stranger = SigningKey()

    async def body(v: Verifier) -> list[int]:
        fetches = []
        for _ in range(2):  # two intervals: five unknown-kid tokens in each
            before = idp.jwks_requests
            for _ in range(5):
                with pytest.raises(TokenError):
                    await v.verify(stranger.sign({"iss": idp.issuer, "aud": "orders-api", "exp": time.time() + 60}),
                                   ["idp"])
            fetches.append(idp.jwks_requests - before)
            await asyncio.sleep(0.6)
        return fetches

    assert run_with_verifier(policy, body) == [1, 1]


def test_idp_down_keeps_serving_the_last_good_keys(idp: IdentityProvider) -> None:
    policy = policy_for(idp)

    async def body(v: Verifier) -> str | None:
        idp.down = True
        assert not await v.keysets["idp"].refresh()
        return (await v.verify(idp.token(sub="still"), ["idp"])).sub

    assert run_with_verifier(policy, body) == "still"


def test_not_ready_until_keys_are_loaded(idp: IdentityProvider) -> None:
    idp.down = True
    policy = policy_for(idp)

    async def body(v: Verifier) -> tuple[bool, str, bool]:
        ready_before = v.ready
        with pytest.raises(TokenError) as info:
            await v.verify(idp.token(), ["idp"])
        idp.down = False
        await v.keysets["idp"].refresh()
        return ready_before, info.value.code, v.ready

    assert run_with_verifier(policy, body) == (False, "keys_unavailable", True)


def test_several_providers_routed_by_issuer() -> None:
    with IdentityProvider() as a, IdentityProvider() as b:
        text = f"""
providers:
  - {{name: a, issuer: {a.issuer}, audiences: [orders-api], jwksUri: {a.jwks_uri}}}
  - {{name: b, issuer: {b.issuer}, audiences: [orders-api], jwksUri: {b.jwks_uri}}}
proxies: [{{name: p}}]
"""
        policy = parse_policy(text)

        async def body(v: Verifier) -> tuple[str, str, str]:
            first = await v.verify(a.token(sub="from-a"), ["a", "b"])
            second = await v.verify(b.token(sub="from-b"), ["a", "b"])
            with pytest.raises(TokenError) as info:
                await v.verify(b.token(sub="from-b"), ["a"])  # proxy trusts only a
            return f"{first.provider}:{first.sub}", f"{second.provider}:{second.sub}", info.value.code

        assert run_with_verifier(policy, body) == ("a:from-a", "b:from-b", "token_wrong_issuer")


def test_token_cache_hits_and_never_outlives_exp(idp: IdentityProvider) -> None:
    now = [time.time()]
    cache = TokenCache(size=10, ttl_seconds=300, clock=lambda: now[0])
    token = idp.token(ttl=60, sub="c")
    policy = policy_for(idp)

    async def body(v: Verifier) -> tuple[int, int]:
        await v.verify(token, ["idp"])
        await v.verify(token, ["idp"])
        hits = cache.hits
        now[0] += 61  # past exp: the entry is gone, and verification refuses the token
        assert cache.get(TokenCache.key(token)) is None
        return hits, cache.misses

    assert run_with_verifier(policy, body, cache) == (1, 2)


def test_token_cache_is_bounded() -> None:
    cache = TokenCache(size=3, ttl_seconds=300)
    from extauthz.core.claims import Claims
    for i in range(10):
        cache.put(TokenCache.key(str(i)), Claims.of({"i": i}), None)
    assert [cache.get(TokenCache.key(str(i))) is not None for i in range(10)] == [False] * 7 + [True] * 3
