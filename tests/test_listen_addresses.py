"""Where the gRPC listener may bind, and the Unix socket it can bind instead.

Every Check carries a caller's bearer token and an allow answer the upstream
credential: without TLS the listener stays on loopback or a Unix socket, and
``validate``, ``serve`` and ``--grpc-address`` all say so, naming the fix. The
Unix socket must come back after a crash (its file outlives a killed process)
and be connectable by the socket's group, whatever the umask.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, cast

import grpc
import pytest
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.cli import Exit
from extauthz.demo.processes import free_port, port_open
from extauthz.server.validation import ListenError, parse_address
from tests.test_tls_listener import CertificateAuthority, tls_files

POLICY = """providers:
  - {name: idp, issuer: https://idp.example, jwksUri: "http://127.0.0.1:1/jwks", audiences: [api]}
proxies:
  - {name: api, rules: [{effect: allow}]}
"""
FIX = "set server.tls or bind 127.0.0.1/unix:"
OFF_LOOPBACK = ["0.0.0.0:9001", "[::]:9001", "10.0.0.7:9001", "orders.example:9001"]
LOOPS: dict[str, Callable[[Coroutine[Any, Any, None]], None]] = {"asyncio": asyncio.run, "uvloop": uvloop.run}


def extauthz(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "extauthz", *args], capture_output=True, text=True, timeout=60,
                          check=False, env={**os.environ, **(env or {})})


def write(tmp_path: Path, server: str = "") -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text(POLICY + server)
    return path


def tls_block(tmp_path: Path) -> str:
    authority = CertificateAuthority("ca")
    for name, content in tls_files(authority, authority.issue("localhost", server=True)).items():
        (tmp_path / name).write_text(content)
    return f"  tls: {{certFile: {tmp_path}/tls.crt, keyFile: {tmp_path}/tls.key}}\n"


# --- validate and the policy's server.grpcAddress ------------------------------------


@pytest.mark.parametrize("address", OFF_LOOPBACK)
def test_validate_refuses_cleartext_grpc_off_loopback_naming_the_fix(tmp_path: Path, address: str) -> None:
    policy = write(tmp_path, f"server:\n  grpcAddress: \"{address}\"\n")
    done = extauthz("validate", str(policy))
    assert done.returncode == Exit.FAILED
    line = next(line for line in done.stdout.splitlines() + done.stderr.splitlines() if "server.grpcAddress" in line)
    assert line.startswith(f"{policy}:6: server.grpcAddress: ") and FIX in line and address in line, line


@pytest.mark.parametrize("address", ["127.0.0.1:9001", "[::1]:9001", "localhost:9001", "unix:/run/x/grpc.sock"])
def test_validate_accepts_loopback_and_unix_without_tls(tmp_path: Path, address: str) -> None:
    done = extauthz("validate", str(write(tmp_path, f"server:\n  grpcAddress: \"{address}\"\n")))
    assert done.returncode == Exit.OK, done.stdout + done.stderr


def test_validate_accepts_any_address_with_tls(tmp_path: Path) -> None:
    done = extauthz("validate", str(write(tmp_path, f"server:\n  grpcAddress: 0.0.0.0:9001\n{tls_block(tmp_path)}")))
    assert done.returncode == Exit.OK, done.stdout + done.stderr


# --- serve --grpc-address ------------------------------------------------------------------


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_refuses_a_cleartext_grpc_address_off_loopback(tmp_path: Path, workers: str) -> None:
    """The command line overrides the policy, so it is checked as strictly: one line, exit 5, nothing listens."""
    port = free_port()
    done = extauthz("serve", "--config", str(write(tmp_path)), "--workers", workers,
                    "--grpc-address", f"0.0.0.0:{port}", "--metrics-address", "")
    assert done.returncode == Exit.ADDRESS, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if line.startswith("extauthz: ")]
    assert line.startswith("extauthz: cannot serve: ") and FIX in line and f"0.0.0.0:{port}" in line
    assert "Traceback" not in done.stderr and "worker_started" not in done.stdout + done.stderr


def test_serve_with_tls_listens_on_any_address(tmp_path: Path) -> None:
    port = free_port()
    policy = write(tmp_path, f"server:\n{tls_block(tmp_path)}")
    process = subprocess.Popen([sys.executable, "-m", "extauthz", "serve", "--config", str(policy),
                                "--grpc-address", f"0.0.0.0:{port}", "--metrics-address", ""],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not port_open(port):
            assert process.poll() is None and time.monotonic() < deadline, process.stderr
            time.sleep(0.1)
    finally:
        process.send_signal(signal.SIGINT)
        process.wait(15)


# --- the Unix socket ---------------------------------------------------------------


class Echo(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        cast(asyncio.WriteTransport, transport).write(b"here")  # uvloop's transports are not asyncio's classes
        transport.close()


async def greeting(path: Path) -> bytes:
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(str(path)), 5)
    data = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return data


def stale_socket(path: Path) -> None:
    """What a killed process leaves: the socket file, with nothing listening on it."""
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        s.listen()
    assert stat.S_ISSOCK(path.lstat().st_mode)


@pytest.mark.parametrize("loop", LOOPS)
@pytest.mark.parametrize("umask", [0o022, 0o000], ids=["umask022", "umask000"])
def test_a_stale_socket_file_is_replaced_and_the_new_one_is_group_connectable(
        tmp_path: Path, loop: str, umask: int) -> None:
    path = tmp_path / "grpc.sock"
    stale_socket(path)

    async def scenario() -> None:
        server, port = await parse_address(f"unix:{path}").serve(Echo)
        try:
            assert port == 0
            assert stat.S_IMODE(path.stat().st_mode) == 0o660  # Envoy's group may connect, others not
            assert await greeting(path) == b"here"
        finally:
            server.close()
            await server.wait_closed()

    previous = os.umask(umask)
    try:
        LOOPS[loop](scenario())
    finally:
        os.umask(previous)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_socket_someone_listens_on_is_not_taken_over(tmp_path: Path, loop: str) -> None:
    path = tmp_path / "grpc.sock"

    async def scenario() -> None:
        first, _ = await parse_address(f"unix:{path}").serve(Echo)
        try:
            with pytest.raises(ListenError, match=f"cannot listen on unix:{path}: address already in use"):
                await parse_address(f"unix:{path}").serve(Echo)
            assert await greeting(path) == b"here"  # the first one still has it
        finally:
            first.close()
            await first.wait_closed()

    LOOPS[loop](scenario())


def test_a_file_that_is_not_a_socket_is_left_alone(tmp_path: Path) -> None:
    path = tmp_path / "grpc.sock"
    path.write_text("not a socket")

    async def scenario() -> None:
        with pytest.raises(ListenError, match="address already in use"):
            await parse_address(f"unix:{path}").serve(Echo)

    asyncio.run(scenario())
    assert path.read_text() == "not a socket"


def health(path: Path) -> int:
    with grpc.insecure_channel(f"unix:{path}") as channel:
        answer = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=2)
        return int(answer.status)


@pytest.mark.parametrize("loop", LOOPS)
def test_a_sidecar_killed_on_a_unix_socket_gets_it_back_when_restarted(tmp_path: Path, loop: str) -> None:
    path = tmp_path / "grpc.sock"
    policy = write(tmp_path)

    def start() -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--config", str(policy), "--grpc-address", f"unix:{path}",
             "--metrics-address", ""], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env={**os.environ, "EXTAUTHZ_EVENT_LOOP": loop})
        deadline = time.monotonic() + 30
        while True:
            try:
                health(path)
                return process
            except grpc.RpcError:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                assert time.monotonic() < deadline, "the sidecar did not listen on its socket"
                time.sleep(0.1)

    first = start()
    first.kill()
    first.wait(10)
    assert stat.S_ISSOCK(path.lstat().st_mode), "a killed process leaves its socket file"
    second = start()
    try:
        assert health(path) in (health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING)
    finally:
        second.send_signal(signal.SIGINT)
        second.wait(15)
