"""Assemble and run the gRPC server: ext_authz, gRPC health, graceful drain on SIGTERM.

Around it: the policy watcher (hot reload), the metrics/health HTTP port, the
optional TLS/mTLS listener credentials, the optional loopback admin service and
the optional HTTP/1.1 ext_authz listener (docs/transports.md).
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from extauthz.observability import metrics
from extauthz.observability.http import ObservabilityServer
from extauthz.server import authorization
from extauthz.server.grpc_lean import LeanGrpcServer, Methods, health_check, health_watch
from extauthz.server.http_authorization import HttpAuthorizationServer
from extauthz.server.processing import ExternalProcessorServicer
from extauthz.server.reload import DEFAULT_INTERVAL_SECONDS, PolicyWatcher
from extauthz.server.runtime import RuntimeHolder
from extauthz.server.tls import CertificateReloader, server_credentials
from extauthz.server.validation import (
    UNIX_SOCKET_MODE,
    parse_address,
    parse_admin_address,
    parse_grpc_address,
    parse_http_address,
    probe_listen,
)

if TYPE_CHECKING:  # only `serve --workers` runs workers, and it imports them itself: one process pays no MB for it
    from extauthz.policy.model import Policy
    from extauthz.server.workers import WorkerLink

log = structlog.get_logger("extauthz.server")

# After the drain (or at once on SIGINT), how long Checks and streams already in flight may take.
_IN_FLIGHT_GRACE_SECONDS = 2.0

SERVICES = ("envoy.service.auth.v3.Authorization", "envoy.service.ext_proc.v3.ExternalProcessor")
PROCESS_PATH = "/envoy.service.ext_proc.v3.ExternalProcessor/Process"
HEALTH_CHECK_PATH = "/grpc.health.v1.Health/Check"
HEALTH_WATCH_PATH = "/grpc.health.v1.Health/Watch"
GRPC_SERVER_ENV = "EXTAUTHZ_GRPC_SERVER"

# What one peer may cost a grpc.aio server (the EXTAUTHZ_GRPC_SERVER=grpcio listener and the admin service): grpcio's
# defaults leave most of it unbounded. Envoy stays within every one of these.
GRPC_AIO_OPTIONS: tuple[tuple[str, int], ...] = (
    # Streams one connection may have open at once (SETTINGS_MAX_CONCURRENT_STREAMS); the default is none.
    # Envoy opens another connection rather than exceed it; grpcio's client queues the extra calls.
    ("grpc.max_concurrent_streams", 100),
    # One request message, buffered whole before the handler sees it: a CheckRequest with a request body.
    ("grpc.max_receive_message_length", 8 << 20),
    # The request headers (HPACK-decoded) of one call. Envoy sends a few hundred bytes (the caller's headers
    # travel in the message); soft and hard limit alike, so every call above it is refused, not a sample.
    ("grpc.max_metadata_size", 16 << 10),
    ("grpc.absolute_max_metadata_size", 16 << 10),
    # The HTTP/2 frame size the server accepts: the protocol's minimum, stated rather than left to a default.
    ("grpc.http2.max_frame_size", 16 << 10),
    # No bandwidth-delay probing: it grows each stream's receive window (memory a peer may fill before a
    # handler reads) for throughput that a pod-local or LAN peer with small messages does not need.
    ("grpc.http2.bdp_probe", 0),
    # A TLS handshake (or the HTTP/2 preface) must be done in 10 s, not grpcio's 120: a peer that connects
    # and stalls holds a connection slot and its buffers for that long.
    ("grpc.server_handshake_timeout_ms", 10_000),
    # Connections at once, the whole listener, as on the own server: Envoy opens a handful (one per worker
    # thread, another when one is at its stream limit); a peer that opens more is not Envoy.
    ("grpc.max_allowed_incoming_connections", 128),
    # A connection without a call for 5 min is closed (GOAWAY); Envoy's pool opens a new one on its next
    # Check, one handshake in 5 min at most.
    ("grpc.max_connection_idle_ms", 300_000),
    # Every connection ends after 30 min (grpcio adds +-10 % jitter, so they do not all end at once): a
    # rotated certificate or CA, and the kernel's spreading over workers, reach every peer within it. GOAWAY
    # lets calls in flight finish; Envoy sends the next ones on a new connection.
    ("grpc.max_connection_age_ms", 1_800_000),
    # ...within 30 s: Checks take milliseconds; an ext_proc stream lives as long as its request through
    # Envoy, and one still open then is cut (Envoy answers that request per its failure mode).
    ("grpc.max_connection_age_grace_ms", 30_000),
    # The server pings a silent peer every 2 min and drops it if no answer comes within 20 s: a peer that
    # vanished (node gone, half-open connection) frees its streams in minutes, not grpcio's 2 h.
    ("grpc.keepalive_time_ms", 120_000),
    ("grpc.keepalive_timeout_ms", 20_000),
    # Keepalive pings a peer may send: at most one per 10 s while no data flows, with calls open or not
    # (Envoy's `connection_keepalive`, if configured, pings idle connections too)...
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    # ...and after 2 pings faster than that, GOAWAY (ENHANCE_YOUR_CALM): a ping flood costs one connection.
    ("grpc.http2.max_ping_strikes", 2),
)
# Calls in progress at once over all connections of one grpc.aio server; beyond it, RESOURCE_EXHAUSTED at once
# (Envoy then answers per its failure mode) instead of memory growing with every queued call.
GRPC_AIO_MAX_CONCURRENT_RPCS = 1000


def grpc_server() -> str:
    """``lean`` (extauthz's own HTTP/2 server, :mod:`extauthz.server.grpc_lean`) unless the environment says
    ``grpcio`` (grpc.aio): the way back should the lean server misbehave."""
    return "grpcio" if os.environ.get(GRPC_SERVER_ENV, "").strip().lower() == "grpcio" else "lean"


def _share_unix_socket(spec: str) -> None:
    """grpcio creates its Unix socket with the umask's mode: Envoy, in the socket's group, could not connect.

    The same mode as the own server's socket. grpcio binds and listens in
    ``add_*_port``, so it is set a moment after the socket appears, before any
    call is answered (``start``); with the usual umask (022) no one but the
    owner can connect in that moment.
    """
    address = parse_address(spec)
    if address.is_unix:
        os.chmod(address.unix_path, UNIX_SOCKET_MODE)


class Server:
    def __init__(self, sidecar: RuntimeHolder, address: str, admin_address: str = "",
                 reuse_port: bool = False, http_address: str = "") -> None:
        self.sidecar = sidecar
        self.address = address
        tls = sidecar.runtime.policy.server.tls
        parse_grpc_address(address, tls is not None)  # --grpc-address too: cleartext stays on loopback
        # One process owns its port, so a second sidecar on it fails clearly; workers (serve --workers)
        # share it through SO_REUSEPORT, and their supervisor probed it before starting them.
        if not reuse_port:
            probe_listen(address, "gRPC, server.grpcAddress")  # a clear error before gRPC's own
        checks = authorization.AuthorizationServicer(sidecar.authorizer)
        # Response filtering; the policy is read per stream so a reload applies to the next response.
        processor = ExternalProcessorServicer(lambda: sidecar.runtime.policy, sidecar.shadow)
        self.certificates: CertificateReloader[Any] | None = None
        self.grpc: grpc.aio.Server | None = None
        self.lean: LeanGrpcServer | None = None
        self.health = HealthServicer()
        if grpc_server() == "lean":
            # server.tls: TLS (mTLS with a client CA) on the same server, certificates re-read for new handshakes.
            self.lean = LeanGrpcServer(Methods(
                unary={authorization.CHECK_PATH: checks.check_message, HEALTH_CHECK_PATH: health_check(self.health)},
                streams={PROCESS_PATH: processor.open_stream},
                server_streams={HEALTH_WATCH_PATH: health_watch(self.health)},
            ), address, reuse_port=reuse_port, tls=tls)
            self.certificates = self.lean.tls
            self.port = self.lean.port
        else:
            self.grpc = grpc.aio.server(options=[("grpc.so_reuseport", int(reuse_port)), *GRPC_AIO_OPTIONS],
                                        maximum_concurrent_rpcs=GRPC_AIO_MAX_CONCURRENT_RPCS)
            authorization.add_to_server(checks, self.grpc)
            external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(processor, self.grpc)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
            if tls is not None:
                credentials, self.certificates = server_credentials(tls)
                self.port = self.grpc.add_secure_port(address, credentials)
            else:
                self.port = self.grpc.add_insecure_port(address)
            if self.port == 0:
                raise OSError(f"cannot listen on {address}")
            _share_unix_socket(address)
        self.admin: grpc.aio.Server | None = None
        if admin_address:
            parse_admin_address(admin_address)
            probe_listen(admin_address, "admin, server.adminAddress")
            from extauthz.admin.service import add_admin_service

            self.admin = grpc.aio.server(options=[("grpc.so_reuseport", 0), *GRPC_AIO_OPTIONS],
                                         maximum_concurrent_rpcs=GRPC_AIO_MAX_CONCURRENT_RPCS)
            add_admin_service(self.admin, sidecar)
            if self.admin.add_insecure_port(admin_address) == 0:
                raise OSError(f"cannot listen on {admin_address} (admin)")
        self.admin_address = admin_address
        # ext_authz over HTTP/1.1 (envoy/envoy-http.yaml), beside gRPC on the same loop; ext_proc stays on gRPC.
        self.http: HttpAuthorizationServer | None = None
        if http_address:
            parse_http_address(http_address)
            if not reuse_port:
                probe_listen(http_address, "HTTP ext_authz, server.httpAddress")
            self.http = HttpAuthorizationServer(sidecar.authorizer, http_address, reuse_port=reuse_port)
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.lean is not None:
            await self.lean.start()
            self.port = self.lean.port
        else:
            assert self.grpc is not None
            await self.grpc.start()
        if self.http is not None:
            await self.http.start()
        if self.admin is not None:
            await self.admin.start()
            log.info("admin_listening", address=self.admin_address)
        self._watch = asyncio.create_task(self._track_readiness())
        tls = self.sidecar.runtime.policy.server.tls
        log.info("listening", address=self.address, port=self.port, policy=self.sidecar.runtime.policy.digest,
                 tls="off" if tls is None else ("mtls" if tls.client_ca_file else "tls"),
                 grpc_server="lean" if self.lean is not None else "grpcio",
                 loop=type(asyncio.get_running_loop()).__module__.split(".")[0])

    async def _track_readiness(self) -> None:
        """NOT_SERVING until signing keys are loaded, so Envoy/K8s hold traffic back."""
        last: int | None = None
        while True:
            status = (
                health_pb2.HealthCheckResponse.SERVING
                if self.sidecar.runtime.ready
                else health_pb2.HealthCheckResponse.NOT_SERVING
            )
            if status != last:
                for service in ("", *SERVICES):
                    await self.health.set(service, status)
                last = status
            await asyncio.sleep(0.5)

    async def _stop_grpc(self, grace: float) -> None:
        assert self.grpc is not None
        await self.grpc.stop(grace)

    async def not_ready(self) -> None:
        """Report NOT_SERVING for good (draining); RPCs are still answered."""
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.wait([self._watch])  # ended before the health status is set for good
        await self.health.enter_graceful_shutdown()

    async def stop(self, grace: float) -> None:
        """Refuse new RPCs, let those in flight finish within ``grace``, then close."""
        await self.not_ready()
        if self.admin is not None:
            await self.admin.stop(0)
        stopping = [self.lean.stop(grace) if self.lean is not None else self._stop_grpc(grace)]
        if self.http is not None:
            stopping.append(self.http.stop(grace))
        await asyncio.gather(*stopping)
        await self.sidecar.close()


async def serve(
    config: Path,
    address: str | None = None,
    metrics_address: str | None = None,
    admin_address: str | None = None,
    watch_interval: float = DEFAULT_INTERVAL_SECONDS,
    worker: WorkerLink | None = None,
    http_authz_address: str | None = None,
    policy: Policy | None = None,
) -> None:
    """Run until SIGTERM/SIGINT; command-line addresses override the policy's ``server`` block.

    SIGTERM drains the way Kubernetes needs it: the sidecar reports not-ready at
    once (gRPC health, ``/readyz``) so traffic moves away, but keeps answering
    Checks and ext_proc streams, new ones included, for ``server.drainSeconds``
    while Envoy still sends them (every response of a filtered request needs a
    new stream), then lets what is in flight finish and exits. SIGINT (Ctrl-C)
    skips the wait. SIGHUP reloads the policy at once (outside Kubernetes, after
    an edit); the watcher does the same by itself within ``watch_interval`` (0
    turns it off). As one of several workers (``worker``), the port is shared and
    readiness goes to the supervisor instead of an HTTP port of its own.
    ``http_authz_address`` (else ``server.httpAddress``) also serves ext_authz
    over HTTP/1.1, drained the same way. ``policy``: ``config`` as the caller
    has just loaded it, so it is not loaded and checked twice.
    """
    sidecar = await RuntimeHolder.start(config, policy)
    settings = sidecar.runtime.policy.server
    observability_address = metrics_address if metrics_address is not None else settings.metrics_address
    try:
        server = Server(sidecar, address or settings.grpc_address,
                        admin_address if admin_address is not None else settings.admin_address,
                        reuse_port=worker is not None,
                        http_address=http_authz_address if http_authz_address is not None else settings.http_address)
        http: ObservabilityServer | None = None
        metrics.live_state.source = lambda: (sidecar.runtime.ready, sidecar.runtime.key_ages())
        if observability_address:
            listen = parse_address(observability_address, unix=False)
            probe_listen(observability_address, "metrics, server.metricsAddress")
            http = ObservabilityServer(listen.host, listen.port, metrics.REGISTRY, sidecar.readiness)
            await http.start()
        await server.start()
    except BaseException:
        await sidecar.close()
        raise
    # Everything built so far (modules, Envoy's descriptors, the policy) lives as long as the process: out of
    # the collector's sight, a full collection no longer walks it on the request path (one took ~54 ms in a
    # measured run of 30,000 Checks: a stall for every Check behind it). Later objects are collected as usual.
    gc.freeze()
    watcher = None
    if watch_interval > 0:
        watcher = PolicyWatcher(config, sidecar.reload, lambda: sidecar.runtime.policy.digest, watch_interval)
        watcher.start()
    sidecar.watch_shadow(watch_interval)
    stop = asyncio.Event()
    drain = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, stop.set)

    def on_sigterm() -> None:
        drain.set()
        stop.set()

    loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    # The sidecar holds the reload task; closing it cancels a reload still in progress.
    loop.add_signal_handler(signal.SIGHUP, sidecar.reload_soon)
    if worker is not None:  # once the signal handlers are in place: the supervisor forwards signals then
        await worker.start(sidecar.readiness, stop.is_set, on_sigterm)
    await stop.wait()
    drain_seconds = sidecar.runtime.policy.server.drain_seconds if drain.is_set() else 0.0
    log.info("draining", drain_seconds=drain_seconds, signal="SIGTERM" if drain.is_set() else "SIGINT")
    if watcher is not None:
        await watcher.stop()
    if http is not None:
        http.draining = True
    await server.not_ready()
    if drain_seconds:
        await asyncio.sleep(drain_seconds)  # still answering: Envoy may send until it drains too
    await server.stop(_IN_FLIGHT_GRACE_SECONDS)
    if worker is not None:
        await worker.close()
    log.info("stopped")
    if http is not None:
        await http.stop()
