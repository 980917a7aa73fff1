"""Token verification (POLICY §1): signature, issuer, audience, time claims.

The verifier routes a token to its provider by the (unverified) ``iss`` claim,
restricted to the providers the proxy trusts, then verifies it with PyJWT using
only keys from that provider's configured source. Failures raise
:class:`TokenError` with a stable code for the caller and a reason for the log.
"""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt

from extauthz.core.claims import Claims
from extauthz.identity.jwks import KeySet, KeysUnavailable
from extauthz.policy.model import Provider


class TokenError(Exception):
    """Why a token was refused. ``code`` is stable and safe to show; ``reason`` is for logs."""

    def __init__(self, code: str, reason: str, status: int = 401) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.status = status

    @property
    def rfc6750_error(self) -> str:
        return "" if self.code == "token_missing" else "invalid_token"


@dataclass
class _Cached:
    claims: Claims
    expires_at: float


class TokenCache:
    """Verified tokens, so repeat callers skip the signature check.

    Bounded (LRU), keyed by a hash of the token (the cache holds no bearer
    tokens), and an entry never outlives the token's ``exp`` nor ``ttl``.
    """

    def __init__(self, size: int, ttl_seconds: float, clock: Callable[[], float] = time.time) -> None:
        self._entries: OrderedDict[bytes, _Cached] = OrderedDict()
        self._size = size
        self._ttl = ttl_seconds
        self._clock = clock
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(token: str) -> bytes:
        return hashlib.blake2b(token.encode(), digest_size=20).digest()

    def get(self, key: bytes) -> Claims | None:
        entry = self._entries.get(key)
        if entry is None or entry.expires_at <= self._clock():
            if entry is not None:
                del self._entries[key]
            self.misses += 1
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry.claims

    def put(self, key: bytes, claims: Claims, exp: float | None) -> None:
        if self._size <= 0:
            return
        expires = self._clock() + self._ttl
        if exp is not None:
            expires = min(expires, exp)
        self._entries[key] = _Cached(claims, expires)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def clear(self) -> None:
        self._entries.clear()


_ERRORS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token_expired"),
    (jwt.ImmatureSignatureError, "token_not_yet_valid"),
    (jwt.InvalidAudienceError, "token_wrong_audience"),
    (jwt.InvalidIssuerError, "token_wrong_issuer"),
    (jwt.InvalidIssuedAtError, "token_bad_iat"),
    (jwt.MissingRequiredClaimError, "token_missing_claim"),
    (jwt.InvalidSignatureError, "token_bad_signature"),
    (jwt.InvalidAlgorithmError, "token_bad_algorithm"),
    (jwt.DecodeError, "token_malformed"),
)


class Verifier:
    """Verifies tokens for every provider of a policy; owns their key sets and the cache."""

    def __init__(
        self,
        providers: Mapping[str, Provider],
        client: httpx.AsyncClient,
        cache: TokenCache,
        on_jwks_fetch: Callable[[str, bool], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.providers = providers
        self.keysets = {name: KeySet(p, client, on_jwks_fetch) for name, p in providers.items()}
        self.cache = cache
        self._clock = clock

    async def start(self) -> None:
        for keyset in self.keysets.values():
            await keyset.start()

    async def close(self) -> None:
        for keyset in self.keysets.values():
            await keyset.close()

    @property
    def ready(self) -> bool:
        return all(k.ready for k in self.keysets.values())

    async def verify(self, token: str, trusted: Iterable[str]) -> Claims:
        trusted = tuple(trusted)
        key = TokenCache.key(token)
        cached = self.cache.get(key)
        if cached is not None and cached.provider in trusted:
            return cached
        try:
            # Read once, unverified, only to route the token to a provider and pick its key.
            unverified_token = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.DecodeError as exc:
            raise TokenError("token_malformed", f"not a JWS compact token: {exc}") from None
        header, unverified = unverified_token["header"], unverified_token["payload"]
        issuer = unverified.get("iss") if isinstance(unverified, dict) else None
        provider = next((self.providers[n] for n in trusted if self.providers[n].issuer == issuer), None)
        if provider is None:
            raise TokenError("token_wrong_issuer", f"issuer {issuer!r} is not trusted by this proxy")
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in provider.algorithms:
            raise TokenError(
                "token_bad_algorithm",
                f"algorithm {alg!r} not allowed for provider {provider.name} "
                f"(allowed: {', '.join(provider.algorithms)})",
            )
        verification_key: Any
        if provider.hmac_secret:
            verification_key = provider.hmac_secret
        else:
            kid = header.get("kid")
            try:
                found = await self.keysets[provider.name].key_for(kid if isinstance(kid, str) else None, alg)
            except KeysUnavailable as exc:
                raise TokenError(
                    "keys_unavailable", f"no keys loaded for provider {provider.name}: {exc}", 503
                ) from None
            if found is None:
                raise TokenError(
                    "token_unknown_key",
                    f"no {alg} key with kid {kid!r} in the JWKS of provider {provider.name}",
                )
            verification_key = found.key
        required = ["iss"] + (["exp"] if provider.require_exp else [])
        try:
            payload: dict[str, Any] = jwt.decode(
                token,
                key=verification_key,
                algorithms=[alg],
                audience=list(provider.audiences),
                issuer=provider.issuer,
                leeway=provider.clock_skew_seconds,
                options={"require": required, "verify_iat": True, "verify_nbf": True},
            )
        except jwt.PyJWTError as exc:
            raise _token_error(exc) from None
        if provider.max_token_age_seconds is not None:
            iat = payload.get("iat")
            if not isinstance(iat, (int, float)):
                raise TokenError("token_missing_claim", "maxTokenAgeSeconds is set but the token has no iat")
            if self._clock() - iat > provider.max_token_age_seconds + provider.clock_skew_seconds:
                raise TokenError("token_too_old", f"token older than {provider.max_token_age_seconds}s")
        claims = Claims.of(payload, provider.name)
        exp = payload.get("exp")
        self.cache.put(key, claims, float(exp) if isinstance(exp, (int, float)) else None)
        return claims


def _token_error(exc: jwt.PyJWTError) -> TokenError:
    for kind, code in _ERRORS:
        if isinstance(exc, kind):
            return TokenError(code, f"{type(exc).__name__}: {exc}")
    return TokenError("token_invalid", f"{type(exc).__name__}: {exc}")
