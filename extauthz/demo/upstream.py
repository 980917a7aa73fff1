"""A sample application behind Envoy: echoes what it received, serves some orders.

``GET /v1/orders`` returns orders of three users (for the response filter);
everything else echoes the method, path and headers, so one can see what Envoy
forwarded: the injected credential and identity headers, never the caller's token.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ORDERS = {
    "orders": [
        {"orderId": "o-1", "userId": "user-123", "amount": 42, "status": "paid", "internalRef": "x-1",
         "audit": {"by": "ops"}},
        {"orderId": "o-2", "userId": "user-456", "amount": 7, "status": "open", "internalRef": "x-2",
         "audit": {"by": "ops"}},
        {"orderId": "o-3", "userId": "user-123", "amount": 13, "status": "open", "internalRef": "x-3",
         "audit": {"by": "ops"}},
        {"orderId": "o-4", "userId": "user-789", "amount": 99, "status": "paid", "internalRef": "x-4",
         "audit": {"by": "ops"}},
    ],
    "page": 1,
}


class SampleApi:
    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.requests: list[dict[str, Any]] = []
        self.routes: dict[str, tuple[int, dict[str, str], bytes]] = {}
        app = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            disable_nagle_algorithm = True  # header and body go out in two writes

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                if length:
                    self.rfile.read(length)
                seen = {"method": self.command, "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()}}
                app.requests.append(seen)
                route = app.routes.get(self.path.split("?")[0])
                if route is not None:
                    status, headers, data = route
                elif self.path.split("?")[0] == "/v1/orders" and self.command == "GET":
                    status, headers, data = 200, {"content-type": "application/json"}, json.dumps(ORDERS).encode()
                else:
                    status, headers, data = 200, {"content-type": "application/json"}, json.dumps(seen).encode()
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                if "content-length" not in {k.lower() for k in headers}:
                    self.send_header("content-length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _handle  # noqa: N815

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> SampleApi:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
