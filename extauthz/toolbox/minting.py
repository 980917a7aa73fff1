"""Tokens for given claims, signed by a throwaway local key and verified for real.

``extauthz test`` and ``extauthz explain --claims`` ask "what would the policy do
for a caller with these claims?" without an identity provider. Rather than
switching verification off, they run a *variant* of the policy in which only the
providers' key source is replaced: an inline JWKS holding the public half of a
key generated for this run (or, for HS* providers, a fresh random secret). The
issuer, audiences, allowed algorithms, clock skew, ``exp``/``iat`` rules and
token sources stay those of the policy, and the real :class:`Verifier` checks the
minted token, so a test with a wrong audience or an expired token fails exactly
as it would in production. The private key never leaves the process.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from extauthz.core.authorizer import select_proxy
from extauthz.core.request import HttpRequest
from extauthz.errors import ExtauthzError
from extauthz.policy.model import Policy, Provider

_CURVES: dict[str, ec.EllipticCurve] = {"ES256": ec.SECP256R1(), "ES384": ec.SECP384R1(), "ES512": ec.SECP521R1()}


class MintError(ExtauthzError, ValueError):
    """The claims cannot be turned into a token for this policy (unknown provider...)."""


@dataclass(frozen=True)
class _Key:
    alg: str
    kid: str
    private: Any
    jwk: Mapping[str, Any] | None
    """None for an HMAC secret."""


def _generate(alg: str) -> _Key:
    kid = "extauthz-local-" + uuid.uuid4().hex[:8]
    if alg.startswith("HS"):
        return _Key(alg, kid, secrets.token_bytes(64), None)
    private: Any
    if alg.startswith(("RS", "PS")):
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif alg in _CURVES:
        private = ec.generate_private_key(_CURVES[alg])
    elif alg == "EdDSA":
        private = ed25519.Ed25519PrivateKey.generate()
    else:
        raise MintError(f"cannot mint {alg} tokens")
    algorithm = jwt.get_algorithm_by_name(alg)
    jwk = json.loads(algorithm.to_jwk(private.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": alg})
    return _Key(alg, kid, private, jwk)


class LocalIssuer:
    """One throwaway key per provider (of the provider's first allowed algorithm)."""

    def __init__(self) -> None:
        self._keys: dict[str, _Key] = {}

    def key_for(self, provider: Provider) -> _Key:
        if provider.name not in self._keys:
            self._keys[provider.name] = _generate(provider.algorithms[0])
        return self._keys[provider.name]

    def variant(self, policy: Policy) -> Policy:
        """The same policy, each provider's keys replaced by this issuer's (nothing else changes)."""
        providers = {}
        for name, provider in policy.providers.items():
            key = self.key_for(provider)
            providers[name] = dataclasses.replace(
                provider, jwks_uri="", discovery=False, jwks_file="", hmac_secret_file="",
                jwks_inline=None if key.jwk is None else {"keys": [dict(key.jwk)]},
                hmac_secret=key.private if key.jwk is None else b"",
            )
        return dataclasses.replace(policy, providers=MappingProxyType(providers))

    def mint(self, provider: Provider, claims: Mapping[str, Any], expires_in: int = 3600) -> str:
        """Sign ``claims``; ``iss``, ``aud``, ``iat`` and ``exp`` default to what the provider accepts.

        A claim given as None is left out (e.g. ``sub: null`` for a token without ``sub``).
        """
        key = self.key_for(provider)
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": provider.issuer, "aud": provider.audiences[0], "iat": now, "exp": now + expires_in,
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        return jwt.encode(payload, key.private, algorithm=key.alg, headers={"kid": key.kid})


def provider_for(policy: Policy, request: HttpRequest, name: str = "") -> Provider | None:
    """The provider a minted token is for: the named one, else the first the request's proxy trusts."""
    if name:
        if name not in policy.providers:
            raise MintError(f"no provider named {name!r} (defined: {', '.join(sorted(policy.providers))})")
        return policy.providers[name]
    proxy = select_proxy(policy, request)
    if proxy is None or not proxy.providers:
        return None
    return policy.providers[proxy.providers[0]]


def with_token(request: HttpRequest, provider: Provider, token: str) -> HttpRequest:
    """The request carrying ``token`` where the provider looks first (header, cookie or query)."""
    source = provider.sources[0]
    headers = dict(request.headers)
    query = request.query_string
    if source.header:
        headers[source.header] = source.prefix + token
    elif source.cookie:
        cookie = headers.get("cookie", "")
        headers["cookie"] = (cookie + "; " if cookie else "") + f"{source.cookie}={token}"
    else:
        query = (query + "&" if query else "") + f"{source.query}={token}"
    return dataclasses.replace(request, headers=MappingProxyType(headers), query_string=query)
