"""Token verification (docs/policy.md, providers): signature, issuer, audience, time claims.

The verifier routes a token to its provider by the (unverified) ``iss`` claim,
restricted to the providers the proxy trusts, then verifies it with PyJWT using
only keys from that provider's configured source. Failures raise
:class:`TokenError` with a stable code for the caller and a reason for the log;
the token is the caller's to choose, so no content of it may end in any other
exception (that would surface as a 5xx instead of a 401).
"""

from __future__ import annotations

import hashlib
import math
import sys
import time
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import httpx
import jwt
import structlog

from extauthz.core.claims import Claims
from extauthz.core.identity import TokenError
from extauthz.identity.jwks import KeyIdentity, KeySet, KeysUnavailable
from extauthz.policy.model import Provider

log = structlog.get_logger("extauthz.verifier")


@dataclass(slots=True)
class _Cached:
    claims: Claims
    expires_at: float
    signed_by: KeyIdentity | None
    """The JWKS key that verified the token (None for an HMAC secret), so its removal can purge the entry."""


# Claims whose values are the same for most tokens of an issuer: kept once, not once per cached token.
_SHARED_VALUES = frozenset({"iss", "aud", "azp", "typ", "scope", "tid", "tenant_id"})


def _compact(payload: dict[str, Any]) -> dict[str, Any]:
    """The payload with claim names, and the values that repeat across callers, shared between cached tokens.

    Ten thousand cached tokens hold ten thousand copies of ``iss`` and its
    value otherwise. Interned strings are freed like any other when no token
    uses them any more.
    """
    compact: dict[str, Any] = {}
    for name, value in payload.items():
        shared = value
        if name in _SHARED_VALUES:
            if type(value) is str:
                shared = sys.intern(value)
            elif type(value) is list and all(type(v) is str for v in value):
                shared = [sys.intern(v) for v in value]
        compact[sys.intern(name)] = shared
    return compact


class TokenCache:
    """Verified tokens, so repeat callers skip the signature check.

    Bounded (LRU), keyed by a hash of the token (the cache holds no bearer
    tokens). A hit skips every check, so an entry must never outlive any of
    them: it ends at ``ttl``, at the earliest time limit of the token itself
    (``exp``, ``iat`` + ``maxTokenAgeSeconds`` + skew; the caller passes it as
    ``not_after``), and when the key that verified it leaves the JWKS
    (:meth:`purge`). ``nbf`` needs nothing: a token cached was valid already.
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

    def peek(self, key: bytes) -> Claims | None:
        """:meth:`get` for a second reader (the shadow policy): counted nowhere, the LRU order untouched."""
        entry = self._entries.get(key)
        return entry.claims if entry is not None and entry.expires_at > self._clock() else None

    def put(self, key: bytes, claims: Claims, not_after: float | None,
            signed_by: KeyIdentity | None = None) -> None:
        if self._size <= 0:
            return
        expires = self._clock() + self._ttl
        # Compared, never converted: a time claim may be an int no float can hold.
        if not_after is not None and not_after < expires:
            expires = not_after
        self._entries[key] = _Cached(claims, expires, signed_by)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def purge(self, provider: str, gone: Collection[KeyIdentity]) -> int:
        """Drop the tokens that keys no longer published verified; returns how many."""
        stale = [key for key, entry in self._entries.items()
                 if entry.signed_by in gone and entry.claims.provider == provider]
        for key in stale:
            del self._entries[key]
        return len(stale)

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
        borrowed: Mapping[str, KeySet] | None = None,
    ) -> None:
        """``borrowed``: key sets of identical providers that another verifier owns (the shadow policy's verifier
        borrows the active one's): used as they are, never started or closed here, so no JWKS is fetched twice."""
        self.providers = providers
        self.cache = cache
        borrowed = borrowed or {}
        self._owned = {name: KeySet(p, client, on_jwks_fetch, self._keys_removed)
                       for name, p in providers.items() if name not in borrowed}
        self.keysets = {name: self._owned.get(name) or borrowed[name] for name in providers}
        self._clock = clock

    def _keys_removed(self, provider: str, gone: frozenset[KeyIdentity]) -> None:
        purged = self.cache.purge(provider, gone)
        log.info("token_cache_purged", provider=provider, removed_keys=len(gone), entries=purged)

    async def start(self) -> None:
        for keyset in self._owned.values():
            await keyset.start()

    async def close(self) -> None:
        for keyset in self._owned.values():
            await keyset.close()

    @property
    def ready(self) -> bool:
        return all(k.ready for k in self.keysets.values())

    async def verify(self, token: str, trusted: Iterable[str]) -> Claims:
        """The token's claims if a provider in ``trusted`` vouches for it; else :class:`TokenError`.

        Parsers and validators below were not written with every hostile input
        in mind, so whatever else escapes them is still the token's fault: a 401.
        """
        try:
            return await self._verify(token, tuple(trusted))
        except TokenError:
            raise
        except KeysUnavailable as exc:
            raise TokenError("keys_unavailable", f"no keys loaded: {exc}", 503) from None
        except Exception as exc:  # noqa: BLE001 - the token picks the input, so any failure is its refusal
            log.warning("token_check_failed", error=type(exc).__name__)
            raise TokenError(
                "token_invalid", f"token could not be checked: {type(exc).__name__}: {str(exc)[:200]}"
            ) from None

    async def _verify(self, token: str, trusted: tuple[str, ...]) -> Claims:
        if not token.isascii():
            raise TokenError("token_malformed", "not a JWS compact token: characters outside ASCII")
        key = TokenCache.key(token)
        cached = self.cache.get(key)
        if cached is not None and cached.provider in trusted:
            return cached
        try:
            # Read once, unverified, only to route the token to a provider and pick its key.
            unverified_token = jwt.decode_complete(token, options={"verify_signature": False})
        except jwt.DecodeError as exc:
            raise TokenError("token_malformed", f"not a JWS compact token: {exc}") from None
        except jwt.PyJWTError as exc:
            raise _token_error(exc) from None
        header, unverified = unverified_token["header"], unverified_token["payload"]
        for part, document in (("header", header), ("payload", unverified)):
            problem = _json_problem(document)
            if problem:
                raise TokenError("token_malformed", f"{part} {problem}")
        if "crit" in header:
            # No JWT extension is understood here; a critical one must therefore be refused (RFC 7515 4.1.11).
            crit = str(header["crit"])[:100]
            raise TokenError("token_invalid", f"critical header parameters {crit} are not supported")
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
        signed_by: KeyIdentity | None = None
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
            signed_by = found.identity
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
        # Time claims are compared, never converted or subtracted: an int may be too large for a float.
        exp = payload.get("exp")
        not_after: float | None = exp if isinstance(exp, (int, float)) else None
        if provider.max_token_age_seconds is not None:
            iat = payload.get("iat")
            if not isinstance(iat, (int, float)):
                raise TokenError("token_missing_claim", "maxTokenAgeSeconds is set but the token has no iat")
            oldest = provider.max_token_age_seconds + provider.clock_skew_seconds
            if iat < self._clock() - oldest:
                raise TokenError("token_too_old", f"token older than {provider.max_token_age_seconds}s")
            too_old_at = iat + oldest
            not_after = too_old_at if not_after is None or too_old_at < not_after else not_after
        claims = Claims.of(_compact(payload), provider.name)
        # No await since the key was looked up: a refresh that removed it has not run in between.
        self.cache.put(key, claims, not_after, signed_by)
        return claims


def _json_problem(document: object) -> str | None:
    """Why a decoded header or payload is no plain JSON text, or None.

    Python's json module accepts what JSON (RFC 8259) has no room for: escapes
    of lone UTF-16 surrogates (``"\\ud800"``), which no UTF-8 header, log line or
    protobuf string can carry, and NaN or Infinity. Claims of either kind would
    break whatever writes them out later, so the token is refused up front.
    """
    stack = [document]
    while stack:  # iterative: depth is bounded by the parser, not worth the call stack
        value = stack.pop()
        if isinstance(value, str):
            if not value.isascii():
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError:
                    return "holds a lone UTF-16 surrogate, which UTF-8 text cannot carry"
        elif isinstance(value, float):
            if not math.isfinite(value):
                return "holds NaN or Infinity, which JSON has no spelling for"
        elif isinstance(value, dict):
            stack.extend(value)
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return None


def _token_error(exc: jwt.PyJWTError) -> TokenError:
    for kind, code in _ERRORS:
        if isinstance(exc, kind):
            return TokenError(code, f"{type(exc).__name__}: {exc}")
    return TokenError("token_invalid", f"{type(exc).__name__}: {exc}")
