"""The seed documents' journeys through a real Envoy running the shipped config.

Seed 003 (steps 3-5): an MCP proxy with deny-by-default, a sub requirement and a
service-account block. Seed 000 (steps 2-4): permission claims and tenant
isolation with a ``{{tenantId}}`` variable.

Every journey runs on both ext_authz transports (gRPC, ``envoy/envoy.yaml``, and
HTTP, ``envoy/envoy-http.yaml``) with the same expectations, and the decision
table is also compared between them answer for answer.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.e2e.stack import TRANSPORTS, Stack, TransportStacks, running_stack, transport_stacks

UPSTREAM_SECRET = "internal-orders-key"

SEED_003 = """
providers:
  - name: idp
    issuer: ISSUER
    jwksUri: JWKS_URI
    audiences: [orders-api]
proxies:
  - name: orders-api
    defaultRuleEffect: deny
    publicPaths: [{pattern: "^/healthz$", methods: [GET]}]
    upstream:
      targetCredential: {header: authorization, prefix: "Bearer ", file: target.key}
      identityHeaders: {x-auth-sub: "{{sub}}", x-auth-email: "{{email}}"}
    rules:
      - {"effect": "deny", "methods": ["GET", "POST", "PUT", "PATCH", "DELETE"],
         "token": [{"claim": {"pattern": "^sub$"}, "presence": "must_absent"}],
         "priority": 1, "notes": "Deny any request where the sub claim is missing from the JWT"}
      - {"effect": "deny", "methods": ["GET", "POST", "PUT", "PATCH", "DELETE"],
         "path": {"path": {"pattern": "^/v1/users/"}, "presence": "must_exist"},
         "token": [{"claim": {"pattern": "^sub$"}, "value": {"pattern": "^svc-"}, "presence": "must_exist"}],
         "priority": 2, "notes": "Block service account subs from user-scoped resource paths"}
      - {"effect": "allow", "methods": ["GET"],
         "path": {"path": {"pattern": "^/v1/(products|orders)/?"}, "presence": "must_exist"},
         "token": [{"claim": {"pattern": "^sub$"}, "value": {"pattern": "^user-"}, "presence": "must_exist"}],
         "priority": 10, "notes": "Allow read access to products and orders only for user-scoped tokens"}
      - {"effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/users/"}},
         "priority": 20, "notes": "users read their user-scoped resources"}
"""

SEED_000 = """
providers:
  - name: idp
    issuer: ISSUER
    jwksUri: JWKS_URI
    audiences: [https://api.myapp.com]
proxies:
  - name: orders-api
    proxyDefaultRuleEffect: deny
    rules:
      - {"effect": "deny", "methods": ["GET"],
         "path": {"path": {"pattern": "^/v1/orders(/.*)?$"}, "presence": "must_exist"},
         "token": [{"claim": {"pattern": "^permissions$"}, "value": {"pattern": "orders:read"},
                    "presence": "must_absent"}],
         "notes": "FGA enforcement: deny GET /v1/orders when orders:read permission is missing"}
      - {"effect": "deny", "methods": ["POST", "PUT", "PATCH"],
         "path": {"path": {"pattern": "^/v1/orders(/.*)?$"}, "presence": "must_exist"},
         "token": [{"claim": {"pattern": "^permissions$"}, "value": {"pattern": "orders:write"},
                    "presence": "must_absent"}],
         "notes": "FGA enforcement: deny mutating order operations when orders:write is missing"}
      - {"effect": "allow", "methods": ["GET", "POST"],
         "variables": [{"name": "tenantId", "source": "jwtClaim", "key": "tenant_id"}],
         "path": {"path": {"pattern": "^/v1/tenants/{{tenantId}}/"}, "presence": "must_exist"},
         "notes": "Tenant isolation: JWT tenant_id must match path tenant segment"}
      - {"effect": "allow", "methods": ["GET", "POST", "PATCH"], "path": {"path": {"pattern": "^/v1/orders"}},
         "notes": "order endpoints are open to callers that pass the permission rules"}
"""


@pytest.fixture(scope="module")
def seed003_stacks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TransportStacks]:
    with transport_stacks(lambda transport: running_stack(
            tmp_path_factory.mktemp(f"seed003-{transport}"), SEED_003,
            files={"target.key": UPSTREAM_SECRET + "\n"}, transport=transport)) as stacks:
        yield stacks


@pytest.fixture(scope="module", params=TRANSPORTS)
def seed003(seed003_stacks: TransportStacks, request: pytest.FixtureRequest) -> Stack:
    return seed003_stacks[request.param]


@pytest.fixture(scope="module", params=TRANSPORTS)
def seed000(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Iterator[Stack]:
    with running_stack(tmp_path_factory.mktemp(f"seed000-{request.param}"), SEED_000,
                       transport=request.param) as stack:
        yield stack


# --- seed 003 ------------------------------------------------------------------


def test_no_token_is_401_with_a_bearer_challenge(seed003: Stack) -> None:
    r = seed003.request("GET", "/v1/orders")
    assert r.status == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="extauthz"'
    assert r.json()["error"] == "token_missing"
    assert r.headers["x-extauthz-decision-id"] == r.json()["decisionId"]


@pytest.mark.parametrize("kind", ["expired", "wrong audience", "garbage", "forged signature"])
def test_invalid_tokens_are_401_and_say_why_only_in_the_log(seed003: Stack, kind: str) -> None:
    idp = seed003.idp
    token = {
        "expired": lambda: idp.token(sub="user-1", ttl=-300),
        "wrong audience": lambda: idp.token(sub="user-1", audience="billing-api"),
        "garbage": lambda: "abc.def.ghi",
        "forged signature": lambda: idp.token(sub="user-1")[:-8] + "AAAAAAAA",
    }[kind]()
    r = seed003.request("GET", "/v1/orders", token)
    assert r.status == 401
    assert r.headers["www-authenticate"] == 'Bearer realm="extauthz", error="invalid_token"'
    body = r.json()
    assert body["error"] == "invalid_token"
    assert "expired" not in r.body.decode() and "audience" not in r.body.decode()
    reason = {"expired": "token_expired", "wrong audience": "token_wrong_audience",
              "garbage": "token_malformed", "forged signature": "token_bad_signature"}[kind]
    line = next(ln for ln in seed003.sidecar.logs().splitlines() if body["decisionId"] in ln)
    assert reason in line
    assert token not in seed003.sidecar.logs()


def test_token_without_sub_is_403(seed003: Stack) -> None:
    r = seed003.request("GET", "/v1/orders", seed003.idp.token(sub=None))
    assert r.status == 403
    assert r.json()["error"] == "forbidden"


def test_service_account_on_user_paths_is_403(seed003: Stack) -> None:
    token = seed003.idp.token(sub="svc-reporting")
    assert seed003.request("GET", "/v1/users/42", token).status == 403
    # The same token's path tricks are normalized by Envoy before the rule sees them.
    assert seed003.request("GET", "//v1//users/42", token).status == 403
    assert seed003.request("GET", "/v1/orders/../users/42", token).status == 403
    # A user sub reaches the same path.
    assert seed003.request("GET", "/v1/users/42", seed003.idp.token(sub="user-42")).status == 200


def test_user_reads_orders_and_upstream_sees_only_what_it_should(seed003: Stack) -> None:
    token = seed003.idp.token(sub="user-123", email="u@example.com")
    r = seed003.request("GET", "/v1/products/9", token,
                        headers={"x-auth-sub": "admin", "X-Auth-Email": "spoof@evil"})
    assert r.status == 200
    seen = seed003.last_upstream_request()["headers"]
    assert seen["authorization"] == f"Bearer {UPSTREAM_SECRET}"
    assert seen["x-auth-sub"] == "user-123"
    assert seen["x-auth-email"] == "u@example.com"
    assert token not in str(seen)


def test_spoofed_identity_header_is_stripped_when_the_claim_is_absent(seed003: Stack) -> None:
    r = seed003.request("GET", "/v1/products", seed003.idp.token(sub="user-1"),
                        headers={"x-auth-email": "spoof@evil"})
    assert r.status == 200
    assert "x-auth-email" not in seed003.last_upstream_request()["headers"]


@pytest.mark.parametrize(("sub", "method", "path"), [
    ("user-123", "GET", "/v1/admin/settings"),   # path no rule covers
    ("svc-batch", "GET", "/v1/orders"),          # allow rule needs a user- sub
    ("user-123", "DELETE", "/v1/orders/1"),      # allow rule covers GET only
])
def test_default_deny(seed003: Stack, sub: str, method: str, path: str) -> None:
    before = len(seed003.upstream.requests)
    assert seed003.request(method, path, seed003.idp.token(sub=sub)).status == 403
    assert len(seed003.upstream.requests) == before, "a denied request never reaches the upstream"


def test_public_path_needs_no_token_but_identity_headers_stay_ours(seed003: Stack) -> None:
    assert seed003.request("GET", "/healthz", headers={"x-auth-sub": "admin"}).status == 200
    seen = seed003.last_upstream_request()
    assert seen["path"] == "/healthz" and "x-auth-sub" not in seen["headers"]
    assert seed003.request("POST", "/healthz").status == 401  # public for GET only


# --- the same table on every transport --------------------------------------------

# (method, target, token claims or None for no token, client headers)
TABLE: list[tuple[str, str, dict[str, Any] | None, dict[str, str]]] = [
    ("GET", "/v1/orders", None, {}),
    ("GET", "/v1/orders", {"sub": "user-1", "ttl": -300}, {}),
    ("GET", "/v1/orders", {"sub": None}, {}),
    ("GET", "/v1/users/42", {"sub": "svc-reporting"}, {}),
    ("GET", "//v1//users/42", {"sub": "svc-reporting"}, {}),
    ("GET", "/v1/users/42", {"sub": "user-42"}, {}),
    ("GET", "/v1/products/9?page=2", {"sub": "user-123", "email": "u@example.com"},
     {"x-auth-sub": "admin", "X-Auth-Email": "spoof@evil", "cookie": "theme=dark", "x-extauthz-unfiltered": "1"}),
    ("GET", "/v1/products", {"sub": "user-1"}, {"x-auth-email": "spoof@evil", "range": "bytes=0-10"}),
    ("HEAD", "/v1/products/1", {"sub": "user-1"}, {}),
    ("POST", "/v1/products/9", {"sub": "user-1"}, {"x-http-method-override": "GET"}),
    ("DELETE", "/v1/orders/1", {"sub": "user-123"}, {}),
    ("TRACE", "/v1/orders", {"sub": "user-123"}, {}),
    ("GET", "/v1/admin/settings", {"sub": "user-123"}, {}),
    ("GET", "/healthz", None, {"x-auth-sub": "admin"}),
    ("POST", "/healthz", None, {}),
]
# What differs between two stacks whatever the transport: the listener port, Envoy's request id.
VARYING = {"host", "x-request-id"}


def outcome(stack: Stack, method: str, target: str, claims: dict[str, Any] | None,
            headers: dict[str, str]) -> dict[str, Any]:
    """What the client and the upstream saw, without what differs between any two stacks."""
    before = len(stack.upstream.requests)
    r = stack.request(method, target, stack.idp.token(**claims) if claims is not None else None, headers)
    seen = [{"method": x["method"], "path": x["path"],
             "headers": {k: v for k, v in x["headers"].items() if k not in VARYING}}
            for x in stack.upstream.requests[before:]]
    denial = r.json() if r.status != 200 and r.body else None
    if denial is not None:
        assert denial.pop("decisionId") == r.headers["x-extauthz-decision-id"]
    return {"status": r.status, "denial": denial, "upstream": seen,
            "headers": {k: r.headers.get(k) for k in ("content-type", "www-authenticate")},
            "decision id": "x-extauthz-decision-id" in r.headers}


@pytest.mark.parametrize("row", range(len(TABLE)), ids=[f"{m} {t}" for m, t, _, _ in TABLE])
def test_every_transport_decides_the_same(seed003_stacks: TransportStacks, row: int) -> None:
    """Same status, same denial body and headers, byte for byte the same request upstream."""
    grpc, *others = (outcome(seed003_stacks[t], *TABLE[row]) for t in TRANSPORTS)
    assert others == [grpc] * len(others)
    assert grpc["decision id"]


# --- seed 000 ------------------------------------------------------------------

AUD = "https://api.myapp.com"


def test_permission_claims(seed000: Stack) -> None:
    idp = seed000.idp
    read = idp.token(audience=AUD, sub="a", permissions=["orders:read"])
    write = idp.token(audience=AUD, sub="b", permissions=["orders:write"])
    assert seed000.request("GET", "/v1/orders", read).status == 200
    assert seed000.request("GET", "/v1/orders/5", write).status == 403
    assert seed000.request("POST", "/v1/orders", write, body=b"{}").status == 200
    assert seed000.request("PATCH", "/v1/orders/5", read, body=b"{}").status == 403


def test_tenant_isolation(seed000: Stack) -> None:
    token = seed000.idp.token(audience=AUD, sub="a", tenant_id="acme")
    assert seed000.request("GET", "/v1/tenants/acme/orders", token).status == 200
    assert seed000.request("POST", "/v1/tenants/acme/orders", token, body=b"{}").status == 200
    assert seed000.request("GET", "/v1/tenants/globex/orders", token).status == 403
    assert seed000.request("DELETE", "/v1/tenants/acme/orders", token).status == 403
    assert seed000.request("GET", "/v1/tenants/acme", token).status == 403


def test_tenant_claim_full_of_regex_matches_only_itself(seed000: Stack) -> None:
    token = seed000.idp.token(audience=AUD, sub="a", tenant_id=".*")
    assert seed000.request("GET", "/v1/tenants/acme/orders", token).status == 403
    assert seed000.request("GET", "/v1/tenants/.*/orders", token).status == 200


def test_token_without_tenant_claim_is_denied(seed000: Stack) -> None:
    token = seed000.idp.token(audience=AUD, sub="a")
    assert seed000.request("GET", "/v1/tenants/acme/orders", token).status == 403


def test_decision_log_line_per_decision(seed000: Stack) -> None:
    import json

    token = seed000.idp.token(audience=AUD, sub="auditor", tenant_id="acme")
    r = seed000.request("GET", "/v1/tenants/acme/orders", token, headers={"x-request-id": "req-777"})
    assert r.status == 200
    lines = [json.loads(ln) for ln in seed000.sidecar.logs().splitlines() if '"req-777"' in ln]
    assert len(lines) == 1
    entry = lines[0]
    assert entry["event"] == "decision" and entry["result"] == "allow" and entry["sub"] == "auditor"
    assert entry["rule_index"] == 2 and entry["rule_notes"].startswith("Tenant isolation")
    assert entry["proxy"] == "orders-api" and entry["method"] == "GET" and entry["path"] == "/v1/tenants/acme/orders"
    assert isinstance(entry["latency_us"], int) and entry["timestamp"]
    assert token not in seed000.sidecar.logs()
