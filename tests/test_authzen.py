"""AuthZEN PDPs with the API-gateway profile, through real Envoy.

Requests to concrete URLs (``/todos/abc``) must reach the PDP as the route
template of the OpenAPI document the policy points to (``/todos/{todoId}``),
with the verified ``sub`` as the subject and the method as the action; the
PDP's decision is enforced, and anything but ``{"decision": true}`` denies. The
PDP validates every request against the evaluation schema in OpenFGA's spec
(OpenFGA is one such PDP); without that published description at hand it checks
only the fields it reads, and the test about the schema itself skips.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import deque
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import yaml

from extauthz.policy.errors import PolicyError
from extauthz.policy.loader import parse_policy
from extauthz.relationships.authzen import AuthzenPlan
from tests.e2e.stack import Stack, running_stack
from tests.openfga_server import (
    NO_PUBLISHED_API,
    Scripted,
    has_published_api,
    policy_document,
    published_spec,
    resolver_for,
)

TODO_OPENAPI = """
openapi: 3.0.3
info: {title: Todo API (AuthZEN interop), version: "1.0"}
paths:
  /todos:
    get: {responses: {"200": {description: list}}}
    post: {responses: {"201": {description: created}}}
  /todos/search:
    get: {responses: {"200": {description: "a concrete path, matched before the template"}}}
  /todos/{todoId}:
    parameters: [{name: todoId, in: path, required: true, schema: {type: string}}]
    get: {responses: {"200": {description: one}}}
    put: {responses: {"200": {description: updated}}}
    delete: {responses: {"204": {description: deleted}}}
"""


class Pdp:
    """An AuthZEN PDP: decides from a table of (sub, method, route template), records what it got."""

    def __init__(self, decisions: dict[tuple[str, str, str], bool]) -> None:
        self.decisions = decisions
        spec = published_spec()
        self.validator = spec.validators["/stores/{store_id}/access/v1/evaluation"] if spec is not None else None
        self.requests: list[dict[str, Any]] = []
        self.invalid: list[str] = []
        self.script: deque[Scripted] = deque()
        pdp = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # headers and body go out in two writes

            def do_POST(self) -> None:
                raw = self.rfile.read(int(self.headers.get("content-length") or 0))
                status, body, delay = pdp.handle(self.path, raw)
                time.sleep(delay)
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def handle(self, path: str, raw: bytes) -> tuple[int, bytes, float]:
        if path != "/access/v1/evaluation":
            return 404, b"{}", 0.0
        try:
            body = json.loads(raw)
        except ValueError:
            self.invalid.append("not JSON")
            return 400, b"{}", 0.0
        self.requests.append(body)
        errors = [e.message for e in self.validator.iter_errors(body)] if self.validator is not None \
            else shape_errors(body)
        if errors:
            self.invalid.extend(errors)
            return 400, json.dumps({"code": "validation_error", "message": "; ".join(errors)}).encode(), 0.0
        if self.script:
            s = self.script.popleft()
            return s.status, s.body or b"{}", s.delay
        key = (body["subject"]["id"], body["action"]["name"], body["resource"]["id"])
        return 200, json.dumps({"decision": self.decisions.get(key, False)}).encode(), 0.0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def shape_errors(body: Any) -> list[str]:
    """What the PDP cannot read in an evaluation request (all it checks without the published schema)."""
    fields = (("subject", "id"), ("action", "name"), ("resource", "id"))
    return [f"{outer}.{inner} must be a string" for outer, inner in fields
            if not isinstance(body, dict) or not isinstance(body.get(outer), dict)
            or not isinstance(body[outer].get(inner), str)]


DECISIONS = {
    ("alice", "GET", "/todos"): True,
    ("alice", "GET", "/todos/{todoId}"): True,
    ("alice", "GET", "/todos/search"): True,
    ("alice", "PUT", "/todos/{todoId}"): True,
    ("alice", "DELETE", "/todos/{todoId}"): False,
    ("bob", "GET", "/todos"): True,
}


@pytest.fixture(scope="module")
def pdp() -> Iterator[Pdp]:
    server = Pdp(DECISIONS)
    yield server
    server.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, pdp: Pdp) -> Iterator[Stack]:
    document = policy_document(
        [{"effect": "allow", "path": {"path": {"pattern": "^/todos(/|$)"}}, "authzen": {},
          "notes": "the PDP decides every todo operation"}],
        authzen=[{"name": "todo-pdp", "url": pdp.url, "openapi": "todo-openapi.yaml", "timeoutMs": 250}],
        cache={"allowedTtlSeconds": 60, "deniedTtlSeconds": 60},
        issuer="ISSUER", jwks_uri="JWKS_URI",
    )
    with running_stack(tmp_path_factory.mktemp("authzen"), yaml.safe_dump(document, sort_keys=False),
                       files={"todo-openapi.yaml": TODO_OPENAPI}) as s:
        yield s


@pytest.fixture(autouse=True)
def spec_clean(pdp: Pdp) -> Iterator[None]:
    yield
    assert pdp.invalid == [], pdp.invalid


@pytest.mark.envoy
def test_a_concrete_url_reaches_the_pdp_as_its_route_template(stack: Stack, pdp: Pdp) -> None:
    response = stack.request("GET", "/todos/abc", stack.idp.token(sub="alice"))
    assert response.status == 200
    assert stack.upstream.requests[-1]["path"] == "/todos/abc"
    host = pdp.requests[-1]["resource"]["properties"]["hostname"]
    assert pdp.requests[-1] == {
        "subject": {"type": "identity", "id": "alice"},
        "action": {"name": "GET"},
        "resource": {"type": "route", "id": "/todos/{todoId}",
                     "properties": {"path": "/todos/abc", "hostname": host, "params": {"todoId": "abc"}}},
    }


@pytest.mark.envoy
def test_the_pdp_decision_is_enforced(stack: Stack, pdp: Pdp) -> None:
    alice, bob = stack.idp.token(sub="alice"), stack.idp.token(sub="bob")
    assert stack.request("PUT", "/todos/abc", alice).status == 200
    denied = stack.request("DELETE", "/todos/abc", alice)
    assert denied.status == 403 and denied.json()["error"] == "forbidden"
    assert stack.request("GET", "/todos/abc", bob).status == 403
    assert stack.request("GET", "/todos", bob).status == 200
    assert [(r["subject"]["id"], r["action"]["name"], r["resource"]["id"]) for r in pdp.requests[-4:]] == [
        ("alice", "PUT", "/todos/{todoId}"), ("alice", "DELETE", "/todos/{todoId}"),
        ("bob", "GET", "/todos/{todoId}"), ("bob", "GET", "/todos")]


@pytest.mark.envoy
def test_a_concrete_path_wins_over_a_template(stack: Stack, pdp: Pdp) -> None:
    assert stack.request("GET", "/todos/search", stack.idp.token(sub="alice")).status == 200
    assert pdp.requests[-1]["resource"]["id"] == "/todos/search"
    assert pdp.requests[-1]["resource"]["properties"]["params"] == {}


@pytest.mark.envoy
def test_answers_are_cached(stack: Stack, pdp: Pdp) -> None:
    alice = stack.idp.token(sub="alice")
    before = len(pdp.requests)
    for _ in range(3):
        assert stack.request("GET", "/todos/cached-1", alice).status == 200
        assert stack.request("DELETE", "/todos/cached-1", alice).status == 403
    assert len(pdp.requests) == before + 2


@pytest.mark.envoy
def test_no_route_or_no_operation_denies_without_asking(stack: Stack, pdp: Pdp) -> None:
    alice = stack.idp.token(sub="alice")
    before = len(pdp.requests)
    assert stack.request("PATCH", "/todos/abc", alice).status == 403  # not an operation of the API
    assert stack.request("GET", "/todos/abc/extra", alice).status == 403  # not a path of the API
    assert stack.request("GET", "/todos/abc", stack.idp.token(sub=None)).status == 403  # no subject
    assert len(pdp.requests) == before


@pytest.mark.envoy
@pytest.mark.parametrize("answer", [
    Scripted(200, b'{"decision": "true"}'),
    Scripted(200, b'{"decision": 1}'),
    Scripted(200, b"{}"),
    Scripted(200, b"<html>yes</html>"),
    Scripted(403, b'{"decision": true}'),
])
def test_anything_but_decision_true_denies(stack: Stack, pdp: Pdp, answer: Scripted) -> None:
    pdp.script.append(answer)
    path = f"/todos/odd-{len(pdp.requests)}"  # a fresh resource each time: no cached answer
    assert stack.request("GET", path, stack.idp.token(sub="alice")).status == 403
    assert not pdp.script


# --- route templates, without Envoy -------------------------------------------------


def plan_response(routes: list[str]) -> AuthzenPlan:
    document = policy_document([{"effect": "allow", "authzen": {}}],
                               authzen=[{"name": "pdp", "url": "http://127.0.0.1:1", "routes": routes}])
    policy = parse_policy(yaml.safe_dump(document))
    return AuthzenPlan(policy.authzen["pdp"])


def test_routes_listed_in_the_policy() -> None:
    routes = plan_response(["/users/{userId}/todos/{todo-id}", "/todos/{todoId}", "/todos/search", "/todos"])
    assert routes.match("/todos") is not None and routes.match("/todos")[0].template == "/todos"
    assert routes.match("/todos/search")[0].template == "/todos/search"
    matched = routes.match("/users/u1/todos/t%2F1")
    assert matched is not None and matched[0].template == "/users/{userId}/todos/{todo-id}"
    assert matched[1] == {"userId": "u1", "todo-id": "t%2F1"}
    for path in ("/todos/", "/todos/a/b", "/users/u1/todos", "/Todos/a", "/todosx"):
        assert routes.match(path) is None, path


def test_an_openapi_document_must_exist(tmp_path: Any) -> None:
    document = policy_document([{"effect": "allow", "authzen": {}}],
                               authzen=[{"name": "pdp", "url": "http://127.0.0.1:1", "openapi": "missing.yaml"}])
    with pytest.raises(PolicyError, match="cannot read OpenAPI document"):
        parse_policy(yaml.safe_dump(document), "<test>", tmp_path)


def test_a_pdp_timeout_or_error_is_unresolved(pdp: Pdp) -> None:
    document = policy_document([{"effect": "allow", "authzen": {}}],
                               authzen=[{"name": "pdp", "url": pdp.url, "routes": ["/todos/{todoId}"],
                                         "timeoutMs": 100}])

    async def run() -> list[bool | None]:
        async with resolver_for(document) as h:
            pdp.script.extend([Scripted(200, b'{"decision": true}', delay=0.5)])
            slow = await h.ask(0, claims={"sub": "alice"}, path="/todos/t1")
            pdp.script.extend([Scripted(500), Scripted(500)])
            failing = await h.ask(0, claims={"sub": "alice"}, path="/todos/t2")
            fine = await h.ask(0, claims={"sub": "alice"}, path="/todos/t3")
            return [slow, failing, fine]

    before = len(pdp.requests)
    assert asyncio.run(run()) == [None, None, True]
    assert len(pdp.requests) == before + 4  # timeout: 1 (no retry), 5xx: 2 (one retry), then 1


@pytest.mark.skipif(not has_published_api(), reason=NO_PUBLISHED_API)
def test_the_pdp_rejects_what_the_evaluation_schema_does_not_allow(pdp: Pdp) -> None:
    """The schema the other tests rely on really fails a wrong body: a subject without its type."""
    before = len(pdp.requests)
    body = {"subject": {"id": "alice"}, "action": {"name": "GET"}, "resource": {"type": "route", "id": "/todos"}}
    status, answer, _ = pdp.handle("/access/v1/evaluation", json.dumps(body).encode())
    assert status == 400 and b"'type' is a required property" in answer
    assert pdp.invalid == ["'type' is a required property"]
    pdp.invalid.clear()
    del pdp.requests[before:]
