"""What the benchmarks measure against: one policy, one orders document, one caller.

Shared by the end-to-end comparison (bench.compare), the soak (bench.soak) and
the microbenchmarks (bench.micro), so a figure in one can be read beside the
others: the same three rules, the same filter, the same 10 KB body; and, for the
TLS scenarios, the same certificates (:class:`TlsFiles`).
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.test_filter_properties import SEED_FILTER

# Seed 003-like rules: deny tokens without sub, deny service accounts on user paths,
# allow users to GET products and orders. ISSUER and JWKS_URI are filled in by the harness.
SEED_RULES: list[dict[str, Any]] = [
    {"effect": "deny", "token": [{"claim": {"pattern": "^sub$"}, "presence": "must_absent"}], "priority": 1},
    {"effect": "deny", "path": {"path": {"pattern": "^/v1/users/"}},
     "token": [{"claim": {"pattern": "^sub$"}, "value": {"pattern": "^svc-"}}], "priority": 2},
    {"effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/(products|orders)/?"}},
     "token": [{"claim": {"pattern": "^sub$"}, "value": {"pattern": "^user-"}}], "priority": 10},
]

# Seed 003's allowlist, scoped to the orders list: a caller sees only their orders, four fields each.
ORDERS_FILTER: dict[str, Any] = {"methods": ["GET"], "path": {"pattern": "^/v1/orders"}, "statuses": [200],
                                 **SEED_FILTER}

ORDERS_BYTES = 10_000
"""The filtered scenario's upstream body: about 10 KB of orders JSON."""

CALLER = "user-3"
"""The benchmark's caller: one of the ten users in the orders document, so filtering keeps a tenth of the rows."""


def seed_policy(issuer: str = "ISSUER", jwks: str = "JWKS_URI", *, filtered: bool = True,
                extra_rules: list[dict[str, Any]] | None = None,
                relationships: dict[str, Any] | None = None, tls: TlsFiles | None = None) -> str:
    """The policy the sidecar serves: seed rules (+ the orders filter) for the proxy the shipped Envoy names.

    ``jwks`` is a URI, or an inline JWKS when it is a dict's JSON (the microbenchmarks have no IdP).
    ``tls``: the gRPC listener serves mTLS with these files (``server.tls``).
    """
    provider: dict[str, Any] = {"name": "idp", "issuer": issuer, "audiences": ["orders-api"]}
    if jwks.startswith("{"):
        provider["jwks"] = orjson.loads(jwks)
    else:
        provider["jwksUri"] = jwks
    proxy: dict[str, Any] = {"name": "orders-api", "defaultRuleEffect": "deny",
                             "upstream": {"identityHeaders": {"x-auth-sub": "{{sub}}"}},
                             "rules": [*SEED_RULES, *(extra_rules or [])]}
    if filtered:
        proxy["filters"] = [ORDERS_FILTER]
    document: dict[str, Any] = {"providers": [provider], "proxies": [proxy]}
    if relationships:
        document["relationships"] = relationships
    if tls is not None:
        document["server"] = {"tls": {"certFile": str(tls.server_cert), "keyFile": str(tls.server_key),
                                      "clientCaFile": str(tls.ca)}}
    return yaml.safe_dump(document, sort_keys=False)


@dataclass(frozen=True)
class TlsFiles:
    """A CA, the sidecar's certificate (for ``localhost`` and 127.0.0.1) and Envoy's client certificate, as files.

    What the TLS scenarios serve and present: the server's files are named as a
    Kubernetes TLS Secret mounts them (``tls.crt``, ``tls.key``, ``ca.crt``),
    which ``bench.floor_authz --tls`` reads too. ECDSA P-256, as cert-manager
    and Istio issue by default.
    """

    directory: Path

    @property
    def server_cert(self) -> Path:
        return self.directory / "tls.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "tls.key"

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def client_cert(self) -> Path:
        return self.directory / "client.crt"

    @property
    def client_key(self) -> Path:
        return self.directory / "client.key"

    @classmethod
    def issue(cls, directory: Path) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        now = datetime.datetime.now(datetime.UTC)
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "extauthz bench CA")])
        ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
              .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
              .not_valid_after(now + datetime.timedelta(days=2))
              .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
              .sign(ca_key, hashes.SHA256()))
        files = cls(directory)
        files.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        for name, usage, cert_path, key_path in (
                ("extauthz", ExtendedKeyUsageOID.SERVER_AUTH, files.server_cert, files.server_key),
                ("envoy", ExtendedKeyUsageOID.CLIENT_AUTH, files.client_cert, files.client_key)):
            key = ec.generate_private_key(ec.SECP256R1())
            builder = (
                x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
                .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False))
            cert_path.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
            key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
        return files


def orders_document(target_bytes: int) -> dict[str, Any]:
    """Orders of 10 users, ~320 bytes each, until the JSON is about ``target_bytes`` long."""
    orders: list[dict[str, Any]] = []
    document: dict[str, Any] = {"orders": orders, "page": 1, "next": None}
    size = 0
    i = 0
    while size < target_bytes:
        order = {
            "orderId": f"o-{i}", "userId": f"user-{i % 10}", "amount": i * 3 % 997, "status": "paid",
            "internalRef": f"x-{i}", "audit": {"by": "ops", "at": "2026-01-01T00:00:00Z", "version": i % 7},
            "items": [{"sku": f"s-{i}-{j}", "qty": j, "price": 1.5 * j} for j in range(2)],
        }
        orders.append(order)
        size += len(orjson.dumps(order)) + 1
        i += 1
    return document


def filtered_orders(document: dict[str, Any], caller: str = CALLER) -> dict[str, Any]:
    """What the orders filter must leave for ``caller``: written out by hand, not by the engine under test."""
    keep = ("orderId", "userId", "amount", "status")
    return {"orders": [{k: o[k] for k in keep} for o in document["orders"] if o["userId"] == caller]}
