"""The floor: the cheapest ext_authz server Python can be, to measure extauthz against.

It answers every Check OK with one header and never reads the request, so what
it costs is grpc.aio and protobuf, not any decision. extauthz behind the same
Envoy settings can only be slower; the ratio says by how much.

    python -m bench.floor_authz --port 19001 [--uvloop] [--tls DIR]

``--uvloop`` runs the same server on uvloop, the loop ``extauthz serve`` uses:
the floor of what any Python ext_authz server on that loop can cost.

``--tls DIR`` serves TLS with grpc.aio's own TLS (gRPC core's, in C) from
``DIR/tls.crt`` and ``DIR/tls.key``, requiring a client certificate signed by
``DIR/ca.crt`` when that file exists (mTLS): the floor of a shared extauthz
Deployment reached over the network (``bench.workloads.TlsFiles`` writes them).
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.service.auth.v3 import external_auth_pb2, external_auth_pb2_grpc
from google.rpc import status_pb2

OK = external_auth_pb2.CheckResponse(
    status=status_pb2.Status(code=0),
    ok_response=external_auth_pb2.OkHttpResponse(
        headers=[base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="x-floor", value="1"))]),
)


class Floor(external_auth_pb2_grpc.AuthorizationServicer):  # type: ignore[misc]
    async def Check(self, request: object, context: object) -> external_auth_pb2.CheckResponse:  # noqa: N802
        return OK


async def serve(port: int, tls: Path | None = None) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Floor(), server)
    address = f"127.0.0.1:{port}"
    if tls is None:
        server.add_insecure_port(address)
    else:
        ca = tls / "ca.crt"
        server.add_secure_port(address, grpc.ssl_server_credentials(
            [((tls / "tls.key").read_bytes(), (tls / "tls.crt").read_bytes())],
            root_certificates=ca.read_bytes() if ca.exists() else None, require_client_auth=ca.exists()))
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop (as extauthz serve does)")
    parser.add_argument("--tls", type=Path, metavar="DIR", help="serve TLS from DIR/tls.crt and DIR/tls.key; "
                        "mTLS when DIR/ca.crt exists")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port, args.tls))
    else:
        asyncio.run(serve(args.port, args.tls))


if __name__ == "__main__":
    main()
