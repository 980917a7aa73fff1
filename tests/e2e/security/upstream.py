"""A deliberately lenient service behind Envoy, for the adversarial suite.

It reads paths the way permissive frameworks do (percent-decoded once, ``;params``
cut, ``\\`` read as ``/``, dot segments resolved, a trailing slash ignored), serves
every method with the GET handler (HEAD without a body but with the full
``content-length``), honours ``Range`` (single and multiple ranges, ``If-Range``
ignored, so it always sends the part), and records every request exactly as it
arrived (duplicate headers kept). A filter scope or rule that is weaker than this
service's reading of a request shows up as a leak or a wrongly allowed request.

A test may make it misbehave per request with the ``x-test-upstream`` request
header (the policy under test never names it):

* ``206``: answer 206 with a ``content-range`` even though no range was asked for;
* ``content-range``: answer 200 with the whole body and a ``content-range`` header.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote

ORDERS: dict[str, Any] = {
    "orders": [
        {"orderId": "o-1", "userId": "user-123", "amount": 42, "status": "paid", "internalRef": "ref-secret-1"},
        {"orderId": "o-2", "userId": "user-456", "amount": 7, "status": "open", "internalRef": "ref-secret-2"},
        {"orderId": "o-3", "userId": "user-123", "amount": 13, "status": "open", "internalRef": "ref-secret-3"},
        {"orderId": "o-4", "userId": "user-789", "amount": 99, "status": "paid", "internalRef": "ref-secret-4"},
    ],
    "page": 1,
}
# Resources whose body is the orders document; everything else echoes the request.
DOCUMENTS = ("/v1/orders", "/v1/ledger")
BODY = json.dumps(ORDERS).encode()


def service_path(target: str) -> str:
    """The path as a lenient framework routes on it."""
    path = unquote(target.split("?", 1)[0], errors="replace").replace("\\", "/")
    out: list[str] = []
    for raw in path.split("/"):
        segment = raw.split(";", 1)[0]
        if segment == "..":
            if out:
                out.pop()
        elif segment not in ("", "."):
            out.append(segment)
    return "/" + "/".join(out)


def _ranges(spec: str, size: int) -> list[tuple[int, int]] | None:
    """``bytes=a-b,c-`` as inclusive (start, end) pairs; None when unsatisfiable or malformed."""
    unit, _, sets = spec.partition("=")
    if unit.strip().lower() != "bytes":
        return None
    out: list[tuple[int, int]] = []
    for part in sets.split(","):
        first, _, last = part.strip().partition("-")
        try:
            if first:
                start, end = int(first), (int(last) if last else size - 1)
            else:
                start, end = max(0, size - int(last)), size - 1
        except ValueError:
            return None
        if start >= size or end < start:
            return None
        out.append((start, min(end, size - 1)))
    return out or None


class LenientUpstream:
    """A threaded HTTP/1.1 server on ``port``; use as a context manager, like the sample upstream."""

    def __init__(self, port: int = 0, host: str = "127.0.0.1") -> None:
        self.requests: list[dict[str, Any]] = []
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                pairs = [(k.lower(), v) for k, v in self.headers.items()]
                seen = {"method": self.command, "path": self.path, "header_list": pairs,
                        "headers": dict(pairs), "body": body.decode("utf-8", "replace")}
                app.requests.append(seen)
                routed = service_path(self.path)
                if routed in DOCUMENTS:
                    data = BODY
                else:
                    data = json.dumps({k: v for k, v in seen.items() if k != "header_list"}).encode()
                behaviour = self.headers.get("x-test-upstream", "")
                status, headers = 200, [("content-type", "application/json")]
                if behaviour == "206":
                    status = 206
                    headers.append(("content-range", f"bytes 0-{len(data) - 1}/{len(data)}"))
                elif behaviour == "content-range":
                    headers.append(("content-range", f"bytes 0-{len(data) - 1}/{len(data)}"))
                elif "range" in self.headers:
                    status, headers, data = self._partial(self.headers["range"], data, headers)
                headers.append(("content-length", str(len(data))))
                self.send_response(status)
                for name, value in headers:
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            @staticmethod
            def _partial(spec: str, data: bytes, headers: list[tuple[str, str]]
                         ) -> tuple[int, list[tuple[str, str]], bytes]:
                ranges = _ranges(spec, len(data))
                if ranges is None:
                    return 416, [("content-range", f"bytes */{len(data)}")], b""
                if len(ranges) == 1:
                    start, end = ranges[0]
                    headers.append(("content-range", f"bytes {start}-{end}/{len(data)}"))
                    return 206, headers, data[start:end + 1]
                boundary = "PARTS"
                body = b"".join(
                    f"--{boundary}\r\ncontent-type: application/json\r\n"
                    f"content-range: bytes {start}-{end}/{len(data)}\r\n\r\n".encode() + data[start:end + 1] + b"\r\n"
                    for start, end in ranges
                ) + f"--{boundary}--\r\n".encode()
                return 206, [("content-type", f"multipart/byteranges; boundary={boundary}")], body

            def __getattr__(self, name: str) -> Any:
                # Every method, standard or not, is served by the same handler (as by the GET one).
                if name.startswith("do_"):
                    return self._handle
                raise AttributeError(name)

            def log_message(self, *args: object) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request: object, client_address: object) -> None:
                pass  # Envoy resets the upstream when it blocks a response mid-body

        self.server = Server((host, port), Handler)
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> LenientUpstream:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def seen(self, probe: str) -> list[dict[str, Any]]:
        """The requests that carried ``x-probe: <probe>`` (each attack is tagged with a fresh probe)."""
        return [r for r in list(self.requests) if r["headers"].get("x-probe") == probe]
