"""The gRPC server as a process: readiness follows key loading; SIGTERM drains in-flight Checks."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from extauthz.demo.idp import IdentityProvider
from extauthz.demo.processes import SidecarProcess, free_port
from extauthz.policy.errors import PolicyError
from extauthz.policy.loader import parse_policy
from tests.e2e.stack import write_policy

POLICY = """
providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api], jwksRefreshSeconds: 60}
proxies:
  - name: orders-api
    rules: [{effect: allow}]
server: {drainSeconds: 1}
"""


def check_request(token: str, path: str = "/v1/orders") -> external_auth_pb2.CheckRequest:
    http = attribute_context_pb2.AttributeContext.HttpRequest(
        method="GET", path=path, host="api", headers={"authorization": f"Bearer {token}", "x-request-id": "r1"})
    return external_auth_pb2.CheckRequest(attributes=attribute_context_pb2.AttributeContext(
        request=attribute_context_pb2.AttributeContext.Request(http=http),
        context_extensions={"proxy": "orders-api"}))


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return int(health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=service), timeout=2).status)


def test_not_serving_until_keys_load_then_serving(tmp_path: Path) -> None:
    with IdentityProvider() as idp:
        idp.down = True
        sidecar = SidecarProcess(write_policy(tmp_path, POLICY, idp), free_port()).start(wait_ready=False)
        try:
            assert health_status(sidecar.port) == health_pb2.HealthCheckResponse.NOT_SERVING
            assert health_status(sidecar.port, "envoy.service.auth.v3.Authorization") == \
                health_pb2.HealthCheckResponse.NOT_SERVING
            with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
                answer = external_auth_pb2_grpc.AuthorizationStub(channel).Check(check_request(idp.token(sub="u")))
            assert answer.denied_response.status.code == 503  # fail closed while keys are missing
            idp.down = False
            sidecar.wait_ready(timeout=15)  # the background refresh retries until the IdP answers
            assert "jwks_fetch_failed" in sidecar.logs()
        finally:
            sidecar.stop()


def test_sigterm_drains_in_flight_checks(tmp_path: Path) -> None:
    with IdentityProvider() as idp:
        sidecar = SidecarProcess(write_policy(tmp_path, POLICY, idp), free_port()).start()
        try:
            new_key = idp.rotate()   # an unknown kid makes the Check fetch the JWKS...
            idp.delay = 1.0          # ...from a slow IdP, so it is in flight when SIGTERM arrives
            result: dict[str, object] = {}

            def call() -> None:
                with grpc.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
                    stub = external_auth_pb2_grpc.AuthorizationStub(channel)
                    result["answer"] = stub.Check(check_request(idp.token(sub="u", key=new_key)), timeout=10)

            worker = threading.Thread(target=call)
            worker.start()
            time.sleep(0.4)
            assert sidecar.process is not None
            sidecar.process.send_signal(signal.SIGTERM)
            worker.join(15)
            answer = result["answer"]
            assert isinstance(answer, external_auth_pb2.CheckResponse)
            assert answer.HasField("ok_response")
            assert sidecar.process.wait(15) == 0
            assert "draining" in sidecar.logs()
        finally:
            sidecar.stop()


# Starts, reloads a good edit, then one only the shape pass (pydantic's) refuses; prints what it saw.
SERVING_PROCESS = """
import asyncio, json, sys
from pathlib import Path
from extauthz.server.runtime import RuntimeHolder

async def main() -> None:
    path = Path(sys.argv[1])
    holder = await RuntimeHolder.start(path)
    try:
        path.write_text(path.read_text().replace("drainSeconds: 1", "drainSeconds: 2"))
        reloaded = await holder.reload()
        path.write_text(path.read_text().replace("jwksRefreshSeconds: 60", "clockSkewSeconds: -600"))
        refused = await holder.reload()
        errors = list(holder.last_reload.errors) if holder.last_reload else []
    finally:
        await holder.close()
    print(json.dumps({"reloaded": reloaded.value, "refused": refused.value, "errors": errors,
                      "pydantic": sorted(m for m in sys.modules if m.startswith("pydantic"))}))

asyncio.run(main())
"""


def test_the_server_checks_the_policy_shape_on_every_load_without_holding_pydantic(tmp_path: Path) -> None:
    """The shape pass runs in a short child: the server keeps its ~10 MB, refuses the same mistakes, word for word."""
    with IdentityProvider() as idp:
        path = write_policy(tmp_path, POLICY, idp)
        run = subprocess.run([sys.executable, "-c", SERVING_PROCESS, str(path)],
                             capture_output=True, text=True, timeout=120, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    seen = json.loads(run.stdout.splitlines()[-1])
    with pytest.raises(PolicyError) as in_process:  # the shape pass here, with pydantic
        parse_policy(path.read_bytes(), str(path), path.parent)
    expected = [str(issue) for issue in in_process.value.issues]
    assert any("clockSkewSeconds: must be zero or more, found -600" in line for line in expected)
    assert (seen["reloaded"], seen["refused"], seen["errors"]) == ("reloaded", "invalid", expected)
    assert seen["pydantic"] == []
