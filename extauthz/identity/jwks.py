"""Signing keys for one provider: fetched, cached, refreshed, never taken from a token.

Keys come only from the configured source (``jwksUri``, OIDC discovery, a file, or
inline); header hints (``jku``, ``x5u``, ``jwk``, ``x5c``) are never followed.
A background task refreshes remote keys; an unknown ``kid`` triggers at most one
refetch per :data:`UNKNOWN_KID_REFETCH_SECONDS`; when the IdP is down, the last
good keys keep serving. A key that a successful fetch no longer lists is reported
to ``on_keys_removed``, so whatever it verified earlier (the verified-token cache)
can be dropped at once instead of living on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import httpx
import jwt
import structlog

from extauthz.eager import in_task
from extauthz.errors import ExtauthzError
from extauthz.policy.model import Provider, thaw

UNKNOWN_KID_REFETCH_SECONDS = 10.0
_KTY_FOR_ALG = {"RS": "RSA", "PS": "RSA", "ES": "EC", "Ed": "OKP"}
# RFC 7638: the members that define a key's material, per key type.
_THUMBPRINT_MEMBERS = {
    "RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x"), "oct": ("k", "kty"),
}

KeyIdentity = tuple[str | None, str]
"""A key as the JWKS published it: its ``kid`` (None without one) and its RFC 7638 thumbprint.

Both count: a ``kid`` republished over other key material is another key, and
so is the same material under another ``kid`` (tokens naming the old one no
longer find it).
"""

log = structlog.get_logger("extauthz.jwks")


class KeysUnavailable(ExtauthzError):
    """No keys were ever loaded for this provider (the sidecar reports not-ready)."""


@dataclass(frozen=True)
class VerificationKey:
    key: Any
    """The cryptography public key object."""
    kty: str
    alg: str | None
    """The algorithm the JWK pins, if any."""
    kid: str | None = None
    thumbprint: str = ""

    @cached_property
    def identity(self) -> KeyIdentity:
        """One tuple per key: every token the key verified keeps it in the token cache."""
        return self.kid, self.thumbprint

    def fits(self, alg: str) -> bool:
        """A key only verifies algorithms of its own type (no RSA key used as an HMAC secret)."""
        if self.alg is not None and self.alg != alg:
            return False
        return _KTY_FOR_ALG.get(alg[:2]) == self.kty


@dataclass(frozen=True)
class _Keys:
    by_kid: Mapping[str, VerificationKey]
    without_kid: tuple[VerificationKey, ...]
    fetched_at: float

    def identities(self) -> frozenset[KeyIdentity]:
        return frozenset(k.identity for k in (*self.by_kid.values(), *self.without_kid))


def _thumbprint(entry: Mapping[str, Any]) -> str:
    members = _THUMBPRINT_MEMBERS.get(str(entry.get("kty")))
    source = {m: entry.get(m) for m in members} if members else dict(entry)
    canonical = json.dumps(source, sort_keys=True, separators=(",", ":"), default=str)
    return base64.urlsafe_b64encode(hashlib.sha256(canonical.encode()).digest()).rstrip(b"=").decode()


def parse_jwks(document: object) -> _Keys:
    if not isinstance(document, Mapping) or not isinstance(document.get("keys"), list):
        raise ValueError("JWKS document has no 'keys' list")
    by_kid: dict[str, VerificationKey] = {}
    without: list[VerificationKey] = []
    skipped = 0
    for entry in document["keys"]:
        if not isinstance(entry, Mapping) or entry.get("use", "sig") != "sig":
            skipped += 1
            continue
        alg = entry.get("alg")
        kid = entry.get("kid")
        try:
            parsed = jwt.PyJWK(dict(entry))
            key = VerificationKey(
                parsed.key, parsed.key_type or "", alg if isinstance(alg, str) else None,
                kid if isinstance(kid, str) else None, _thumbprint(entry),
            )
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            skipped += 1  # unknown kty/alg, e.g. an encryption key
            continue
        if isinstance(kid, str):
            by_kid[kid] = key
        else:
            without.append(key)
    if not by_kid and not without:
        raise ValueError(f"JWKS has no usable signing keys ({skipped} skipped)")
    return _Keys(by_kid, tuple(without), time.monotonic())


class KeySet:
    """The signing keys of one provider."""

    def __init__(
        self, provider: Provider, client: httpx.AsyncClient,
        on_fetch: Callable[[str, bool], None] | None = None,
        on_keys_removed: Callable[[str, frozenset[KeyIdentity]], None] | None = None,
    ) -> None:
        self.provider = provider
        self._client = client
        self._source = provider.jwks_uri or provider.jwks_file or provider.issuer
        """What the last fetch read (discovery URL, JWKS URL or file), named in its errors."""
        self._keys: _Keys | None = None
        self._last_kid_refetch = -UNKNOWN_KID_REFETCH_SECONDS
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._on_fetch = on_fetch or (lambda provider, ok: None)
        self._on_keys_removed = on_keys_removed or (lambda provider, gone: None)
        self.last_error = ""
        if provider.jwks_inline is not None:
            self._keys = parse_jwks(thaw(provider.jwks_inline))

    @property
    def remote(self) -> bool:
        return bool(self.provider.jwks_uri or self.provider.discovery)

    @property
    def ready(self) -> bool:
        return self._keys is not None or bool(self.provider.hmac_secret)

    @property
    def age_seconds(self) -> float | None:
        return None if self._keys is None else time.monotonic() - self._keys.fetched_at

    async def start(self) -> None:
        """Load keys once, then keep them fresh in the background."""
        if self.provider.jwks_file or self.remote:
            await self.refresh()
        if self.remote:
            self._task = asyncio.create_task(self._refresh_loop(), name=f"jwks:{self.provider.name}")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_loop(self) -> None:
        while True:
            # Retry quickly until the first keys arrive, then at the configured interval.
            delay = self.provider.jwks_refresh_seconds if self._keys else 2.0
            await asyncio.sleep(delay)
            await self.refresh()

    async def refresh(self) -> bool:
        """Fetch keys now; on failure keep the last good ones. Returns success.

        Keys the new set lacks are reported before any other task runs, so no
        request sees the new keys while the cache still holds tokens that the
        removed ones verified.
        """
        await in_task()  # httpx's timeouts cancel the current task
        async with self._lock:
            previous = self._keys
            try:
                document = await self._fetch()
                self._keys = parse_jwks(document)
            except Exception as exc:  # noqa: BLE001 - any failure keeps the old keys
                # Name what was fetched: a refused connection's message alone does not say where.
                self.last_error = f"{self._source}: {type(exc).__name__}: {exc}"
                log.warning(
                    "jwks_fetch_failed", provider=self.provider.name, url=self._source, error=self.last_error,
                    keeping_previous=self._keys is not None,
                )
                self._on_fetch(self.provider.name, False)
                return False
            self.last_error = ""
            gone = previous.identities() - self._keys.identities() if previous is not None else frozenset()
            if gone:
                log.info("jwks_keys_removed", provider=self.provider.name,
                         kids=sorted(kid or f"(no kid, {thumbprint})" for kid, thumbprint in gone))
                self._on_keys_removed(self.provider.name, gone)
            self._on_fetch(self.provider.name, True)
            count = len(self._keys.by_kid) + len(self._keys.without_kid)
            log.info("jwks_loaded", provider=self.provider.name, keys=count)
            return True

    async def _fetch(self) -> object:
        provider = self.provider
        if provider.jwks_file:
            self._source = provider.jwks_file
            return json.loads(await asyncio.to_thread(Path(provider.jwks_file).read_bytes))
        uri = provider.jwks_uri
        timeout = provider.jwks_timeout_seconds
        if provider.discovery:
            url = provider.issuer.rstrip("/") + "/.well-known/openid-configuration"
            self._source = url
            response = await self._client.get(url, timeout=timeout)
            response.raise_for_status()
            config = response.json()
            if config.get("issuer") != provider.issuer:
                raise ValueError(
                    f"discovery document names issuer {config.get('issuer')!r}, expected {provider.issuer!r}"
                )
            uri = config.get("jwks_uri")
            if not isinstance(uri, str) or not uri:
                raise ValueError("discovery document has no jwks_uri")
        self._source = uri
        response = await self._client.get(uri, timeout=timeout)
        response.raise_for_status()
        return response.json()

    async def key_for(self, kid: str | None, alg: str) -> VerificationKey | None:
        """The key that may verify a token with this header; refetches once for a new kid."""
        key = self._find(kid, alg)
        if key is None and kid is not None and self._may_refetch():
            self._last_kid_refetch = time.monotonic()
            await self.refresh()
            key = self._find(kid, alg)
        return key

    def _may_refetch(self) -> bool:
        return (self.remote or bool(self.provider.jwks_file)) and (
            time.monotonic() - self._last_kid_refetch >= UNKNOWN_KID_REFETCH_SECONDS
        )

    def _find(self, kid: str | None, alg: str) -> VerificationKey | None:
        keys = self._keys
        if keys is None:
            raise KeysUnavailable(self.last_error or "keys not loaded yet")
        if kid is not None:
            key = keys.by_kid.get(kid)
            return key if key is not None and key.fits(alg) else None
        candidates = [k for k in (*keys.without_kid, *keys.by_kid.values()) if k.fits(alg)]
        return candidates[0] if len(candidates) == 1 else None  # ambiguous: refuse

