"""What the benchmarks measure against: one policy, one orders document, one caller.

Shared by the end-to-end comparison (bench.compare), the soak (bench.soak) and
the microbenchmarks (bench.micro), so a figure in one can be read beside the
others: the same three rules, the same filter, the same 10 KB body.
"""

from __future__ import annotations

from typing import Any

import orjson
import yaml

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
                relationships: dict[str, Any] | None = None) -> str:
    """The policy the sidecar serves: seed rules (+ the orders filter) for the proxy the shipped Envoy names.

    ``jwks`` is a URI, or an inline JWKS when it is a dict's JSON (the microbenchmarks have no IdP).
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
    return yaml.safe_dump(document, sort_keys=False)


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
