"""A real stack for the operations tests: IdP + app + ``extauthz serve`` + Envoy.

Like ``stack.running_stack`` (same shipped Envoy config, same IdP and app), but
the sidecar is probed through its ``/readyz`` HTTP endpoint instead of plaintext
gRPC health on TCP, so the listener can be TLS/mTLS or a Unix socket, and the
policy file can sit in a kubelet-style ``..data`` symlink layout.
"""

from __future__ import annotations

import http.client
import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extauthz.demo.idp import IdentityProvider
from extauthz.demo.processes import Envoy, Ports, free_port, render_envoy_config, wait_http
from extauthz.demo.upstream import SampleApi
from tests.e2e.stack import Response


def http_get(port: int, path: str) -> tuple[int, str]:
    """GET a sidecar's metrics/health port: status and body, error statuses included."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.1)


def alive(pid: int) -> bool:
    """Running, and not a zombie waiting to be reaped."""
    try:
        return "\nState:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@dataclass
class OpsStack:
    idp: IdentityProvider
    upstream: SampleApi
    envoy: Envoy | None
    ports: Ports
    metrics_port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def request(self, method: str, path: str, token: str | None = None,
                headers: dict[str, str] | None = None) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports.listener, timeout=15)
        try:
            sent = dict(headers or {})
            if token is not None:
                sent["authorization"] = f"Bearer {token}"
            conn.request(method, path, headers=sent)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.metrics_port, path)

    def readyz(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/readyz")[1])
        return result

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample of /metrics, or None when absent."""
        for line in self.get("/metrics")[1].splitlines():
            if line.startswith("#") or not line.startswith(name):
                continue
            sample, _, value = line.rpartition(" ")
            if sample.partition("{")[0] != name:
                continue
            found = dict(p.split("=", 1) for p in sample.partition("{")[2].rstrip("}").split(",") if "=" in p)
            if all(found.get(k) == json.dumps(v) for k, v in labels.items()):
                return float(value)
        return None

    def logs(self) -> list[dict[str, Any]]:
        """The sidecar's JSON log lines."""
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                out.append(json.loads(line))
        return out

    def decisions(self) -> dict[str, dict[str, Any]]:
        """Decision log lines by decision id."""
        return {e["decision_id"]: e for e in self.logs() if e.get("event") == "decision"}


def kubelet_layout(directory: Path, files: dict[str, str], version: int = 1) -> None:
    """Write ``files`` the way kubelet's atomic writer does (see kubelet_update)."""
    directory.mkdir(parents=True, exist_ok=True)
    kubelet_update(directory, files, version)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")


def kubelet_update(directory: Path, files: dict[str, str], version: int) -> None:
    """A new timestamped dir, a ``..data_tmp`` symlink to it, renamed over ``..data``, old dir removed."""
    fresh = directory / f"..2026_01_01_00_00_{version:02d}.{version:09d}"
    fresh.mkdir()
    for name, content in files.items():
        (fresh / name).write_text(content)
    previous = os.readlink(directory / "..data") if (directory / "..data").is_symlink() else None
    tmp = directory / "..data_tmp"
    tmp.symlink_to(fresh.name)
    os.rename(tmp, directory / "..data")  # the one atomic step
    if previous is not None:
        for child in (directory / previous).iterdir():
            child.unlink()
        (directory / previous).rmdir()


@contextmanager
def ops_stack(
    workdir: Path,
    policy: str | Callable[[IdentityProvider, int], str],
    *,
    policy_path: Path | None = None,
    grpc_address: str | None = None,
    edit_envoy: Callable[[dict[str, Any]], None] | None = None,
    with_envoy: bool = True,
    extra_args: list[str] | None = None,
    write_policy: Callable[[Path, str], None] | None = None,
) -> Iterator[OpsStack]:
    """``policy`` is text with ISSUER/JWKS_URI placeholders, or a function of (idp, metrics port)."""
    ports = Ports.free()
    metrics_port = free_port()
    with IdentityProvider() as idp, SampleApi(port=ports.app) as upstream:
        text = policy(idp, metrics_port) if callable(policy) else policy
        text = text.replace("JWKS_URI", idp.jwks_uri).replace("ISSUER", idp.issuer)
        path = policy_path or workdir / "policy.yaml"
        (write_policy or (lambda p, t: p.write_text(t)))(path, text)
        log_path = workdir / "sidecar.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--config", str(path),
             "--grpc-address", grpc_address or f"127.0.0.1:{ports.extauthz}",
             "--metrics-address", f"127.0.0.1:{metrics_port}", "--watch-interval", "0.2", *(extra_args or [])],
            stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        )
        envoy = None
        try:
            wait_http(f"http://127.0.0.1:{metrics_port}/readyz", 30, process)
            if with_envoy:
                # Held before it starts, so a failed start still stops it and removes its config folder.
                envoy = Envoy(render_envoy_config(ports, edit=edit_envoy), log_path=workdir / "envoy.log")
                envoy.start()
            yield OpsStack(idp, upstream, envoy, ports, metrics_port, workdir, process, log_path)
        finally:
            if envoy is not None:
                envoy.stop()
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
