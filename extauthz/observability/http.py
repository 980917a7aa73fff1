"""``/metrics``, ``/healthz`` and ``/readyz`` on one plain-HTTP port (``server.metricsAddress``).

A tiny HTTP/1.1 server on the sidecar's own asyncio loop, so no thread and no new
dependency: it answers GET/HEAD on three paths and closes the connection after
each answer (Prometheus and kubelet open one connection per scrape or probe).

* ``/metrics``: the sidecar's registry, in Prometheus text or OpenMetrics
  depending on ``Accept`` (prometheus_client's own negotiation).
* ``/healthz``: liveness. Answering at all proves the event loop is not wedged,
  which is all a restart could fix.
* ``/readyz``: readiness. 200 once signing keys are loaded, 503 before that and
  while draining; the JSON body names the serving policy digest, key ages and
  the last reload, so ``kubectl exec ... curl /readyz`` answers "which policy is
  live and did my edit take?". Kubernetes' gRPC probes cannot speak TLS, so with
  TLS on the gRPC listener this is the endpoint to probe.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = structlog.get_logger("extauthz.http")

READ_TIMEOUT_SECONDS = 5.0
MAX_HEAD_BYTES = 16 * 1024

Readiness = Callable[[], tuple[bool, Mapping[str, Any]]]


class ObservabilityServer:
    def __init__(self, host: str, port: int, registry: CollectorRegistry, readiness: Readiness) -> None:
        self.host = host
        self.port = port
        self.registry = registry
        self.readiness = readiness
        self.draining = False
        """Set on SIGTERM: /readyz turns 503 so Kubernetes stops sending new traffic."""
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, limit=MAX_HEAD_BYTES)
        sockets = self._server.sockets
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        log.info("http_listening", address=f"{self.host}:{self.port}", paths=["/metrics", "/healthz", "/readyz"])

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        method = "GET"
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_SECONDS)
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _version = request_line.split(" ", 2)
            headers = {}
            for line in header_lines:
                name, sep, value = line.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            status, content_type, body = self._route(method, target.split("?", 1)[0], headers)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            status, content_type, body = 400, "text/plain; charset=utf-8", b"bad request\n"
        except Exception as exc:  # one broken scrape must not take the port down
            log.exception("http_handler_failed", error=f"{type(exc).__name__}: {exc}")
            status, content_type, body = 500, "text/plain; charset=utf-8", b"internal error\n"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "OK")
        header = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: {content_type}\r\n"
                  f"content-length: {len(body)}\r\ncache-control: no-store\r\nconnection: close\r\n\r\n")
        body_to_send = b"" if method == "HEAD" else body
        try:
            writer.write(header.encode("latin-1") + body_to_send)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    def _route(self, method: str, path: str, headers: Mapping[str, str]) -> tuple[int, str, bytes]:
        if path not in ("/metrics", "/healthz", "/readyz"):
            return 404, "text/plain; charset=utf-8", b"not found: try /metrics, /healthz or /readyz\n"
        if method not in ("GET", "HEAD"):
            return 405, "text/plain; charset=utf-8", b"method not allowed\n"
        if path == "/metrics":
            encoder, content_type = choose_encoder(headers.get("accept", ""))
            return 200, content_type, encoder(self.registry)
        if path == "/healthz":
            return 200, "application/json", b'{"status":"alive"}\n'
        ready, body = self.readiness()
        document = {**body, "draining": self.draining}
        ready = ready and not self.draining
        return (200 if ready else 503), "application/json", json.dumps(document).encode() + b"\n"
