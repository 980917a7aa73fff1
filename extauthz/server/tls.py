"""TLS and mTLS on the gRPC listener, with certificates re-read when their files change.

Certificates come from mounted files (a Kubernetes Secret, cert-manager), which
are rotated in place. Whoever serves asks :class:`CertificateReloader` at the
start of every new TLS handshake: grpc.aio through its *certificate
configuration fetcher*, the sidecar's own HTTP/2 server for the
:class:`ssl.SSLContext` of each connection it accepts. The reloader looks at
the files' identity (resolved path, inode, size, mtime) at most once a second
and re-reads them only when that changed, so connections never wait on disk
I/O. A new certificate is checked before it is used (PEM parses, the key
matches the certificate, not expired, the client CA parses, the TLS library
takes it); a broken or half-rotated one is logged and the previous
configuration keeps serving. Established connections keep their session.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import ssl
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from extauthz.errors import ExtauthzError
from extauthz.observability import metrics
from extauthz.policy.model import TlsSettings

log = structlog.get_logger("extauthz.tls")

CHECK_INTERVAL_SECONDS = 1.0
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
"""TLS 1.2 suites: ephemeral key exchange and AEAD only, as HTTP/2 requires (RFC 9113, 9.2.2) and gRPC's own
servers offer. TLS 1.3's suites all qualify, and TLS 1.3 is chosen whenever the client offers it."""

T = TypeVar("T")


class TlsError(ExtauthzError, ValueError):
    """A TLS file that cannot serve; ``field`` names the policy field (``certFile``...)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class TlsMaterial:
    chain: bytes
    key: bytes
    client_ca: bytes | None
    not_after: datetime.datetime
    subject: str


FileIdentity = tuple[str, int, int, int, int]


def _identity(path: str) -> FileIdentity | None:
    """What changes when kubelet swaps ``..data`` or a file is rewritten in place."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read(path: str, field: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise TlsError(field, f"cannot read {path}: {exc.strerror}") from None


def read_material(settings: TlsSettings, now: datetime.datetime | None = None) -> TlsMaterial:
    """Read and check the certificate, key and client CA; raises :class:`TlsError`."""
    chain = _read(settings.cert_file, "certFile")
    key_pem = _read(settings.key_file, "keyFile")
    try:
        certificates = x509.load_pem_x509_certificates(chain)
    except ValueError as exc:
        raise TlsError("certFile", f"{settings.cert_file} is not a PEM certificate chain: {exc}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise TlsError("keyFile", f"{settings.key_file} is not an unencrypted PEM private key: {exc}") from None
    leaf = certificates[0]
    public = serialization.PublicFormat.SubjectPublicKeyInfo
    if key.public_key().public_bytes(serialization.Encoding.DER, public) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, public):
        raise TlsError("keyFile", f"{settings.key_file} does not belong to the certificate in {settings.cert_file}")
    moment = now or datetime.datetime.now(datetime.UTC)
    if leaf.not_valid_after_utc <= moment:
        raise TlsError("certFile", f"the certificate in {settings.cert_file} expired at "
                       f"{leaf.not_valid_after_utc.isoformat()}")
    client_ca = None
    if settings.client_ca_file:
        client_ca = _read(settings.client_ca_file, "clientCaFile")
        try:
            x509.load_pem_x509_certificates(client_ca)
        except ValueError as exc:
            raise TlsError("clientCaFile", f"{settings.client_ca_file} is not a PEM CA bundle: {exc}") from None
    try:  # what OpenSSL will not serve at its default security level (RSA under 2048 bits, SHA-1 signatures)
        _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER), chain, key_pem)
    except ssl.SSLError as exc:
        raise TlsError("certFile", f"OpenSSL will not serve the certificate in {settings.cert_file} with its key: "
                       f"{exc.reason or exc}") from None
    return TlsMaterial(chain, key_pem, client_ca, leaf.not_valid_after_utc, leaf.subject.rfc4514_string())


def grpc_configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(material.key, material.chain)], material.client_ca)


@contextlib.contextmanager
def _in_memory(content: bytes) -> Iterator[str]:
    """A path whose file holds ``content``, for OpenSSL, which loads a certificate and key only from a file.

    The bytes loaded are the very bytes :func:`read_material` read and checked
    (the mounted files may have changed since). In memory (``memfd``) where the
    system has it; else a private temporary file, removed once loaded.
    """
    memfd = getattr(os, "memfd_create", None)
    if memfd is not None and os.path.isdir("/proc/self/fd"):
        fd = memfd("extauthz-tls", os.MFD_CLOEXEC)
        try:
            os.write(fd, content)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    fd, path = tempfile.mkstemp(prefix="extauthz-tls-")  # mode 0600
    try:
        os.write(fd, content)
        os.close(fd)
        yield path
    finally:
        os.unlink(path)


def _load_chain(context: ssl.SSLContext, chain: bytes, key: bytes) -> None:
    with _in_memory(chain) as chain_path, _in_memory(key) as key_path:
        context.load_cert_chain(chain_path, key_path, password=b"")  # a password: never a prompt on a terminal


def server_context(material: TlsMaterial, alpn: str) -> ssl.SSLContext:
    """The :class:`ssl.SSLContext` the sidecar's own server handshakes with; raises :class:`ssl.SSLError`.

    TLS 1.2 or 1.3 (1.3 when the client offers it); ``alpn`` is the only
    protocol offered (the listener refuses a handshake that did not select
    it); no renegotiation (HTTP/2 forbids it). With a client CA, a client
    certificate it signed is required.

    Sessions resume only from stateless tickets (OpenSSL's default, kept on
    purpose): the server keeps no session, so no peer can make it hold any.
    Turning tickets off would not stop resumption in TLS 1.2 but move it to
    OpenSSL's server-side session cache (up to 20,480 sessions per context).
    The ticket keys belong to this context, and every rotation builds a new
    one: a ticket issued before it is refused after it, and that client gets
    a full handshake with the new certificate and the new client CA.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    context.set_alpn_protocols([alpn])
    _load_chain(context, material.chain, material.key)
    if material.client_ca is not None:
        # As DER: load_verify_locations takes PEM text only as ASCII, and a bundle may carry other text.
        der = b"".join(c.public_bytes(serialization.Encoding.DER)
                       for c in x509.load_pem_x509_certificates(material.client_ca))
        context.load_verify_locations(cadata=der)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


class CertificateReloader(Generic[T]):
    """The serving configuration (``T``, built from the files by ``build``), rebuilt when the files change.

    Called (``reloader()``), it is gRPC's certificate configuration fetcher: the
    new configuration after a rotation, None to keep the current one.
    :meth:`latest` is the configuration a new handshake should use.
    """

    def __init__(self, settings: TlsSettings, build: Callable[[TlsMaterial], T],
                 interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self.settings = settings
        self.interval = interval
        self._build = build
        self._lock = threading.Lock()  # gRPC may call from its own threads
        self._checked = time.monotonic()
        self._files = self._identities()
        self.material = read_material(settings)
        self.current = self._built(self.material)
        self._record(self.material)

    def _identities(self) -> tuple[FileIdentity | None, ...]:
        s = self.settings
        return tuple(_identity(p) for p in (s.cert_file, s.key_file, s.client_ca_file) if p)

    def _built(self, material: TlsMaterial) -> T:
        try:
            return self._build(material)
        except (ssl.SSLError, ValueError) as exc:  # what read_material's checks let through, the TLS library refused
            raise TlsError("certFile", f"the certificate in {self.settings.cert_file} and its key cannot "
                           f"serve TLS: {exc}") from None

    def _record(self, material: TlsMaterial) -> None:
        metrics.tls_not_after.set(material.not_after.timestamp())

    def initial(self) -> T:
        return self.current

    def latest(self) -> T:
        """The configuration for a new handshake: the files' current one if they changed and serve."""
        self()
        return self.current

    def __call__(self) -> T | None:
        try:
            return self._fetch()
        except Exception as exc:  # noqa: BLE001 - never break a handshake; keep serving the old certificate
            log.error("tls_reload_failed", error=f"{type(exc).__name__}: {exc}", keeping=self.material.subject)
            return None

    def _fetch(self) -> T | None:
        with self._lock:
            now = time.monotonic()
            if now - self._checked < self.interval:
                return None
            self._checked = now
            files = self._identities()
            if files == self._files:
                return None
            self._files = files  # a broken new version is reported once, not per connection
            try:
                material = read_material(self.settings)
                if material == self.material:
                    return None
                built = self._built(material)
            except TlsError as exc:
                metrics.tls_reloads.labels("invalid").inc()
                log.error("tls_reload_failed", field=f"server.tls.{exc.field}", error=exc.message,
                          keeping=self.material.subject,
                          keeping_not_after=self.material.not_after.isoformat())
                return None
            self.material, self.current = material, built
            self._record(material)
            metrics.tls_reloads.labels("ok").inc()
            log.info("tls_reloaded", subject=material.subject, not_after=material.not_after.isoformat(),
                     client_auth=material.client_ca is not None)
            return built


class ServerContexts(CertificateReloader[ssl.SSLContext]):
    """The :class:`ssl.SSLContext` for the sidecar's own server's next handshake, and the protocol it must select."""

    def __init__(self, settings: TlsSettings, alpn: str, interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self.alpn = alpn
        super().__init__(settings, lambda material: server_context(material, alpn), interval)


def server_credentials(settings: TlsSettings,
                       ) -> tuple[grpc.ServerCredentials, CertificateReloader[grpc.ServerCertificateConfiguration]]:
    """Credentials for grpc.aio's ``add_secure_port``: mTLS (client certificate required) when clientCaFile is set."""
    reloader = CertificateReloader(settings, grpc_configuration)
    credentials = grpc.dynamic_ssl_server_credentials(
        reloader.initial(),
        reloader,  # type: ignore[arg-type]  # grpc-stubs omit the documented None ("keep the current one")
        require_client_authentication=bool(settings.client_ca_file),
    )
    return credentials, reloader
