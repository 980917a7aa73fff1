"""Assemble and run the gRPC server: ext_authz, gRPC health, graceful drain on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import grpc
import structlog
from envoy.service.auth.v3 import external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from extauthz.server.authorization import AuthorizationServicer
from extauthz.server.runtime import Sidecar

log = structlog.get_logger("extauthz.server")

SERVICES = ("envoy.service.auth.v3.Authorization",)


class Server:
    def __init__(self, sidecar: Sidecar, address: str) -> None:
        self.sidecar = sidecar
        self.address = address
        self.grpc = grpc.aio.server(
            options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 8 << 20)]
        )
        external_auth_pb2_grpc.add_AuthorizationServicer_to_server(
            AuthorizationServicer(sidecar.authorizer), self.grpc
        )
        self.health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        self.port = self.grpc.add_insecure_port(address)
        if self.port == 0:
            raise OSError(f"cannot listen on {address}")
        self._watch: asyncio.Task[None] | None = None

    async def start(self) -> None:
        await self.grpc.start()
        self._watch = asyncio.create_task(self._track_readiness())
        log.info("listening", address=self.address, port=self.port, policy=self.sidecar.runtime.policy.digest)

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

    async def stop(self, grace: float) -> None:
        """Report NOT_SERVING, let in-flight Checks finish within ``grace``, then close."""
        if self._watch is not None:
            self._watch.cancel()
        await self.health.enter_graceful_shutdown()
        await self.grpc.stop(grace)
        await self.sidecar.close()


async def serve(config: Path, address: str | None = None) -> None:
    sidecar = await Sidecar.start(config)
    server = Server(sidecar, address or sidecar.runtime.policy.server.grpc_address)
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    grace = sidecar.runtime.policy.server.drain_seconds
    log.info("draining", grace_seconds=grace)
    await server.stop(grace)
