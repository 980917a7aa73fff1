"""``extauthz serve`` on TLS as a shared service: grpcio clients, and the real Envoy over an upstream TLS cluster.

The listener is the sidecar's own HTTP/2 server on asyncio's TLS (grpc.aio only
with ``EXTAUTHZ_GRPC_SERVER=grpcio``). Envoy reaches it as Envoy Gateway or
Istio would reach a Deployment behind a Service: an ``UpstreamTlsContext`` with
``alpn_protocols: [h2]``, TLS 1.3 allowed (Envoy's upstream default stops at
1.2), its client certificate presented; the config is checked with
``envoy --mode validate`` before it carries traffic. Checks and the response
phase's ext_proc stream both go over that cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.demo.processes import validate_envoy_config
from tests.e2e.ops_stack import OpsStack, kubelet_layout, ops_stack, wait_until
from tests.e2e.test_response_filtering import USER_123_VIEW, policy_text
from tests.test_tls_listener import CertificateAuthority, Issued, tls_files

ORDERS_POLICY = """providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    rules:
      - {effect: allow, methods: [GET], path: {path: {pattern: "^/v1/orders"}}}
"""


def with_tls(policy: str, mount: Path, mtls: bool) -> str:
    document: dict[str, Any] = yaml.safe_load(policy)
    document.setdefault("server", {})["tls"] = {
        "certFile": str(mount / "tls.crt"), "keyFile": str(mount / "tls.key"),
        **({"clientCaFile": str(mount / "ca.crt")} if mtls else {})}
    return str(yaml.safe_dump(document, sort_keys=False))


def upstream_tls(workdir: Path, ca: CertificateAuthority, client: Issued | None, alpn: bool = True) -> Any:
    """The shipped config's extauthz cluster over TLS: ALPN h2, TLS 1.2-1.3, the server's name checked.

    Without ``alpn``, no ``alpn_protocols``, as Envoy Gateway's and Istio's clusters are generated: Envoy then
    offers ``h2`` by itself for an HTTP/2 cluster.
    """
    (workdir / "ca.crt").write_bytes(ca.pem)
    certificates = []
    if client is not None:
        (workdir / "client.crt").write_bytes(client.cert)
        (workdir / "client.key").write_bytes(client.key)
        certificates = [{"certificate_chain": {"filename": str(workdir / "client.crt")},
                         "private_key": {"filename": str(workdir / "client.key")}}]

    def edit(config: dict[str, Any]) -> None:
        cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz")
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": {
                    **({"alpn_protocols": ["h2"]} if alpn else {}),
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2",
                                   "tls_maximum_protocol_version": "TLSv1_3"},
                    "tls_certificates": certificates,
                    "validation_context": {
                        "trusted_ca": {"filename": str(workdir / "ca.crt")},
                        "match_typed_subject_alt_names": [{"san_type": "DNS", "matcher": {"exact": "localhost"}}],
                    },
                },
            },
        }
    return edit


def listening(stack: OpsStack) -> dict[str, Any]:
    """The sidecar's ``listening`` line (written once its listener is up, possibly just after /readyz answers)."""
    wait_until(lambda: any(e.get("event") == "listening" for e in stack.logs()), "the listening line")
    return next(e for e in stack.logs() if e.get("event") == "listening")


def check(channel: grpc.Channel, token: str | None) -> external_auth_pb2.CheckResponse:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/v1/orders", host="api",
                                                              headers=headers)
    request = external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http), context_extensions={"proxy": "orders-api"}))
    response: external_auth_pb2.CheckResponse = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
        request, timeout=5)
    return response


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_grpcio_clients_get_checks_and_health_answered_over_tls_and_mtls(tmp_path: Path, mtls: bool) -> None:
    ca = CertificateAuthority("extauthz test CA")
    server, client = ca.issue("extauthz", server=True), ca.issue("envoy", server=False)
    kubelet_layout(tmp_path / "tls", tls_files(ca, server))
    with ops_stack(tmp_path, with_tls(ORDERS_POLICY, tmp_path / "tls", mtls), with_envoy=False) as stack:
        assert (listening(stack)["grpc_server"], listening(stack)["tls"]) == ("lean", "mtls" if mtls else "tls")
        address = f"localhost:{stack.ports.extauthz}"
        credentials = grpc.ssl_channel_credentials(ca.pem, client.key, client.cert) if mtls \
            else grpc.ssl_channel_credentials(ca.pem)
        with grpc.secure_channel(address, credentials) as channel:
            allowed = check(channel, stack.idp.token(sub="user-1"))
            assert allowed.status.code == 0 and allowed.HasField("ok_response")
            assert check(channel, None).denied_response.status.code == 401
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
        if mtls:  # the right CA but no client certificate: the handshake is refused, the reason logged
            with grpc.secure_channel(address, grpc.ssl_channel_credentials(ca.pem)) as channel, \
                    pytest.raises(grpc.RpcError) as refused:
                check(channel, stack.idp.token(sub="user-1"))
            assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as plaintext:
            check(channel, None)
        assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE
        refusals = 2 if mtls else 1

        def failed() -> list[dict[str, Any]]:
            return [e for e in stack.logs() if e.get("event") == "tls_handshake_failed"]

        wait_until(lambda: len(failed()) >= refusals, "the refused handshakes logged")
        assert all(e["level"] == "info" for e in failed())
        assert "Traceback" not in stack.log_path.read_text()
        reasons = [e["reason"] for e in failed()]
        assert any("WRONG_VERSION_NUMBER" in r or "HTTP_REQUEST" in r for r in reasons), reasons  # cleartext
        if mtls:
            assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in r for r in reasons), reasons


@pytest.mark.envoy
@pytest.mark.parametrize("alpn", [True, False], ids=["alpn_h2", "alpn_unset"])
def test_envoy_over_an_upstream_mtls_cluster_gets_checks_and_filtered_responses(tmp_path: Path, alpn: bool) -> None:
    ca = CertificateAuthority("extauthz test CA")
    server, client = ca.issue("extauthz", server=True), ca.issue("envoy", server=False)
    kubelet_layout(tmp_path / "tls", tls_files(ca, server))
    policy = with_tls(policy_text(256 * 1024), tmp_path / "tls", mtls=True)
    (tmp_path / "upstream-api-key.txt").write_text("k")  # the example policy's upstream credential
    with ops_stack(tmp_path, policy, edit_envoy=upstream_tls(tmp_path, ca, client, alpn)) as stack:
        assert stack.envoy is not None
        validated = validate_envoy_config(stack.envoy.config_path)
        assert validated.returncode == 0, validated.stdout + validated.stderr
        assert (listening(stack)["grpc_server"], listening(stack)["tls"]) == ("lean", "mtls")

        token = stack.idp.token(sub="user-123")
        orders = stack.request("GET", "/v1/orders", token)  # a Check, then ext_proc's stream, both over mTLS
        assert orders.status == 200 and orders.json() == USER_123_VIEW
        assert stack.request("DELETE", "/v1/orders", token).status == 403
        assert stack.request("GET", "/v1/orders").status == 401

        stats = stack.envoy.stats()
        handshakes = stats["cluster.extauthz.ssl.handshake"]
        assert handshakes >= 1 and stats.get("cluster.extauthz.ssl.versions.TLSv1.3", 0) == handshakes
        assert stats.get("cluster.extauthz.ssl.fail_verify_error", 0) == 0
        assert stats["http.ingress.ext_proc.streams_started"] >= 1
        assert not any(e.get("event") == "tls_handshake_failed" for e in stack.logs())  # h2 selected either way


@pytest.mark.envoy
def test_envoy_without_its_client_certificate_is_refused_and_fails_closed(tmp_path: Path) -> None:
    ca = CertificateAuthority("extauthz test CA")
    kubelet_layout(tmp_path / "tls", tls_files(ca, ca.issue("extauthz", server=True)))
    policy = with_tls(ORDERS_POLICY, tmp_path / "tls", mtls=True)
    with ops_stack(tmp_path, policy, edit_envoy=upstream_tls(tmp_path, ca, client=None)) as stack:
        assert stack.envoy is not None
        answer = stack.request("GET", "/v1/orders", stack.idp.token(sub="user-1"))
        assert answer.status == 503  # the shipped config's failure answer: never an allow
        wait_until(lambda: any(e.get("event") == "tls_handshake_failed"
                               and "PEER_DID_NOT_RETURN_A_CERTIFICATE" in e["reason"] for e in stack.logs()),
                   "the refused handshake logged with its reason")
