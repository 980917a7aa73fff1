"""A real (small) identity provider: generated keys, JWKS and OIDC discovery over HTTP.

Used by ``extauthz demo`` and by the tests, so tokens are verified exactly as in
production: fetched over HTTP, never patched into the verifier.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa


class SigningKey:
    def __init__(self, alg: str = "RS256", kid: str | None = None) -> None:
        self.alg = alg
        self.kid = kid or uuid.uuid4().hex[:12]
        if alg.startswith("ES"):
            self.private: Any = ec.generate_private_key(ec.SECP256R1())
            algorithm: Any = jwt.algorithms.ECAlgorithm
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            algorithm = jwt.algorithms.RSAAlgorithm
        self.jwk: dict[str, Any] = json.loads(algorithm.to_jwk(self.private.public_key()))
        self.jwk.update({"kid": self.kid, "use": "sig", "alg": alg})

    def sign(self, claims: dict[str, Any], headers: dict[str, Any] | None = None) -> str:
        return jwt.encode(claims, self.private, algorithm=self.alg, headers={"kid": self.kid, **(headers or {})})

    def sign_bytes(self, header: bytes, payload: bytes) -> str:
        """A compact RS256 JWS over exactly these bytes: contents no JSON encoder would write, validly signed.

        For tests that probe the verifier with odd tokens (lone surrogates, huge numbers, ``crit``).
        """
        assert self.alg == "RS256", "raw signing is only needed (and implemented) for RS256"
        signing_input = f"{_b64(header)}.{_b64(payload)}".encode()
        signature = self.private.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
        return f"{signing_input.decode()}.{_b64(signature)}"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class IdentityProvider:
    """Serves ``/.well-known/openid-configuration`` and ``/.well-known/jwks.json``."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.keys = [SigningKey()]
        self.jwks_requests = 0
        self.down = False
        self.delay = 0.0
        # Further GET paths (``extauthz demo-idp`` adds ``/token``): path -> handler of the query
        # string, answering (status, content type, body). Empty by default: discovery and JWKS only.
        self.routes: dict[str, Callable[[str], tuple[int, str, bytes]]] = {}
        idp = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if idp.down:
                    self.send_error(503)
                    return
                if self.path == "/.well-known/openid-configuration":
                    body: dict[str, Any] = {"issuer": idp.issuer, "jwks_uri": idp.jwks_uri}
                elif self.path == "/.well-known/jwks.json":
                    idp.jwks_requests += 1
                    body = idp.jwks()
                elif self.path.partition("?")[0] in idp.routes:
                    path, _, query = self.path.partition("?")
                    status, content_type, payload = idp.routes[path](query)
                    self.send_response(status)
                    self.send_header("content-type", content_type)
                    self.send_header("content-length", str(len(payload)))
                    self.send_header("cache-control", "no-store")
                    self.end_headers()
                    self.wfile.write(payload)
                    return
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.issuer = f"http://{host}:{self.port}"
        self.jwks_uri = f"{self.issuer}/.well-known/jwks.json"
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> IdentityProvider:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def jwks(self) -> dict[str, Any]:
        return {"keys": [k.jwk for k in self.keys]}

    def rotate(self) -> SigningKey:
        """A new key appears at the IdP (old ones stay published, as IdPs do)."""
        key = SigningKey()
        self.keys.append(key)
        return key

    def token(self, audience: str | list[str] = "orders-api", ttl: int = 3600,
              key: SigningKey | None = None, **claims: Any) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {"iss": self.issuer, "aud": audience, "iat": now, "exp": now + ttl}
        payload.update(claims)
        for name in [k for k, v in payload.items() if v is None]:
            del payload[name]  # pass sub=None to mint a token without sub
        return (key or self.keys[0]).sign(payload)
