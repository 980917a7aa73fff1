"""The sidecar's own HTTP/2 server over TLS: what a TLS client meets, and what a peer can no longer hold.

The server runs in this process (on asyncio's loop and on uvloop, the one
``extauthz serve`` uses: their TLS layers are different code), with
certificates the test issues. grpcio's client checks gRPC over TLS and mTLS;
Python's ssl module speaks for the clients no real peer should be: no client
certificate, no ALPN or the wrong one, TLS 1.1, a handshake that never ends.
The sidecar as a process, and through Envoy, is tests/e2e/test_tls_envoy.py.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import socket
import ssl
import struct
import threading
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator, MutableMapping
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import grpc
import pytest
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from extauthz.observability import metrics
from extauthz.policy.model import TlsSettings
from extauthz.server import grpc_lean, http2, listener
from extauthz.server import tls as certificates
from extauthz.server.grpc_lean import LeanGrpcServer, Methods
from extauthz.server.tls import TlsError, read_material
from tests.e2e.ops_stack import kubelet_layout, kubelet_update
from tests.test_tls_listener import CertificateAuthority, tls_files

SIZE, SLOW = "/t.T/Size", "/t.T/Slow"


async def size(message: bytes) -> bytes:
    return str(len(message)).encode()


async def slow(message: bytes) -> bytes:
    await asyncio.sleep(float(message))
    return b"done"


class Pki:
    """A CA, the server's certificate in a kubelet-style mount, and a client certificate, as files."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.ca = CertificateAuthority("extauthz test CA")
        self.server = self.ca.issue("extauthz", server=True)
        self.client = self.ca.issue("envoy", server=False)
        self.mount = directory / "tls"
        kubelet_layout(self.mount, tls_files(self.ca, self.server))
        (directory / "client.crt").write_bytes(self.client.cert)
        (directory / "client.key").write_bytes(self.client.key)

    def settings(self, mtls: bool) -> TlsSettings:
        return TlsSettings(str(self.mount / "tls.crt"), str(self.mount / "tls.key"),
                           str(self.mount / "ca.crt") if mtls else "")

    def rotate(self, files: dict[str, str], version: int) -> None:
        kubelet_update(self.mount, files, version)

    def client_context(self, certificate: bool = True, alpn: list[str] | None = None) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.load_verify_locations(cadata=self.ca.pem.decode())
        if certificate:
            context.load_cert_chain(self.directory / "client.crt", self.directory / "client.key")
        context.set_alpn_protocols(["h2"] if alpn is None else alpn)
        return context

    def grpc_credentials(self, certificate: bool = True) -> grpc.ChannelCredentials:
        if not certificate:
            return grpc.ssl_channel_credentials(self.ca.pem)
        return grpc.ssl_channel_credentials(self.ca.pem, self.client.key, self.client.cert)


class Serving:
    """A lean server on TLS, on its own loop in a thread, for blocking clients in the test."""

    def __init__(self, settings: TlsSettings, loop: str) -> None:
        if loop == "uvloop":
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
        else:
            self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = self.run(self._make(settings))
        self.run(self.server.start())
        self.port = self.server.port

    @staticmethod
    async def _make(settings: TlsSettings) -> LeanGrpcServer:
        return LeanGrpcServer(Methods({SIZE: size, SLOW: slow}, {}), "127.0.0.1:0", tls=settings)

    def run(self, coroutine: Coroutine[Any, Any, Any], timeout: float = 10) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def counts(self) -> tuple[int, int]:
        """Connections and handshakes in progress, as the listener counts them."""
        async def read() -> tuple[int, int]:
            return len(self.server.connections), len(self.server.handshakes)
        result: tuple[int, int] = self.run(read())
        return result

    def call(self, credentials: grpc.ChannelCredentials, message: bytes = b"abc") -> bytes:
        with grpc.secure_channel(f"localhost:{self.port}", credentials) as channel:
            answer: bytes = channel.unary_unary(SIZE)(message, timeout=5)
            return answer

    def close(self) -> None:
        self.run(self.server.stop(1.0))
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


@pytest.fixture(params=["asyncio", "uvloop"])
def loop_name(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    return name


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@contextmanager
def serving(pki: Pki, loop: str, mtls: bool = True) -> Iterator[Serving]:
    running = Serving(pki.settings(mtls), loop)
    try:
        yield running
    finally:
        running.close()


@pytest.fixture
def logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[MutableMapping[str, Any]]]:
    """Every event the TLS listener, the HTTP/2 connections and the certificate reloader log in the test.

    Their module loggers may have been cached, at another level, by whatever configured logging earlier in
    this process (``cache_logger_on_first_use``): fresh ones, at debug, for the test.
    """
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG),
                        cache_logger_on_first_use=False)
    for module in (listener, http2, certificates):
        monkeypatch.setattr(module, "log", structlog.get_logger(module.__name__))
    try:
        with structlog.testing.capture_logs() as captured:
            yield captured
    finally:
        structlog.configure(**saved)


def events(captured: list[MutableMapping[str, Any]], name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in captured if e.get("event") == name]


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.02)


def handshake(pki: Pki, port: int, context: ssl.SSLContext | None = None) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    return (context or pki.client_context()).wrap_socket(raw, server_hostname="localhost")


def served_serial(pki: Pki, port: int) -> int:
    with handshake(pki, port) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der).serial_number


def read_until_closed(sock: socket.socket, timeout: float = 5.0) -> bytes:
    """Everything the server sends until it closes (a reset counts as closed); fails if it does not."""
    sock.settimeout(timeout)
    received = bytearray()
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except (ConnectionError, ssl.SSLError):
        pass
    return bytes(received)


def frames(data: bytes) -> list[tuple[int, int, bytes]]:
    """(type, stream, payload) of each whole HTTP/2 frame in ``data``."""
    out, position = [], 0
    while len(data) - position >= 9:
        length = int.from_bytes(data[position:position + 3], "big")
        kind = data[position + 3]
        stream = struct.unpack(">I", data[position + 5:position + 9])[0] & 0x7FFFFFFF
        out.append((kind, stream, data[position + 9:position + 9 + length]))
        position += 9 + length
    return out


# --- what a TLS client meets ----------------------------------------------------------------------------


@pytest.mark.parametrize("mtls", [False, True], ids=["tls", "mtls"])
def test_grpcio_calls_are_answered_over_tls_and_mtls_on_tls_1_3_with_h2(pki: Pki, loop_name: str,
                                                                          mtls: bool) -> None:
    with serving(pki, loop_name, mtls) as running:
        assert running.call(pki.grpc_credentials(certificate=mtls)) == b"3"
        assert running.call(pki.grpc_credentials(certificate=mtls), b"x" * 200_000) == b"200000"  # flow control
        with handshake(pki, running.port, pki.client_context(certificate=mtls)) as tls:
            assert (tls.version(), tls.selected_alpn_protocol()) == ("TLSv1.3", "h2")
            tls.sendall(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))
            tls.settimeout(5)
            assert frames(tls.recv(65536))[0][0] == http2.SETTINGS  # the server's HTTP/2 speaks first


def test_tls_1_2_is_served_with_ephemeral_aead_suites_only_and_older_versions_are_refused(
        pki: Pki, loop_name: str, logs: list[MutableMapping[str, Any]]) -> None:
    with serving(pki, loop_name) as running:
        context = pki.client_context()
        context.maximum_version = ssl.TLSVersion.TLSv1_2
        with handshake(pki, running.port, context) as tls:
            negotiated = tls.cipher()
            assert negotiated is not None
            cipher, version, _ = negotiated
            assert version == "TLSv1.2" and cipher.startswith("ECDHE-") and ("GCM" in cipher or "CHACHA" in cipher)
        context.set_ciphers("ECDHE+AES128:!AESGCM")  # CBC suites only: not what HTTP/2 may use
        with pytest.raises(ssl.SSLError):
            handshake(pki, running.port, context)
        old = pki.client_context()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the point: a version no one should use
            old.minimum_version = old.maximum_version = ssl.TLSVersion.TLSv1_1
        old.set_ciphers("ALL:@SECLEVEL=0")
        with pytest.raises(ssl.SSLError):
            handshake(pki, running.port, old)
        wait_for(lambda: len(events(logs, "tls_handshake_failed")) >= 2, "both refusals logged")
        reasons = [e["reason"] for e in events(logs, "tls_handshake_failed")]
        assert any("NO_SHARED_CIPHER" in r for r in reasons) and any("PROTOCOL" in r for r in reasons), reasons


def test_mtls_refuses_clients_without_a_certificate_or_with_another_cas(pki: Pki, loop_name: str,
                                                                      logs: list[MutableMapping[str, Any]]) -> None:
    stranger = CertificateAuthority("someone else").issue("intruder", server=False)
    with serving(pki, loop_name) as running:
        with pytest.raises(grpc.RpcError) as no_certificate:
            running.call(pki.grpc_credentials(certificate=False))
        assert no_certificate.value.code() is grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as other_ca:
            running.call(grpc.ssl_channel_credentials(pki.ca.pem, stranger.key, stranger.cert))
        assert other_ca.value.code() is grpc.StatusCode.UNAVAILABLE
        with grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel, pytest.raises(grpc.RpcError) as plain:
            channel.unary_unary(SIZE)(b"abc", timeout=5)
        assert plain.value.code() is grpc.StatusCode.UNAVAILABLE
        assert running.call(pki.grpc_credentials()) == b"3"  # and the right client is still answered
        wait_for(lambda: len(events(logs, "tls_handshake_failed")) >= 3, "the refusals logged")
    reasons = [e["reason"] for e in events(logs, "tls_handshake_failed")]
    assert any("PEER_DID_NOT_RETURN_A_CERTIFICATE" in r for r in reasons), reasons
    assert any("CERTIFICATE_VERIFY_FAILED" in r for r in reasons), reasons
    assert any("WRONG_VERSION_NUMBER" in r or "HTTP_REQUEST" in r for r in reasons), reasons  # cleartext HTTP/2
    for line in events(logs, "tls_handshake_failed"):
        assert line["log_level"] == "info" and "exc_info" not in line and "exception" not in line


@pytest.mark.parametrize("alpn", [[], ["http/1.1"], ["grpc-exp", "http/1.1"]], ids=["none", "http1", "others"])
def test_a_handshake_that_does_not_select_h2_is_refused_before_a_byte_of_http2(
        pki: Pki, loop_name: str, logs: list[MutableMapping[str, Any]], alpn: list[str]) -> None:
    with serving(pki, loop_name) as running:
        with handshake(pki, running.port, pki.client_context(alpn=alpn)) as tls:
            assert tls.selected_alpn_protocol() is None
            with _ignored_if_already_closed():
                tls.sendall(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))
            assert read_until_closed(tls) == b""  # no SETTINGS, no GOAWAY: HTTP/2 never started
        wait_for(lambda: bool(events(logs, "tls_handshake_failed")), "the refusal logged")
        assert "only h2 is served" in events(logs, "tls_handshake_failed")[0]["reason"]
        assert running.counts() == (0, 0)


def _ignored_if_already_closed() -> suppress:
    """The write may fail or not, depending on when the server's close arrives: either is a refusal."""
    return suppress(ConnectionError, ssl.SSLError, OSError)


def resumed(context: ssl.SSLContext, port: int, session: ssl.SSLSession | None,
            ) -> tuple[bool, int, ssl.SSLSession | None]:
    """A connection offering ``session``: whether it was resumed, the serving certificate's serial, its session."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    with context.wrap_socket(raw, server_hostname="localhost", session=session) as tls:
        tls.sendall(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))
        tls.settimeout(5)
        tls.recv(65536)  # TLS 1.3's tickets come after the handshake
        der = tls.getpeercert(binary_form=True)
        serial = x509.load_der_x509_certificate(der).serial_number if der else 0  # none on resumption
        return tls.session_reused, serial, tls.session


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3], ids=["tls1.2", "tls1.3"])
def test_sessions_resume_from_tickets_only_the_server_holds_none_and_a_rotation_ends_them(
        pki: Pki, loop_name: str, version: ssl.TLSVersion) -> None:
    context = pki.client_context()
    context.maximum_version = version
    with serving(pki, loop_name) as running:
        port = running.port
        reused, serial, session = resumed(context, port, None)
        assert not reused and serial == pki.server.serial
        for _ in range(5):
            assert resumed(context, port, session)[0]

        async def cached() -> int:
            assert running.server.tls is not None
            return int(running.server.tls.current.session_stats()["number"])
        assert running.run(cached()) == 0  # stateless tickets: nothing kept per session

        second = pki.ca.issue("extauthz", server=True)
        pki.rotate(tls_files(pki.ca, second), version=2)
        wait_for(lambda: served_serial(pki, port) == second.serial, "the rotated certificate served", 30)
        reused, serial, _ = resumed(context, port, session)  # a ticket from before the rotation
        assert not reused and serial == second.serial


# --- certificates rotated on disk -------------------------------------------------------------------------


def test_a_rotated_certificate_is_served_to_the_next_handshake_and_a_broken_one_keeps_the_old(
        pki: Pki, loop_name: str, logs: list[MutableMapping[str, Any]]) -> None:
    reloads = metrics.tls_reloads.labels("ok")._value.get(), metrics.tls_reloads.labels("invalid")._value.get()
    with serving(pki, loop_name) as running:
        port = running.port
        assert served_serial(pki, port) == pki.server.serial

        def looked_at(port: int) -> bool:
            served_serial(pki, port)  # the files are looked at when a handshake starts
            return bool(events(logs, "tls_reload_failed"))

        established = handshake(pki, port)  # keeps its session through both rotations
        established.sendall(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))
        try:
            # A key that does not match the certificate (a half-done rotation): logged, the old one kept.
            other = pki.ca.issue("extauthz", server=True)
            pki.rotate({**tls_files(pki.ca, other), "tls.key": pki.server.key.decode()}, version=2)
            wait_for(lambda: looked_at(port), "the broken rotation looked at", timeout=30)
            assert served_serial(pki, port) == pki.server.serial
            failure = events(logs, "tls_reload_failed")[0]
            assert failure["field"] == "server.tls.keyFile" and "does not belong" in failure["error"]

            # A proper rotation: the next handshake gets it.
            second = pki.ca.issue("extauthz", server=True)
            pki.rotate(tls_files(pki.ca, second), version=3)
            wait_for(lambda: served_serial(pki, port) == second.serial, "the rotated certificate served", 30)
            assert next(iter(metrics.tls_not_after.collect())).samples[0].value == pytest.approx(
                x509.load_pem_x509_certificate(second.cert).not_valid_after_utc.timestamp())
            assert (metrics.tls_reloads.labels("ok")._value.get() - reloads[0],
                    metrics.tls_reloads.labels("invalid")._value.get() - reloads[1]) == (1, 1)
            assert running.call(pki.grpc_credentials()) == b"3"

            # The connection made before both still has the first certificate and is still served.
            der = established.getpeercert(binary_form=True)
            assert der is not None and x509.load_der_x509_certificate(der).serial_number == pki.server.serial
            established.settimeout(5)
            assert frames(established.recv(65536))[0][0] == http2.SETTINGS
        finally:
            established.close()


def test_a_tls_connection_ends_gracefully_at_its_age_so_a_rotation_reaches_every_peer(
        pki: Pki, loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "TLS_MAX_AGE_SECONDS", 0.5)
    monkeypatch.setattr(http2, "TICK_SECONDS", 0.05)
    with serving(pki, loop_name) as running, \
            grpc.secure_channel(f"localhost:{running.port}", pki.grpc_credentials()) as channel:
        with handshake(pki, running.port) as tls:  # a peer that keeps its connection
            tls.sendall(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))
            tls.settimeout(5)
            received: list[tuple[int, int, bytes]] = []
            while not any(kind == http2.PING for kind, _, _ in received):
                received += frames(tls.recv(65536))
            goaway = next(payload for kind, _, payload in received if kind == http2.GOAWAY)
            assert int.from_bytes(goaway[:4], "big") == http2.LAST_STREAM  # graceful: streams sent meanwhile served
            ping = next(payload for kind, _, payload in received if kind == http2.PING)
            tls.sendall(http2.frame(http2.PING, http2.ACK, 0, ping))
            final = [payload for kind, _, payload in frames(read_until_closed(tls)) if kind == http2.GOAWAY]
            assert final and int.from_bytes(final[-1][4:8], "big") == http2.NO_ERROR
        call = channel.unary_unary(SIZE)
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:  # grpcio's channel reconnects, with a new handshake, and carries on
            assert call(b"abc", timeout=5) == b"3"


def test_calls_still_in_progress_past_the_age_and_its_grace_are_cut(
        pki: Pki, loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "TLS_MAX_AGE_SECONDS", 0.3)
    monkeypatch.setattr(http2, "MAX_AGE_GRACE_SECONDS", 0.5)
    monkeypatch.setattr(http2, "TICK_SECONDS", 0.05)
    with serving(pki, loop_name) as running, \
            grpc.secure_channel(f"localhost:{running.port}", pki.grpc_credentials()) as channel:
        assert channel.unary_unary(SLOW)(b"0.1", timeout=5) == b"done"  # within the grace: answered
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as cut:
            channel.unary_unary(SLOW)(b"30", timeout=10)
        assert cut.value.code() is grpc.StatusCode.UNAVAILABLE and time.monotonic() - started < 3


def test_a_cleartext_connection_has_no_age(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "TLS_MAX_AGE_SECONDS", 0.2)
    monkeypatch.setattr(http2, "TICK_SECONDS", 0.05)

    async def main() -> None:
        server = LeanGrpcServer(Methods({SIZE: size}, {}), "127.0.0.1:0")
        await server.start()
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0))
            await asyncio.sleep(0.6)
            received = frames(await reader.read(65536))
            assert [kind for kind, _, _ in received] == [http2.SETTINGS, http2.WINDOW_UPDATE, http2.SETTINGS]
            writer.close()
        finally:
            await server.stop(0.5)

    asyncio.run(main())


def test_a_listener_whose_certificate_cannot_serve_does_not_start(pki: Pki) -> None:
    pki.rotate({**tls_files(pki.ca, pki.ca.issue("x", server=True)), "tls.key": pki.server.key.decode()}, 2)
    with pytest.raises(TlsError) as refused:
        LeanGrpcServer(Methods({SIZE: size}, {}), "127.0.0.1:0", tls=pki.settings(mtls=True))
    assert refused.value.field == "keyFile"


def test_a_certificate_openssl_will_not_serve_is_refused_as_the_policy_is_checked(pki: Pki, tmp_path: Path) -> None:
    """A 1024-bit RSA key parses and matches its certificate, but OpenSSL refuses it at its default security level:
    ``extauthz validate`` (which reads the files the same way) says so, rather than the listener failing to start."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "weak")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    (tmp_path / "weak.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "weak.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    with pytest.raises(TlsError) as refused:
        read_material(TlsSettings(str(tmp_path / "weak.crt"), str(tmp_path / "weak.key")))
    assert refused.value.field == "certFile" and "OpenSSL will not serve" in refused.value.message
    assert "KEY_TOO_SMALL" in refused.value.message


# --- what a peer can make it hold: the transport's limits, over TLS ------------------------------------------


def test_a_peer_that_never_finishes_its_handshake_is_closed_at_the_preface_timeout(
        pki: Pki, loop_name: str, logs: list[MutableMapping[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(http2, "PREFACE_SECONDS", 0.6)
    monkeypatch.setattr(http2, "TICK_SECONDS", 0.05)
    with serving(pki, loop_name) as running:
        silent = socket.create_connection(("127.0.0.1", running.port))
        trickle = socket.create_connection(("127.0.0.1", running.port))
        trickle.sendall(b"\x16\x03\x01\x02\x00")  # a ClientHello's record header, and then nothing
        started = time.monotonic()
        try:
            wait_for(lambda: running.counts() == (0, 2), "both counted as connections in a handshake")
            for sock in (silent, trickle):
                assert read_until_closed(sock) == b""
            assert 0.5 < time.monotonic() - started < 3.0
            assert running.counts() == (0, 0)
        finally:
            silent.close()
            trickle.close()
        # Handshake done, preface never sent: the same deadline, counted from the accept.
        with handshake(pki, running.port) as tls:
            done = time.monotonic()
            data = read_until_closed(tls)
            assert [kind for kind, _, _ in frames(data)][-1] == http2.GOAWAY
            assert time.monotonic() - done < 3.0
        wait_for(lambda: len(events(logs, "tls_handshake_failed")) >= 2, "the timeouts logged")
    reasons = [e["reason"] for e in events(logs, "tls_handshake_failed")]
    assert reasons.count("no TLS handshake within 0.6 s") == 2, reasons
    assert any(e["reason"] == "no HTTP/2 preface" for e in events(logs, "http2_connection_timeout"))


def test_connections_in_a_handshake_count_against_the_cap_and_make_room_first(
        pki: Pki, loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(grpc_lean, "MAX_CONNECTIONS", 3)
    with serving(pki, loop_name) as running, \
            grpc.secure_channel(f"localhost:{running.port}", pki.grpc_credentials()) as channel:
        call = channel.unary_unary(SIZE)
        assert call(b"abc", timeout=5) == b"3"
        hoarders = [socket.create_connection(("127.0.0.1", running.port)) for _ in range(6)]
        try:
            wait_for(lambda: running.counts() == (1, 2), "the cap held, handshakes in it")
            assert call(b"abcd", timeout=5) == b"4"  # the client's answered connection was not evicted
            closed = 0
            for sock in hoarders:
                sock.settimeout(0.5)
                try:
                    closed += sock.recv(1) == b""
                except ConnectionError:
                    closed += 1
                except TimeoutError:
                    pass
            assert closed == 4  # four hoarders made room; two still hold their places
        finally:
            for sock in hoarders:
                sock.close()


def test_a_protocol_error_over_tls_ends_with_goaway_and_the_connection_closes(pki: Pki, loop_name: str) -> None:
    with serving(pki, loop_name) as running, handshake(pki, running.port) as tls:
        oversized = http2.frame(http2.HEADERS, http2.END_HEADERS, 1, b"\x00" * (http2.FRAME_SIZE + 1))
        tls.sendall(http2.PREFACE + http2.frame(http2.SETTINGS, 0, 0) + oversized)
        received = frames(read_until_closed(tls))
        goaway = [payload for kind, _, payload in received if kind == http2.GOAWAY]
        assert goaway and int.from_bytes(goaway[-1][4:8], "big") == http2.FRAME_SIZE_ERROR
        wait_for(lambda: running.counts() == (0, 0), "the connection gone")


def test_tls_connections_closing_after_an_error_are_bounded_like_lingering_ones(
        pki: Pki, loop_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that leaves the server's close_notify unanswered holds its connection for the shutdown timeout at
    most, and only so many at once: past the bound, the next closes at once."""
    monkeypatch.setattr(listener, "MAX_LINGERING", 2)
    monkeypatch.setattr(listener, "_closing_tls", {})
    with serving(pki, loop_name) as running:
        peers = [handshake(pki, running.port) for _ in range(4)]
        try:
            wait_for(lambda: running.counts() == (4, 0), "four connections")
            stray = http2.frame(http2.CONTINUATION, http2.END_HEADERS, 1)  # a CONTINUATION without its HEADERS
            for tls in peers:  # each breaks the protocol, then never answers the server's close_notify
                tls.sendall(http2.PREFACE + stray)
            wait_for(lambda: running.counts() == (2, 0), "two closed at once, two waiting for the peer")
            started = time.monotonic()
            wait_for(lambda: running.counts() == (0, 0), "the two waiting ones closed",
                     timeout=listener.LINGER_SECONDS + 3)
            assert time.monotonic() - started < listener.LINGER_SECONDS + 1
        finally:
            for tls in peers:
                tls.close()


def test_handshake_failures_are_logged_within_a_budget_with_what_was_left_out(
        pki: Pki, logs: list[MutableMapping[str, Any]], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(listener, "HANDSHAKE_LOG_BURST", 2)
    monkeypatch.setattr(listener, "HANDSHAKE_LOG_WINDOW", 0.5)
    with serving(pki, "asyncio") as running:
        def refused() -> None:
            with socket.create_connection(("127.0.0.1", running.port)) as sock:
                sock.sendall(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
                read_until_closed(sock)

        for _ in range(5):
            refused()
        wait_for(lambda: running.counts() == (0, 0), "all refused")
        assert len(events(logs, "tls_handshake_failed")) == 2
        time.sleep(0.6)
        refused()
        wait_for(lambda: len(events(logs, "tls_handshake_failed")) == 3, "the next window's line")
    assert events(logs, "tls_handshake_failed")[-1]["unlogged"] == 3


def test_stopping_drops_connections_still_in_a_handshake(pki: Pki, loop_name: str) -> None:
    running = Serving(pki.settings(mtls=True), loop_name)
    try:
        sock = socket.create_connection(("127.0.0.1", running.port))
        wait_for(lambda: running.counts() == (0, 1), "the handshake counted")
        started = time.monotonic()
        running.run(running.server.stop(5.0))
        assert read_until_closed(sock) == b"" and time.monotonic() - started < 2.0
        sock.close()
    finally:
        running.loop.call_soon_threadsafe(running.loop.stop)
        running.thread.join(5)
