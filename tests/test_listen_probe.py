"""A sidecar restarted after a crash listens again at once; a port another process listens on is refused.

A SIGKILLed (e.g. OOM-killed) sidecar leaves its end of every connection in
TIME_WAIT for about a minute. Its replacement must start on the same addresses
all the same (Envoy answers 503 until it does), while a second process
listening on one of them must still be one clear line and exit code 5.
"""

from __future__ import annotations

import asyncio
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from extauthz.cli import Exit
from extauthz.demo.processes import free_port, port_open, stop_process
from extauthz.observability.http import ObservabilityServer
from extauthz.server import loop
from extauthz.server.app import GRPC_SERVER_ENV
from extauthz.server.validation import ListenError, parse_address, probe_listen

POLICY = """providers:
  - {name: idp, issuer: https://idp.example, jwksUri: "http://127.0.0.1:1/jwks", audiences: [api]}
proxies:
  - {name: api, rules: [{effect: allow}]}
"""
TIME_WAIT = "06"  # the state column of /proc/net/tcp


def time_wait_states(port: int) -> list[str]:
    """The states of the loopback IPv4 sockets whose local port is ``port``."""
    states = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].rpartition(":")[2], 16) == port:
            states.append(fields[3])
    return states


def time_wait_port() -> int:
    """A free loopback port with a server end in TIME_WAIT, as a sidecar's crash leaves its ports.

    The listener sets ``SO_REUSEADDR`` as the sidecar's listeners do (accepted
    sockets, and so their TIME_WAIT, inherit it), and its side closes first, as
    the kernel closes a killed process's connections.
    """
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        port = int(listener.getsockname()[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5) as client:
            accepted, _ = listener.accept()
            accepted.close()
            assert client.recv(1) == b""  # the server's FIN arrived; closing answers it
    deadline = time.monotonic() + 5
    while time_wait_states(port) != [TIME_WAIT]:
        assert time.monotonic() < deadline, f"no TIME_WAIT on port {port}: {time_wait_states(port)}"
        time.sleep(0.01)
    # What the probe used to see: a bind without SO_REUSEADDR fails, though nothing listens.
    with socket.socket() as plain, pytest.raises(OSError) as refused:
        plain.bind(("127.0.0.1", port))
    assert refused.value.errno == errno.EADDRINUSE
    return port


def test_a_port_in_time_wait_is_free() -> None:
    port = time_wait_port()
    probe_listen(f"127.0.0.1:{port}", "gRPC, server.grpcAddress")
    assert time_wait_states(port) == [TIME_WAIT]  # the probe did not merely outlive it


@pytest.mark.parametrize("options, host", [
    ((), "127.0.0.1"),
    ((socket.SO_REUSEADDR,), "127.0.0.1"),  # another sidecar's listener
    ((socket.SO_REUSEADDR, socket.SO_REUSEPORT), "127.0.0.1"),  # another sidecar's workers
    ((socket.SO_REUSEADDR,), "0.0.0.0"),  # every address, the probed one included
], ids=["plain", "reuseaddr", "reuseport", "any-address"])
def test_a_port_another_process_listens_on_is_busy(options: tuple[int, ...], host: str) -> None:
    with socket.socket() as other:
        for option in options:
            other.setsockopt(socket.SOL_SOCKET, option, 1)
        other.bind((host, free_port()))
        other.listen()
        port = other.getsockname()[1]
        with pytest.raises(ListenError) as busy:
            probe_listen(f"127.0.0.1:{port}", "gRPC, server.grpcAddress")
    assert str(busy.value) == f"cannot listen on 127.0.0.1:{port} (gRPC, server.grpcAddress): address already in use"


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_the_sidecars_own_listeners_bind_over_time_wait(event_loop: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The lean gRPC and HTTP ext_authz listeners (``ListenAddress.serve``) and the metrics/health port."""
    monkeypatch.setenv(loop.ENV, event_loop)

    async def listen_on_both() -> None:
        assert type(asyncio.get_running_loop()).__module__.split(".")[0] == event_loop
        address = parse_address(f"127.0.0.1:{time_wait_port()}")
        server, port = await address.serve(asyncio.Protocol)
        metrics = ObservabilityServer("127.0.0.1", time_wait_port(), CollectorRegistry(), lambda: (True, {}))
        await metrics.start()
        try:
            assert port == address.port
            for busy in (port, metrics.port):
                with pytest.raises(ListenError):  # listening there now
                    probe_listen(f"127.0.0.1:{busy}", "test")
        finally:
            server.close()
            await metrics.stop()

    loop.run(listen_on_both())


def start_sidecar(tmp_path: Path, addresses: dict[str, int], env: dict[str, str], *extra: str,
                  ) -> subprocess.Popen[bytes]:
    (tmp_path / "policy.yaml").write_text(POLICY)
    return subprocess.Popen(
        [sys.executable, "-m", "extauthz", "serve", "--config", str(tmp_path / "policy.yaml"),
         *(arg for flag, port in addresses.items() for arg in (f"--{flag}-address", f"127.0.0.1:{port}")), *extra],
        stdout=(tmp_path / "sidecar.log").open("wb"), stderr=subprocess.STDOUT, env={**os.environ, **env},
    )


@pytest.mark.parametrize("grpc_server, extra", [
    ("lean", ()), ("grpcio", ()), ("lean", ("--workers", "2")),
], ids=["lean", "grpcio", "workers"])
def test_a_sidecar_restarts_on_addresses_its_predecessor_left_in_time_wait(
    tmp_path: Path, grpc_server: str, extra: tuple[str, ...],
) -> None:
    """Every listener: gRPC (lean or grpc.aio), HTTP ext_authz, admin (grpc.aio) and metrics/health."""
    addresses = {name: time_wait_port() for name in ("grpc", "http", "admin", "metrics")}
    process = start_sidecar(tmp_path, addresses, {GRPC_SERVER_ENV: grpc_server}, *extra)
    try:
        deadline = time.monotonic() + 30
        while not all(port_open(port) for port in addresses.values()):
            log = (tmp_path / "sidecar.log").read_text(errors="replace")
            assert process.poll() is None, f"exited with {process.returncode}:\n{log}"
            assert time.monotonic() < deadline, f"not listening on all of {addresses} after 30 s:\n{log}"
            time.sleep(0.05)
    finally:
        stop_process(process, grace=15, sig=signal.SIGINT)
    assert process.returncode == 0, (tmp_path / "sidecar.log").read_text(errors="replace")


@pytest.mark.parametrize("which", ["grpc", "http", "admin", "metrics"])
def test_a_second_sidecars_port_is_still_one_line_and_exit_code_5(tmp_path: Path, which: str) -> None:
    """Held the way a running sidecar holds it (``SO_REUSEADDR``), with TIME_WAIT on the other ports."""
    addresses = {name: time_wait_port() for name in ("grpc", "http", "admin", "metrics")}
    with socket.socket() as other:
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        other.bind(("127.0.0.1", free_port()))
        other.listen()
        addresses[which] = other.getsockname()[1]
        process = start_sidecar(tmp_path, addresses, {})
        try:
            process.wait(30)
        finally:
            stop_process(process, grace=5, sig=signal.SIGINT)
    lines = (tmp_path / "sidecar.log").read_text(errors="replace").splitlines()
    assert process.returncode == Exit.ADDRESS, lines
    busy = f"127.0.0.1:{addresses[which]}"
    what = {"grpc": "gRPC", "http": "HTTP ext_authz", "admin": "admin", "metrics": "metrics"}[which]
    assert [line for line in lines if busy in line] == [
        f"extauthz: cannot serve: cannot listen on {busy} ({what}, server.{which}Address): address already in use"]
    assert not any("Traceback" in line for line in lines)
