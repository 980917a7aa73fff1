"""The benchmark's upstream: a minimal keep-alive HTTP/1.1 server on asyncio, in its own process.

The demo's SampleApi (http.server, one thread per connection) tops out below
what Envoy can push on this machine, so benchmarks behind it would measure the
upstream. This one answers from pre-encoded bytes: ``GET /v1/orders`` gets the
~10 KB orders document (the filtered scenario's body), every other request a
small JSON object. It is run as its own process so its CPU never counts as the
harness's or the sidecar's.

    python -m bench.upstream --port 18081 [--orders-bytes 10000]
    python -m bench.upstream --port 18081 --sample-api   # the demo's SampleApi instead, for comparison
"""

from __future__ import annotations

import argparse
import asyncio
import threading

import orjson

from bench.workloads import orders_document


def _response(body: bytes) -> bytes:
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n\r\n"
    return head.encode() + body


class _Http(asyncio.Protocol):
    """Answers pipelined or sequential requests on one connection; bodies are read and dropped."""

    def __init__(self, small: bytes, orders: bytes) -> None:
        self.small, self.orders = small, orders
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        out: list[bytes] = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end]
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value.strip())
            if len(self.buffer) < end + 4 + length:
                break
            self.buffer = self.buffer[end + 4 + length:]
            target = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b"/"
            out.append(self.orders if target.split(b"?", 1)[0] == b"/v1/orders" else self.small)
        if out and self.transport is not None:
            self.transport.write(b"".join(out))


async def serve(port: int, orders_bytes: int) -> None:
    small = _response(b'{"ok":true}')
    orders = _response(orjson.dumps(orders_document(orders_bytes)))
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Http(small, orders), "127.0.0.1", port, backlog=1024)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--orders-bytes", type=int, default=10_000)
    parser.add_argument("--sample-api", action="store_true", help="serve the demo's SampleApi instead")
    args = parser.parse_args()
    if args.sample_api:
        from extauthz.demo.upstream import SampleApi

        with SampleApi(port=args.port) as api:
            api.requests = _Discard()  # every request would be kept for the tests' inspection
            # http.server listens with a backlog of 5: the connections Envoy opens at once overflow it, SYNs
            # are dropped, Envoy's 1 s connect timeout answers 503. A deeper backlog measures the server itself.
            api.server.socket.listen(128)
            threading.Event().wait()
    asyncio.run(serve(args.port, args.orders_bytes))


class _Discard(list):  # type: ignore[type-arg]
    """A list that keeps nothing: the SampleApi records each request, which would grow without bound here."""

    def append(self, item: object) -> None:
        pass


if __name__ == "__main__":
    main()
