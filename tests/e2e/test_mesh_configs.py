"""Response filtering behind Envoy configs that are not ours, through the real Envoy (docs/response-filtering.md).

Three shapes, none with the shipped ``ExtensionWithMatcher`` nor
``response.code_details``, so ext_proc sees every response, Envoy's own
replies included:

* ``plain``: ``envoy/examples/plain-ext-proc.yaml``, written from Envoy's docs
  (ext_authz, then ext_proc forwarding the ext_authz namespace, request and
  response headers sent, response body BUFFERED);
* ``gateway``: Envoy Gateway v1.9.0's generated gRPC ext auth and ext_proc
  (``tests/fixtures/envoy-gateway``): filters disabled unless a route enables
  them, and ext_proc sends only the response body (``responseHeaderMode: SKIP``);
* ``istio``: Istio 1.30.3's CUSTOM ext_authz (a shadow RBAC filter turns the
  Check on for the policy's paths only) with an ext_proc filter as an
  EnvoyFilter would add it (``tests/fixtures/envoy``).

For each: denials keep their status, ``www-authenticate`` and JSON body; a
route no filter covers answers the upstream's bytes; a filtered route is
filtered; identity headers reach the upstream; and a response with no Check
record where a filter may apply is blocked.
"""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.demo.idp import IdentityProvider
from extauthz.demo.processes import REPO, Envoy, Ports, SidecarProcess, validate_envoy_config
from extauthz.demo.upstream import ORDERS, SampleApi
from tests.e2e.stack import Stack, write_policy
from tests.e2e.test_response_filtering import USER_123_VIEW, policy_text

pytestmark = pytest.mark.envoy

PLAIN = REPO / "envoy" / "examples" / "plain-ext-proc.yaml"
GATEWAY = REPO / "tests" / "fixtures" / "envoy-gateway" / "eg-grpc-ext-auth-ext-proc.yaml"
ISTIO = REPO / "tests" / "fixtures" / "envoy" / "istio-grpc-ext-authz.yaml"
POLICY = policy_text(256 * 1024)

EG_AUTHZ = "envoy.filters.http.ext_authz/securitypolicy/default/policy-for-http-route-1"
EG_PROC = "envoy.filters.http.ext_proc/envoyextensionpolicy/default/policy-for-route-2/extproc/0"

# Cluster name -> what it reaches, per config: the sidecar (Check and ext_proc) or the application.
ROLES: dict[str, dict[str, str]] = {
    "plain": {"extauthz": "sidecar", "extauthz_http": "sidecar-http", "app": "app"},
    "gateway": {"securitypolicy/default/policy-for-http-route-1/default/grpc-backend": "sidecar",
                "envoyextensionpolicy/default/policy-for-route-2/0/grpc-backend-4": "sidecar",
                "httproute/default/httproute-1/rule/0": "app"},
    "istio": {"outbound|9000||my-custom-ext-authz.foo.svc.cluster.local": "sidecar", "inbound|8080||": "app"},
}
SOURCES = {"plain": PLAIN, "gateway": GATEWAY, "istio": ISTIO}


def _key(mapping: dict[str, Any], snake: str) -> str:
    """The key as the config spells it: Envoy reads snake_case and lowerCamelCase alike."""
    if snake in mapping:
        return snake
    head, *rest = snake.split("_")
    return head + "".join(part.title() for part in rest)


def _at(mapping: dict[str, Any], snake: str) -> Any:
    return mapping[_key(mapping, snake)]


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    chain = listener.get("default_filter_chain") or listener.get("defaultFilterChain") or listener["filter_chains"][0]
    manager: dict[str, Any] = _at(chain["filters"][0], "typed_config")
    return manager


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = _at(_at(hcm(config), "route_config"), "virtual_hosts")[0]["routes"]
    return found


def http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = _at(next(f for f in _at(hcm(config), "http_filters") if f["name"] == name), "typed_config")
    return found


def render(name: str, ports: Ports, edit: Callable[[dict[str, Any]], None] | None) -> dict[str, Any]:
    """The config, edited, with the admin, listener and cluster ports made this test's (all on loopback)."""
    config: dict[str, Any] = yaml.safe_load(SOURCES[name].read_text())
    if edit is not None:
        edit(config)
    config["admin"]["address"]["socket_address"]["port_value"] = ports.admin
    for listener in config["static_resources"]["listeners"]:
        socket = _at(listener["address"], "socket_address")
        socket[_key(socket, "port_value")] = ports.listener
        socket["address"] = "127.0.0.1"
    port_of = {"sidecar": ports.extauthz, "sidecar-http": ports.http, "app": ports.app}
    for cluster in config["static_resources"]["clusters"]:
        port = port_of[ROLES[name][cluster["name"]]]
        for group in _at(_at(cluster, "load_assignment"), "endpoints"):
            for endpoint in _at(group, "lb_endpoints"):
                socket = _at(endpoint["endpoint"]["address"], "socket_address")
                socket[_key(socket, "port_value")] = port
    return config


@contextmanager
def mesh_stack(workdir: Path, name: str, edit: Callable[[dict[str, Any]], None] | None = None,
               policy: str = POLICY, http: bool = False) -> Iterator[Stack]:
    """``http``: the sidecar also serves the HTTP ext_authz transport (on ``ports.http``)."""
    ports = Ports.free()
    (workdir / "upstream-api-key.txt").write_text("k")
    with IdentityProvider() as idp, SampleApi(port=ports.app) as upstream:
        sidecar = SidecarProcess(write_policy(workdir, policy, idp), ports.extauthz, log_path=workdir / "sidecar.log",
                                 extra=["--http-address", f"127.0.0.1:{ports.http}"] if http else None)
        envoy = Envoy(render(name, ports, edit), log_path=workdir / "envoy.log")
        try:
            sidecar.start()
            envoy.start()
            yield Stack(idp, upstream, sidecar, envoy, ports, workdir)
        finally:
            envoy.stop()
            sidecar.stop()


def unchecked_route(name: str) -> Callable[[dict[str, Any]], None]:
    """A route (``x-upstream: unchecked``) where ext_authz does not run but ext_proc does."""
    def edit(config: dict[str, Any]) -> None:
        if name == "gateway":
            # Authorization needs the token: what headersToExtAuth: [header1, header2, authorization] generates.
            http_filter(config, EG_AUTHZ)["allowedHeaders"]["patterns"].append(
                {"exact": "authorization", "ignoreCase": True})
        table = routes(config)
        route = json.loads(json.dumps(table[-1]))
        route["match"] = {"prefix": "/", "headers": [{"name": "x-upstream", "string_match": {"exact": "unchecked"}}]}
        per_route = route.setdefault(_key(route, "typed_per_filter_config"), {})
        if name == "gateway":
            del per_route[EG_AUTHZ]  # an HTTPRoute with the EnvoyExtensionPolicy but no SecurityPolicy
        elif name == "plain":
            per_route["envoy.filters.http.ext_authz"] = {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthzPerRoute",
                "disabled": True}
        table.insert(0, route)
        if name == "plain":  # a route naming its proxy in route metadata, one the policy lacks
            named = json.loads(json.dumps(table[-1]))
            named["match"] = {"prefix": "/", "headers": [{"name": "x-upstream", "string_match": {"exact": "named"}}]}
            named["metadata"] = {"filter_metadata": {"extauthz": {"proxy": "no-such-proxy"}}}
            table.insert(0, named)
    return edit


@dataclass
class Mesh:
    name: str
    stack: Stack

    def token(self, sub: str = "user-123") -> str:
        return self.stack.idp.token(sub=sub)

    def log(self) -> str:
        return (self.stack.workdir / "sidecar.log").read_text()


@pytest.fixture(scope="module", params=["plain", "gateway", "istio"])
def mesh(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    name = request.param
    with mesh_stack(tmp_path_factory.mktemp(f"mesh-{name}"), name, unchecked_route(name)) as stack:
        yield Mesh(name, stack)


@pytest.mark.parametrize("path", [PLAIN, GATEWAY, ISTIO], ids=lambda p: p.name)
def test_every_config_here_passes_envoy_validate(path: Path) -> None:
    result = validate_envoy_config(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_request_without_a_token_gets_the_checks_401_with_its_challenge(mesh: Mesh) -> None:
    r = mesh.stack.request("GET", "/v1/orders")
    assert r.status == 401, r.body
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert r.json()["error"] == "token_missing" and r.headers["content-type"] == "application/json"


def test_a_forbidden_request_gets_the_checks_403(mesh: Mesh) -> None:
    before = len(mesh.stack.upstream.requests)
    r = mesh.stack.request("GET", "/v1/secrets", mesh.token())
    assert r.status == 403, r.body
    assert r.json()["error"] == "forbidden" and r.json()["decisionId"]
    assert len(mesh.stack.upstream.requests) == before


def test_a_route_no_filter_covers_answers_the_upstreams_bytes(mesh: Mesh) -> None:
    body = b'{ "products" :[ {"id": 1, "userId": "user-456"},\n {"id": 2} ] }'
    mesh.stack.upstream.routes["/v1/products/odd"] = (200, {"content-type": "application/json"}, body)
    r = mesh.stack.request("GET", "/v1/products/odd", mesh.token())
    assert (r.status, r.body) == (200, body)


def test_a_filtered_route_is_filtered(mesh: Mesh) -> None:
    r = mesh.stack.request("GET", "/v1/orders", mesh.token())
    assert r.status == 200, r.body
    assert r.json() == USER_123_VIEW
    if mesh.name != "gateway":  # Envoy Gateway's response headers left before the body was filtered
        assert r.headers["cache-control"] == "private, no-store"


def test_identity_headers_arrive_upstream(mesh: Mesh) -> None:
    r = mesh.stack.request("GET", "/v1/products/1", mesh.token("user-777"))
    assert r.status == 200
    seen = mesh.stack.last_upstream_request()["headers"]
    assert seen["x-auth-sub"] == "user-777"
    assert seen["authorization"] == "Bearer k"  # the upstream's credential, never the caller's token


def test_a_response_no_check_recorded_is_blocked_where_a_filter_may_apply(mesh: Mesh) -> None:
    """ext_authz skipped (disabled on the route; for Istio, a path outside the CUSTOM policy): no record."""
    headers = {"x-upstream": "unchecked"}
    path = "/v1/orders"
    if mesh.name == "istio":
        headers, path = {}, "/internal/orders"
        mesh.stack.upstream.routes[path] = (200, {"content-type": "application/json"}, json.dumps(ORDERS).encode())
    if mesh.name == "gateway":
        # Only the body reaches ext_proc, after Envoy sent the upstream's headers: blocking it cuts the response.
        with pytest.raises((http.client.IncompleteRead, http.client.RemoteDisconnected)):
            mesh.stack.request("GET", path, mesh.token(), headers=headers)
        return
    r = mesh.stack.request("GET", path, mesh.token(), headers=headers)
    assert r.status == 502, r.body
    assert r.json()["error"] == "no_identity"
    assert b"user-456" not in r.body and b"internalRef" not in r.body


@pytest.mark.parametrize("mesh", ["gateway"], indirect=True)
def test_envoy_gateway_sends_only_bodies_and_the_sidecar_says_so_once(mesh: Mesh) -> None:
    for _ in range(3):
        assert mesh.stack.request("GET", "/v1/orders", mesh.token()).json() == USER_123_VIEW
    assert mesh.log().count("extproc_response_headers_not_sent") == 1


@pytest.mark.parametrize("mesh", ["plain"], indirect=True)
def test_a_route_naming_an_unknown_proxy_in_its_metadata_is_denied(mesh: Mesh) -> None:
    """Route metadata (route_metadata_context_namespaces: [extauthz]) picks the proxy; an unknown one never
    falls back to the host or the default."""
    r = mesh.stack.request("GET", "/v1/products/1", mesh.token(), headers={"x-upstream": "named"})
    assert r.status == 403 and r.json()["error"] == "no_policy"


def test_envoy_gateway_as_generated_without_the_authorization_header_is_said_once(tmp_path: Path) -> None:
    """headersToExtAuth without authorization: every Check is 401, and the sidecar names the setting once."""
    with mesh_stack(tmp_path, "gateway") as stack:
        token = stack.idp.token(sub="user-123")
        for _ in range(25):
            r = stack.request("GET", "/v1/products/1", token)
            assert r.status == 401 and r.json()["error"] == "token_missing"
        log = (tmp_path / "sidecar.log").read_text()
    assert log.count("authorization_header_not_forwarded") == 1
    assert "headersToExtAuth" in log


def test_a_plain_config_that_forwards_no_namespace_is_said_once_and_fails_closed(tmp_path: Path) -> None:
    def edit(config: dict[str, Any]) -> None:
        del http_filter(config, "envoy.filters.http.ext_proc")["metadata_options"]

    with mesh_stack(tmp_path, "plain", edit) as stack:
        token = stack.idp.token(sub="user-123")
        for path in ("/v1/orders", "/v1/products/1", "/v1/orders"):
            r = stack.request("GET", path, token)
            assert r.status == 502 and r.json()["error"] == "no_identity"
            assert b"user-456" not in r.body
        time.sleep(0.2)
        log = (tmp_path / "sidecar.log").read_text()
    assert log.count("extproc_metadata_not_forwarded") == 1
    assert "metadata_options.forwarding_namespaces.untyped" in log


def test_over_the_http_transport_the_record_of_a_denial_reaches_ext_proc_too(tmp_path: Path) -> None:
    """The plain config with the shipped HTTP ext_authz filter: Envoy copies dynamic_metadata_from_headers from a
    denial's answer as from an allow's, so denials and unfiltered routes pass and filtered routes are filtered."""
    shipped = yaml.safe_load((REPO / "envoy" / "envoy-http.yaml").read_text())

    def edit(config: dict[str, Any]) -> None:
        filters = _at(hcm(config), "http_filters")
        filters[0] = next(f for f in _at(hcm(shipped), "http_filters") if f["name"] == "envoy.filters.http.ext_authz")
        cluster = json.loads(json.dumps(next(c for c in config["static_resources"]["clusters"] if c["name"] == "app")))
        cluster["name"] = cluster["load_assignment"]["cluster_name"] = "extauthz_http"
        config["static_resources"]["clusters"].append(cluster)  # its port is the sidecar's HTTP one (ROLES)

    with mesh_stack(tmp_path, "plain", edit, http=True) as stack:
        token = stack.idp.token(sub="user-123")
        denied = stack.request("GET", "/v1/orders")
        assert denied.status == 401 and denied.headers["www-authenticate"].startswith("Bearer")
        assert denied.json()["error"] == "token_missing" and "x-extauthz-record" not in denied.headers
        assert stack.request("GET", "/v1/secrets", token).status == 403
        assert stack.request("GET", "/v1/products/1", token).status == 200
        assert stack.request("GET", "/v1/orders", token).json() == USER_123_VIEW
