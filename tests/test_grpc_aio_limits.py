"""What one peer may cost the grpc.aio listener (TLS, or ``EXTAUTHZ_GRPC_SERVER=grpcio``), seen from grpcio's client.

grpcio bounds neither the streams of a connection nor the size of a call's
headers unless told to: these run the sidecar's own :class:`Server` and show
that a peer past the limits is held back or refused while others are served.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.demo.processes import free_port
from extauthz.server import app
from extauthz.server.runtime import RuntimeHolder
from tests.test_tls_listener import CertificateAuthority, tls_files

POLICY = """providers:
  - {name: idp, issuer: https://idp.example, jwksUri: "http://127.0.0.1:1/jwks", audiences: [api]}
proxies:
  - {name: api, rules: [{effect: allow}]}
"""
STREAM_LIMIT = 100


def check_request() -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(method="GET", path="/", host="api")
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http), context_extensions={"proxy": "api"}))


@asynccontextmanager
async def running(tmp_path: Path, address: str, tls: CertificateAuthority | None = None,
                  ) -> AsyncIterator[grpc.aio.Channel]:
    """The sidecar's gRPC server in this loop, and a grpcio channel (one connection) to it."""
    policy = POLICY
    credentials = None
    if tls is not None:
        files = tls_files(tls, tls.issue("localhost", server=True))
        for name, content in files.items():
            (tmp_path / name).write_text(content)
        policy += f"server: {{tls: {{certFile: {tmp_path}/tls.crt, keyFile: {tmp_path}/tls.key}}}}\n"
        credentials = grpc.ssl_channel_credentials(root_certificates=tls.pem)
    path = tmp_path / "policy.yaml"
    path.write_text(policy)
    sidecar = await RuntimeHolder.start(path)
    server = app.Server(sidecar, address)
    assert server.grpc is not None, "not the grpc.aio listener"
    await server.start()
    target = address if address.startswith("unix:") else f"localhost:{server.port}"
    channel = grpc.aio.secure_channel(target, credentials) if credentials else grpc.aio.insecure_channel(target)
    try:
        yield channel
    finally:
        await channel.close(None)
        await server.stop(0)


@pytest.fixture
def grpcio(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(app.GRPC_SERVER_ENV, "grpcio")


@pytest.mark.usefixtures("grpcio")
@pytest.mark.parametrize("tls", [False, True], ids=["cleartext", "tls"])
def test_a_call_with_32_kib_of_metadata_is_refused_and_others_are_served(tmp_path: Path, tls: bool) -> None:
    async def scenario() -> None:
        authority = CertificateAuthority("ca") if tls else None
        async with running(tmp_path, f"127.0.0.1:{free_port()}", authority) as channel:
            stub = external_auth_pb2_grpc.AuthorizationStub(channel)
            # Just below the limit, every time: grpcio's own default refuses a random share of calls over 8 KiB.
            for _ in range(5):
                answered = await stub.Check(check_request(), metadata=[("x-padding", "a" * 15_000)], timeout=5)
                assert answered.status.code != 0  # denied (no token), as any Check without one
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await stub.Check(check_request(), metadata=[("x-padding", "a" * (32 << 10))], timeout=5)
            assert refused.value.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INTERNAL), \
                refused.value
            # The connection is not harmed: the next Check is answered.
            assert (await stub.Check(check_request(), timeout=5)).status.code != 0

    asyncio.run(scenario())


@pytest.mark.usefixtures("grpcio")
def test_streams_past_the_limit_wait_on_one_connection_until_one_ends(tmp_path: Path) -> None:
    """101 Watch streams on one connection: 100 are served at once, the last only when another ends."""

    async def scenario() -> None:
        async with running(tmp_path, f"127.0.0.1:{free_port()}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            calls = [stub.Watch(health_pb2.HealthCheckRequest(service="")) for _ in range(STREAM_LIMIT + 1)]
            first = [asyncio.ensure_future(call.read()) for call in calls]
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10
            while sum(f.done() for f in first) < STREAM_LIMIT and loop.time() < deadline:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)  # time for a stream beyond the limit to be answered, were it let through
            served = [i for i, f in enumerate(first) if f.done()]
            waiting = [f for f in first if not f.done()]
            assert (len(served), len(waiting)) == (STREAM_LIMIT, 1)
            calls[served[0]].cancel()
            assert isinstance(await asyncio.wait_for(waiting[0], 10), health_pb2.HealthCheckResponse)
            for call in calls:
                call.cancel()

    asyncio.run(scenario())


@pytest.mark.usefixtures("grpcio")
def test_grpcio_unix_socket_is_connectable_by_the_group_not_others(tmp_path: Path) -> None:
    """In a pod Envoy (another user, the same group) connects; under umask 022 grpcio alone makes it 0755."""

    async def scenario() -> None:
        sock = tmp_path / "grpc.sock"
        previous = os.umask(0o022)
        try:
            async with running(tmp_path, f"unix:{sock}") as channel:
                assert stat.S_IMODE(sock.stat().st_mode) == 0o660
                health = health_pb2_grpc.HealthStub(channel)
                answer = await health.Check(health_pb2.HealthCheckRequest(), timeout=5)
                assert answer.status in (health_pb2.HealthCheckResponse.SERVING,
                                         health_pb2.HealthCheckResponse.NOT_SERVING)
        finally:
            os.umask(previous)

    asyncio.run(scenario())
