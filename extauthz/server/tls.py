"""TLS and mTLS on the gRPC listener, with certificates re-read when their files change.

Certificates come from mounted files (a Kubernetes Secret, cert-manager), which
are rotated in place. gRPC asks a *certificate configuration fetcher* at the start
of every new TLS handshake; ours looks at the files' identity (resolved path,
inode, size, mtime) at most once a second and re-reads them only when that
changed, so connections never wait on disk I/O. A new certificate is checked
before it is used (PEM parses, the key matches the certificate, not expired, the
client CA parses); a broken or half-rotated one is logged and the previous
configuration keeps serving. Established connections keep their session.
"""

from __future__ import annotations

import datetime
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import structlog
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from extauthz.errors import ExtauthzError
from extauthz.observability import metrics
from extauthz.policy.model import TlsSettings

log = structlog.get_logger("extauthz.tls")

CHECK_INTERVAL_SECONDS = 1.0


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
    return TlsMaterial(chain, key_pem, client_ca, leaf.not_valid_after_utc, leaf.subject.rfc4514_string())


def _configuration(material: TlsMaterial) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(material.key, material.chain)], material.client_ca)


class CertificateReloader:
    """gRPC's certificate configuration fetcher: None keeps the current configuration."""

    def __init__(self, settings: TlsSettings, interval: float = CHECK_INTERVAL_SECONDS) -> None:
        self.settings = settings
        self.interval = interval
        self._lock = threading.Lock()  # gRPC may call from its own threads
        self._checked = time.monotonic()
        self._files = self._identities()
        self.material = read_material(settings)
        self._record(self.material)

    def _identities(self) -> tuple[FileIdentity | None, ...]:
        s = self.settings
        return tuple(_identity(p) for p in (s.cert_file, s.key_file, s.client_ca_file) if p)

    def _record(self, material: TlsMaterial) -> None:
        metrics.tls_not_after.set(material.not_after.timestamp())

    def initial(self) -> grpc.ServerCertificateConfiguration:
        return _configuration(self.material)

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            return self._fetch()
        except Exception as exc:  # noqa: BLE001 - never break a handshake; keep serving the old certificate
            log.error("tls_reload_failed", error=f"{type(exc).__name__}: {exc}", keeping=self.material.subject)
            return None

    def _fetch(self) -> grpc.ServerCertificateConfiguration | None:
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
            except TlsError as exc:
                metrics.tls_reloads.labels("invalid").inc()
                log.error("tls_reload_failed", field=f"server.tls.{exc.field}", error=exc.message,
                          keeping=self.material.subject,
                          keeping_not_after=self.material.not_after.isoformat())
                return None
            if material == self.material:
                return None
            self.material = material
            self._record(material)
            metrics.tls_reloads.labels("ok").inc()
            log.info("tls_reloaded", subject=material.subject, not_after=material.not_after.isoformat(),
                     client_auth=material.client_ca is not None)
            return _configuration(material)


def server_credentials(settings: TlsSettings) -> tuple[grpc.ServerCredentials, CertificateReloader]:
    """Credentials for ``add_secure_port``: mTLS (client certificate required) when clientCaFile is set."""
    reloader = CertificateReloader(settings)
    credentials = grpc.dynamic_ssl_server_credentials(
        reloader.initial(),
        reloader,  # type: ignore[arg-type]  # grpc-stubs omit the documented None ("keep the current one")
        require_client_authentication=bool(settings.client_ca_file),
    )
    return credentials, reloader
