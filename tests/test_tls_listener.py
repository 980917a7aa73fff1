"""Listener security: mTLS with real Envoy as the client, certificate rotation, Unix sockets.

The TLS listener is the sidecar's own HTTP/2 server unless ``EXTAUTHZ_GRPC_SERVER=grpcio``
(tests/test_tls_lean.py has its limits; tests/e2e/test_tls_envoy.py the shared-service setup).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
import ssl
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc

from extauthz.server.app import GRPC_SERVER_ENV
from tests.e2e.ops_stack import kubelet_layout, kubelet_update, ops_stack, wait_until

POLICY = """providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    rules:
      - {effect: allow, methods: [GET], path: {path: {pattern: "^/v1/orders"}}}
"""
TLS_BLOCK = """server:
  tls:
    certFile: {tls}/tls.crt
    keyFile: {tls}/tls.key
    clientCaFile: {tls}/ca.crt
"""


@dataclass
class Issued:
    cert: bytes
    key: bytes
    serial: int


class CertificateAuthority:
    def __init__(self, name: str) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.UTC)
        self.cert = (
            x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(self.key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(self.key, hashes.SHA256())
        )
        self.pem = self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, name: str, server: bool) -> Issued:
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        serial = x509.random_serial_number()
        builder = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self.cert.subject).public_key(key.public_key()).serial_number(serial)
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return Issued(cert.public_bytes(serialization.Encoding.PEM), key_pem, serial)


def tls_files(ca: CertificateAuthority, server: Issued) -> dict[str, str]:
    return {"tls.crt": server.cert.decode(), "tls.key": server.key.decode(), "ca.crt": ca.pem.decode()}


def envoy_mtls(workdir: Path, ca: CertificateAuthority, client: Issued) -> Any:
    (workdir / "client.crt").write_bytes(client.cert)
    (workdir / "client.key").write_bytes(client.key)
    (workdir / "ca.crt").write_bytes(ca.pem)

    def edit(config: dict[str, Any]) -> None:
        cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz")
        cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": "localhost",
                "common_tls_context": {
                    "alpn_protocols": ["h2"],
                    "tls_certificates": [{"certificate_chain": {"filename": str(workdir / "client.crt")},
                                          "private_key": {"filename": str(workdir / "client.key")}}],
                    "validation_context": {
                        "trusted_ca": {"filename": str(workdir / "ca.crt")},
                        "match_typed_subject_alt_names": [
                            {"san_type": "DNS", "matcher": {"exact": "localhost"}}],
                    },
                },
            },
        }
    return edit


def check(channel: grpc.Channel) -> external_auth_pb2.CheckResponse:
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/v1/orders", host="api")
    request = external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http), context_extensions={"proxy": "orders-api"}))
    response: external_auth_pb2.CheckResponse = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
        request, timeout=5)
    return response


def served_serial(port: int, ca: CertificateAuthority, client: Issued, workdir: Path) -> int:
    """The serial of the certificate the listener presents to a new (client-authenticated) connection."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(cadata=ca.pem.decode())
    context.load_cert_chain(workdir / "client.crt", workdir / "client.key")
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


@pytest.mark.envoy
def test_mtls_envoy_with_a_client_certificate_gets_answers_others_are_refused(tmp_path: Path) -> None:
    ca = CertificateAuthority("extauthz test CA")
    server, client = ca.issue("extauthz", server=True), ca.issue("envoy", server=False)
    kubelet_layout(tmp_path / "tls", tls_files(ca, server))
    policy = POLICY + TLS_BLOCK.format(tls=tmp_path / "tls")
    with ops_stack(tmp_path, policy, edit_envoy=envoy_mtls(tmp_path, ca, client)) as stack:
        token = stack.idp.token(sub="user-1")
        # Answers from the sidecar (not Envoy's own 503 for an unreachable authorizer).
        assert stack.request("GET", "/v1/orders", token).status == 200
        assert stack.request("GET", "/v1/products", token).status == 403
        assert stack.request("GET", "/v1/orders").status == 401

        address = f"localhost:{stack.ports.extauthz}"
        # Right CA, no client certificate: the handshake is refused.
        with grpc.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca.pem)) as channel, \
                pytest.raises(grpc.RpcError) as no_cert:
            check(channel)
        assert no_cert.value.code() is grpc.StatusCode.UNAVAILABLE
        # A client certificate from another CA: refused too.
        stranger = CertificateAuthority("someone else").issue("intruder", server=False)
        credentials = grpc.ssl_channel_credentials(ca.pem, stranger.key, stranger.cert)
        with grpc.secure_channel(address, credentials) as channel, pytest.raises(grpc.RpcError) as wrong_ca:
            check(channel)
        assert wrong_ca.value.code() is grpc.StatusCode.UNAVAILABLE
        # Plaintext: refused.
        with grpc.insecure_channel(address) as channel, pytest.raises(grpc.RpcError) as plaintext:
            check(channel)
        assert plaintext.value.code() is grpc.StatusCode.UNAVAILABLE
        # The right client certificate, straight from a gRPC client: answered.
        credentials = grpc.ssl_channel_credentials(ca.pem, client.key, client.cert)
        with grpc.secure_channel(address, credentials) as channel:
            assert check(channel).denied_response.status.code == 401  # answered: no token, so 401


@pytest.mark.parametrize("server", ["lean", "grpcio"])
def test_rotated_certificates_are_served_without_restart_and_a_broken_rotation_is_ignored(
        tmp_path: Path, server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same on the sidecar's own server (the default) and on grpc.aio (``EXTAUTHZ_GRPC_SERVER=grpcio``)."""
    monkeypatch.setenv(GRPC_SERVER_ENV, server)
    ca = CertificateAuthority("extauthz test CA")
    first, client = ca.issue("extauthz", server=True), ca.issue("envoy", server=False)
    (tmp_path / "client.crt").write_bytes(client.cert)
    (tmp_path / "client.key").write_bytes(client.key)
    mount = tmp_path / "tls"
    kubelet_layout(mount, tls_files(ca, first))
    with ops_stack(tmp_path, POLICY + TLS_BLOCK.format(tls=mount), with_envoy=False) as stack:
        wait_until(lambda: any(e.get("event") == "listening" for e in stack.logs()), "the listening line")
        assert next(e for e in stack.logs() if e.get("event") == "listening")["grpc_server"] == server
        port = stack.ports.extauthz
        assert served_serial(port, ca, client, tmp_path) == first.serial

        # A key that does not match the certificate (a half-done rotation): logged, old one kept.
        other = ca.issue("extauthz", server=True)
        kubelet_update(mount, {**tls_files(ca, other), "tls.key": first.key.decode()}, version=2)
        deadline = time.monotonic() + 30
        while not any(e.get("event") == "tls_reload_failed" for e in stack.logs()):
            assert time.monotonic() < deadline, "the broken rotation was never looked at"
            served_serial(port, ca, client, tmp_path)  # each new connection lets gRPC ask for certificates
            time.sleep(0.2)
        assert served_serial(port, ca, client, tmp_path) == first.serial
        failure = next(e for e in stack.logs() if e.get("event") == "tls_reload_failed")
        assert failure["field"] == "server.tls.keyFile" and "does not belong" in failure["error"]

        # A proper rotation is picked up by the next connections.
        second = ca.issue("extauthz", server=True)
        kubelet_update(mount, tls_files(ca, second), version=3)
        deadline = time.monotonic() + 30
        while served_serial(port, ca, client, tmp_path) != second.serial:
            assert time.monotonic() < deadline, "the rotated certificate was never served"
            time.sleep(0.2)
        assert stack.metric("extauthz_tls_reloads_total", result="ok") == 1.0
        assert stack.metric("extauthz_tls_reloads_total", result="invalid") == 1.0


@pytest.mark.envoy
def test_unix_socket_listener_with_envoy_pipe_address(tmp_path: Path) -> None:
    sock = tmp_path / "extauthz.sock"

    def pipe(config: dict[str, Any]) -> None:
        cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "extauthz")
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"] = {"pipe": {"path": str(sock)}}

    with ops_stack(tmp_path, POLICY, grpc_address=f"unix:{sock}", edit_envoy=pipe) as stack:
        assert sock.is_socket()
        token = stack.idp.token(sub="user-1")
        assert stack.request("GET", "/v1/orders", token).status == 200
        assert stack.request("GET", "/v1/products", token).status == 403
        # No TCP listener was opened on the port the test reserved for it.
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", stack.ports.extauthz)) != 0
