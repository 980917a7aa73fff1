"""A real stack for end-to-end tests: IdP (JWKS over HTTP) + app + extauthz + Envoy.

Envoy runs the config shipped in ``envoy/`` with only ports rewritten; the
sidecar runs as ``python -m extauthz serve``, exactly as users run it. A stack
asks the sidecar over gRPC (``envoy/envoy.yaml``), over HTTP/1.1
(``transport="http"``: ``envoy/envoy-http.yaml`` and ``--http-address``), or over
gRPC served by grpc.aio instead of the sidecar's own HTTP/2 server
(``transport="grpcio"``); the response phase is gRPC ext_proc in every case.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from extauthz.demo.idp import IdentityProvider
from extauthz.demo.processes import ENVOY_DIR, Envoy, Ports, SidecarProcess, render_envoy_config
from extauthz.demo.upstream import SampleApi
from extauthz.server.app import GRPC_SERVER_ENV


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


Transport = Literal["grpc", "http", "grpcio"]
TRANSPORTS: tuple[Transport, ...] = ("grpc", "http", "grpcio")
"""gRPC on the sidecar's own HTTP/2 server (the default), HTTP/1.1, and gRPC on grpc.aio (:data:`GRPC_SERVER_ENV`)."""
ENVOY_CONFIGS: dict[Transport, Path] = {"grpc": ENVOY_DIR / "envoy.yaml", "http": ENVOY_DIR / "envoy-http.yaml",
                                        "grpcio": ENVOY_DIR / "envoy.yaml"}


@dataclass
class Stack:
    idp: IdentityProvider
    upstream: SampleApi
    sidecar: SidecarProcess
    envoy: Envoy
    ports: Ports
    workdir: Path
    transport: Transport = "grpc"

    def request(self, method: str, path: str, token: str | None = None,
                headers: dict[str, str] | None = None, body: bytes | None = None) -> Response:
        conn = http.client.HTTPConnection("127.0.0.1", self.ports.listener, timeout=15)
        try:
            sent = dict(headers or {})
            if token is not None:
                sent["authorization"] = f"Bearer {token}"
            conn.request(method, path, body=body, headers=sent)
            r = conn.getresponse()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
        finally:
            conn.close()

    def last_upstream_request(self) -> dict[str, Any]:
        return self.upstream.requests[-1]


def write_policy(workdir: Path, text: str, idp: IdentityProvider) -> Path:
    """Write a policy, replacing ``ISSUER`` and ``JWKS_URI`` with the test IdP's."""
    path = workdir / "policy.yaml"
    path.write_text(text.replace("JWKS_URI", idp.jwks_uri).replace("ISSUER", idp.issuer))
    return path


@contextmanager
def running_stack(
    workdir: Path,
    policy: str,
    envoy_config: Path | None = None,
    edit_envoy: Callable[[dict[str, Any]], None] | None = None,
    files: dict[str, str] | None = None,
    sidecar_env: dict[str, str] | None = None,
    sidecar_args: list[str] | None = None,
    upstream_factory: Callable[[int], AbstractContextManager[Any]] | None = None,
    transport: Transport = "grpc",
) -> Iterator[Stack]:
    """``upstream_factory(port)`` replaces the sample upstream (a context manager serving on ``port``).

    ``envoy_config`` defaults to the shipped config of ``transport``.
    """
    ports = Ports.free()
    if transport == "http":
        sidecar_args = [*(sidecar_args or []), "--http-address", f"127.0.0.1:{ports.http}"]
    if transport == "grpcio":
        sidecar_env = {**(sidecar_env or {}), GRPC_SERVER_ENV: "grpcio"}
    for name, content in (files or {}).items():
        (workdir / name).write_text(content)
    make_upstream = upstream_factory or (lambda port: SampleApi(port=port))
    with IdentityProvider() as idp, make_upstream(ports.app) as upstream:
        config = write_policy(workdir, policy, idp)
        sidecar = SidecarProcess(config, ports.extauthz, env=sidecar_env, log_path=workdir / "sidecar.log",
                          extra=sidecar_args)
        envoy = Envoy(render_envoy_config(ports, envoy_config or ENVOY_CONFIGS[transport], edit_envoy),
                      log_path=workdir / "envoy.log")
        try:
            sidecar.start()
            envoy.start()
            yield Stack(idp, upstream, sidecar, envoy, ports, workdir, transport)
        finally:
            envoy.stop()
            sidecar.stop()


class TransportStacks(dict[Transport, Stack]):
    """One stack per transport, each started on first use (so ``-k grpc`` starts one)."""

    def __init__(self, start: Callable[[Transport], AbstractContextManager[Stack]], running: ExitStack) -> None:
        super().__init__()
        self._start = start
        self._running = running

    def __missing__(self, transport: Transport) -> Stack:
        self[transport] = self._running.enter_context(self._start(transport))
        return self[transport]


@contextmanager
def transport_stacks(start: Callable[[Transport], AbstractContextManager[Stack]]) -> Iterator[TransportStacks]:
    """``start(transport)`` (e.g. a :func:`running_stack`) per transport used; all stopped at the end."""
    with ExitStack() as running:
        yield TransportStacks(start, running)
