"""The floor: the cheapest ext_authz server Python can be, to measure extauthz against.

It answers every Check OK with one header and never reads the request, so what
it costs is grpc.aio and protobuf, not any decision. extauthz behind the same
Envoy settings can only be slower; the ratio says by how much.

    python -m bench.floor_authz --port 19001 [--uvloop]

``--uvloop`` runs the same server on uvloop, the loop ``extauthz serve`` uses:
the floor of what any Python ext_authz server on that loop can cost.
"""

from __future__ import annotations

import argparse
import asyncio

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


async def serve(port: int) -> None:
    server = grpc.aio.server()
    external_auth_pb2_grpc.add_AuthorizationServicer_to_server(Floor(), server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--uvloop", action="store_true", help="serve on uvloop (as extauthz serve does)")
    args = parser.parse_args()
    if args.uvloop:
        import uvloop

        uvloop.run(serve(args.port))
    else:
        asyncio.run(serve(args.port))


if __name__ == "__main__":
    main()
