"""``extauthz serve --workers N`` without Envoy: the supervisor, its checks, signals, health and metrics.

Every worker is a real ``extauthz serve`` process fetching a real JWKS over HTTP
from the test IdP; the supervisor's ``/readyz`` and ``/metrics`` are read as
Prometheus and kubelet read them.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from extauthz.cli import Exit
from extauthz.demo.idp import IdentityProvider
from extauthz.demo.processes import free_port, wait_http
from extauthz.server.workers import available_cpus, cgroup_cpu_limit
from tests.e2e.k8s_pods import container, container_env, objects, pod_spec, quantity
from tests.e2e.ops_stack import alive, http_get, wait_until

POLICY = """
providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    rules: [{effect: allow}]
server:
  drainSeconds: DRAIN
"""
# For the checks made before anything is served: no IdP needed.
STATIC_POLICY = """providers:
  - {name: idp, issuer: https://idp.example, jwksUri: "http://127.0.0.1:1/jwks", audiences: [api]}
proxies:
  - {name: api, rules: [{effect: allow}]}
"""


@dataclass
class Sidecar:
    process: subprocess.Popen[bytes]
    metrics_port: int
    grpc_port: int
    log_path: Path
    policy: Path

    def get(self, path: str) -> tuple[int, str]:
        return http_get(self.metrics_port, path)

    def readyz(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.get("/readyz")[1])
        return result

    def metrics(self) -> dict[str, float]:
        """Every sample of /metrics, keyed by its name and labels as written."""
        out = {}
        for line in self.get("/metrics")[1].splitlines():
            if line and not line.startswith("#"):
                sample, _, value = line.rpartition(" ")
                out[sample] = float(value)
        return out

    def worker_pids(self) -> list[int]:
        return [w["pid"] for w in self.readyz()["workers"]]

    def logs(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.log_path.read_text(errors="replace").splitlines()
                if line.startswith("{")]


@contextmanager
def sidecar(tmp_path: Path, *args: str, drain: float = 0.5) -> Iterator[Sidecar]:
    with IdentityProvider() as idp:
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.replace("JWKS_URI", idp.jwks_uri).replace("ISSUER", idp.issuer)
                          .replace("DRAIN", str(drain)))
        metrics_port, grpc_port = free_port(), free_port()
        log_path = tmp_path / "sidecar.log"
        process = subprocess.Popen(
            [sys.executable, "-m", "extauthz", "serve", "--config", str(policy),
             "--grpc-address", f"127.0.0.1:{grpc_port}", "--metrics-address", f"127.0.0.1:{metrics_port}",
             "--watch-interval", "0", *args],
            stdout=log_path.open("wb"), stderr=subprocess.STDOUT,
        )
        try:
            wait_http(f"http://127.0.0.1:{metrics_port}/readyz", 60, process)
            yield Sidecar(process, metrics_port, grpc_port, log_path, policy)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
                try:
                    process.wait(20)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(5)


# --- how many workers -----------------------------------------------------------------


def test_the_cgroup_v2_quota_caps_the_cpus(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/\n") == 1.5
    assert available_cpus(tmp_path, "0::/\n") == min(2, len(os.sched_getaffinity(0)))  # 1.5 rounds up, as kubelet
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert available_cpus(tmp_path, "0::/\n") == 1
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/\n") is None
    assert available_cpus(tmp_path, "0::/\n") == len(os.sched_getaffinity(0))


def test_the_process_own_cgroup_is_read_before_the_root(tmp_path: Path) -> None:
    own = tmp_path / "kubepods" / "pod1" / "extauthz"
    own.mkdir(parents=True)
    (own / "cpu.max").write_text("100000 100000\n")
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path, "0::/kubepods/pod1/extauthz\n") == 1.0


def test_the_cgroup_v1_quota_caps_the_cpus(tmp_path: Path) -> None:
    cpu = tmp_path / "cpu"
    cpu.mkdir()
    (cpu / "cpu.cfs_quota_us").write_text("200000\n")
    (cpu / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path, "4:cpu,cpuacct:/\n") == 2.0
    (cpu / "cpu.cfs_quota_us").write_text("-1\n")
    assert cgroup_cpu_limit(tmp_path, "4:cpu,cpuacct:/\n") is None
    assert cgroup_cpu_limit(tmp_path / "nothing-here", "") is None


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_workers_must_be_a_positive_number_or_auto(tmp_path: Path, value: str) -> None:
    done = subprocess.run([sys.executable, "-m", "extauthz", "serve", "--config", "x.yaml", "--workers", value],
                          check=False, capture_output=True, text=True, timeout=30)
    assert done.returncode == Exit.USAGE
    assert "--workers" in done.stderr and "positive number or auto" in done.stderr


def test_auto_is_the_cpus_this_process_may_use(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--workers", "auto") as running:
        started = [e for e in running.logs() if e.get("event") == "supervisor_started"]
        cpus = len(os.sched_getaffinity(0))
        if cpus == 1:
            assert started == []  # one CPU: no supervisor, the sidecar is the single process it always was
        else:
            assert started and 1 <= started[0]["workers"] <= cpus
            assert started[0]["workers"] == available_cpus()
            assert len(running.readyz()["workers"]) == started[0]["workers"]


def test_auto_pinned_to_one_cpu_runs_one_process(tmp_path: Path) -> None:
    with IdentityProvider() as idp:
        policy = tmp_path / "pinned.yaml"
        policy.write_text(POLICY.replace("JWKS_URI", idp.jwks_uri).replace("ISSUER", idp.issuer)
                          .replace("DRAIN", "0"))
        metrics_port = free_port()
        process = subprocess.Popen(
            ["taskset", "-c", "0", sys.executable, "-m", "extauthz", "serve", "--config", str(policy),
             "--grpc-address", f"127.0.0.1:{free_port()}", "--metrics-address", f"127.0.0.1:{metrics_port}",
             "--workers", "auto"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            wait_http(f"http://127.0.0.1:{metrics_port}/readyz", 60, process)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/readyz", timeout=5) as r:
                body = json.loads(r.read())
        finally:
            process.send_signal(signal.SIGINT)
            out, _ = process.communicate(timeout=20)
    assert body["ready"] is True and "workers" not in body  # a single process: no supervisor in front of it
    assert b"supervisor_started" not in out
    assert process.returncode == 0


# --- before any worker starts ---------------------------------------------------------


def run_serve(tmp_path: Path, policy: str, *args: str,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "policy.yaml").write_text(policy)
    return subprocess.run(
        [sys.executable, "-m", "extauthz", "serve", "--config", str(tmp_path / "policy.yaml"), *args],
        check=False, capture_output=True, text=True, timeout=60, env=env,
    )


def test_a_broken_policy_fails_before_any_worker_starts(tmp_path: Path) -> None:
    done = run_serve(tmp_path, "providers: []\nproxies: []\nbogus: 1\n", "--workers", "2",
                     "--grpc-address", f"127.0.0.1:{free_port()}")
    assert done.returncode == Exit.POLICY
    assert "policy.yaml:3: bogus" in done.stderr and "Traceback" not in done.stderr
    assert "worker_started" not in done.stdout + done.stderr


def test_a_busy_grpc_port_is_the_usual_one_line(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = run_serve(tmp_path, STATIC_POLICY, "--workers", "2",
                         "--grpc-address", f"127.0.0.1:{port}")
    assert done.returncode == Exit.ADDRESS, done.stderr
    assert f"cannot listen on 127.0.0.1:{port} (gRPC" in done.stderr and "address already in use" in done.stderr
    assert "worker_started" not in done.stdout + done.stderr


def test_a_second_sidecar_cannot_join_the_workers_port(tmp_path: Path) -> None:
    """The workers share their port with SO_REUSEPORT; another sidecar must still be told it is taken."""
    with sidecar(tmp_path, "--workers", "2") as running:
        other = tmp_path / "other"
        other.mkdir()
        for workers in ("1", "2"):
            done = run_serve(other, STATIC_POLICY, "--workers", workers,
                             "--grpc-address", f"127.0.0.1:{running.grpc_port}")
            assert done.returncode == Exit.ADDRESS, done.stderr
            assert "address already in use" in done.stderr


def test_workers_share_one_unix_socket_that_the_supervisor_binds(tmp_path: Path) -> None:
    """Envoy's socket in a pod volume serves as many workers as a TCP port: the supervisor binds it once
    (mode 0660, as a single process does) and every worker accepts on it."""
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2

    from extauthz.server.authorization import CHECK_PATH

    path = Path(tempfile.mkdtemp(prefix="xz")) / "grpc.sock"  # a Unix socket path has at most 107 bytes
    try:
        with sidecar(tmp_path, "--workers", "2", "--grpc-address", f"unix:{path}") as running:
            wait_until(lambda: running.get("/readyz")[0] == 200, "both workers ready")
            assert path.stat().st_mode & 0o777 == 0o660
            check = external_auth_pb2.CheckRequest()
            check.attributes.request.http.path = "/v1/orders"
            check.attributes.request.http.method = "GET"
            for _ in range(40):  # a connection each: the kernel hands them to whichever worker accepts first
                with grpc.insecure_channel(f"unix:{path}") as channel:
                    answer = external_auth_pb2.CheckResponse.FromString(
                        channel.unary_unary(CHECK_PATH)(check.SerializeToString(), timeout=5))
                    assert answer.status.code == 16  # no token: UNAUTHENTICATED, from either worker
            wait_until(lambda: {e.get("worker") for e in running.logs() if e.get("event") == "decision"} == {0, 1},
                       "decisions from both workers")
            victim = running.worker_pids()[0]
            os.kill(victim, signal.SIGKILL)  # a replaced worker serves on the same socket
            wait_until(lambda: running.get("/readyz")[0] == 200 and victim not in running.worker_pids(),
                       "the replacement to be ready")
            with grpc.insecure_channel(f"unix:{path}") as channel:
                answer = external_auth_pb2.CheckResponse.FromString(
                    channel.unary_unary(CHECK_PATH)(check.SerializeToString(), timeout=5))
            assert answer.status.code == 16
    finally:
        shutil.rmtree(path.parent, ignore_errors=True)


def test_workers_on_a_unix_socket_need_the_own_grpc_server(tmp_path: Path) -> None:
    """grpc.aio binds its own sockets and cannot serve one the supervisor bound: a clear error, not a guess."""
    env = {**os.environ, "EXTAUTHZ_GRPC_SERVER": "grpcio"}
    done = run_serve(tmp_path, STATIC_POLICY, "--workers", "2", "--grpc-address", f"unix:{tmp_path}/x.sock", env=env)
    assert done.returncode == Exit.ADDRESS
    assert "one process" in done.stderr and "worker_started" not in done.stdout + done.stderr


# --- running -------------------------------------------------------------------------


def test_ready_when_every_worker_is_and_a_killed_worker_is_replaced(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--workers", "2") as running:
        wait_until(lambda: running.get("/readyz")[0] == 200, "both workers ready")
        ready = running.readyz()
        assert [w["worker"] for w in ready["workers"]] == [0, 1]
        assert all(w["ready"] for w in ready["workers"]) and ready["ready"] is True
        assert running.metrics()["extauthz_workers_ready"] == 2.0
        victim, survivor = running.worker_pids()

        os.kill(victim, signal.SIGKILL)
        # Not ready while a worker is missing...
        wait_until(lambda: running.get("/readyz")[0] == 503, "readyz to report the missing worker")
        # ...until its replacement (a new process) has its keys.
        wait_until(lambda: running.get("/readyz")[0] == 200, "the replacement to be ready")
        pids = running.worker_pids()
        assert pids[1] == survivor and pids[0] not in (victim, None)
        assert alive(pids[0]) and not alive(victim)
        assert running.metrics()["extauthz_worker_restarts_total"] == 1.0
        assert running.get("/healthz")[0] == 200
        exits = [e for e in running.logs() if e.get("event") == "worker_exited"]
        assert [(e["worker"], e["exit"]) for e in exits] == [(0, "signal SIGKILL")]


def test_sighup_reaches_every_worker(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--workers", "2") as running:
        wait_until(lambda: running.get("/readyz")[0] == 200, "both workers ready")
        first = running.readyz()["policy"]["digest"]
        running.policy.write_text(running.policy.read_text() + "# edited\n")
        running.process.send_signal(signal.SIGHUP)  # --watch-interval 0: only the signal reloads
        wait_until(lambda: running.readyz()["policy"]["digest"] != first, "every worker on the new policy")
        ready = running.readyz()
        new = ready["policy"]["digest"]
        assert {w["policy"] for w in ready["workers"]} == {new}
        assert ready["lastReload"]["result"] == "reloaded"
        samples = running.metrics()
        assert samples[f'extauthz_policy_info{{digest="{new}"}}'] == 1.0
        assert f'extauthz_policy_info{{digest="{first}"}}' not in samples  # as a single process shows it
        assert samples['extauthz_policy_reloads_total{result="ok"}'] == 2.0  # one per worker


def test_sigterm_drains_every_worker_then_exits(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--workers", "2", drain=3.0) as running:
        wait_until(lambda: running.get("/readyz")[0] == 200, "both workers ready")
        pids = running.worker_pids()
        metrics_dir = [Path(f"/proc/{pid}/environ").read_bytes() for pid in pids]
        running.process.send_signal(signal.SIGTERM)
        assert running.get("/readyz")[0] == 503  # not ready at once...
        assert all(alive(pid) for pid in pids)   # ...while the workers serve out their drain
        assert running.process.wait(30) == 0
        assert not any(alive(pid) for pid in pids)
    logs = running.logs()
    drained = [e for e in logs if e.get("event") == "draining" and "worker" in e]
    assert sorted(e["worker"] for e in drained) == [0, 1]
    assert all(e["drain_seconds"] == 3.0 and e["signal"] == "SIGTERM" for e in drained)
    assert not [e for e in logs if e.get("event") == "worker_exited"]  # a drain is not a crash
    directory = next(v for v in metrics_dir[0].split(b"\0") if v.startswith(b"PROMETHEUS_MULTIPROC_DIR="))
    assert not Path(directory.split(b"=", 1)[1].decode()).exists()  # the supervisor's files are gone


def test_workers_leave_when_the_supervisor_is_killed(tmp_path: Path) -> None:
    with sidecar(tmp_path, "--workers", "2", drain=0.5) as running:
        wait_until(lambda: running.get("/readyz")[0] == 200, "both workers ready")
        pids = running.worker_pids()
        running.process.kill()
        running.process.wait(10)
        wait_until(lambda: not any(alive(pid) for pid in pids), "orphaned workers to drain and exit")
    assert [e["worker"] for e in running.logs() if e.get("event") == "supervisor_gone"] in ([0, 1], [1, 0])


# --- the Kubernetes manifests -----------------------------------------------------------


@pytest.mark.parametrize("build", ["base", "overlays/example", "overlays/quickstart"])
def test_the_pod_runs_one_worker_per_cpu_of_the_sidecar_limit(build: str) -> None:
    docs = objects(build)
    sidecar_container = container(docs, "extauthz")
    env = container_env(pod_spec(docs), sidecar_container, node_cpus=64)
    assert "--workers" not in sidecar_container["args"]  # the image's CMD, as `docker run` runs it
    workers = int(env["EXTAUTHZ_WORKERS"])
    limit = quantity(sidecar_container["resources"]["limits"]["cpu"])
    assert workers == max(1, math.ceil(limit))  # from its own limit, never the node's 64 cores
    assert build != "overlays/example" or workers == 2  # the example raises the limit, and the workers with it


@pytest.mark.parametrize("build", ["base", "overlays/example", "overlays/quickstart"])
def test_no_other_container_shares_the_sidecar_user(build: str) -> None:
    """SO_REUSEPORT groups are per user: another container under the sidecar's user could join its port."""
    pod = pod_spec(objects(build))
    users = {c["name"]: {**pod["securityContext"], **c.get("securityContext", {})}.get("runAsUser")
             for c in pod["containers"]}
    assert users["extauthz"] is not None
    assert users["extauthz"] not in {user for name, user in users.items() if name != "extauthz"}
