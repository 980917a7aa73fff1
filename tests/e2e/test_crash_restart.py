"""A sidecar killed with SIGKILL (an OOM kill) and started again at once answers through Envoy within 2 s.

Through the real Envoy on the shipped config. The killed process's end of
every connection (Envoy's to the gRPC port, a scrape of the metrics port, a
client of the admin port) sits in TIME_WAIT for about a minute: the new
process must listen on the same addresses all the same, and Envoy, which
neither health-checks the extauthz cluster nor ejects it as an outlier, sends
the very next Check to it. Until then clients get the documented 503.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pytest

from extauthz.demo.processes import free_port
from tests.e2e.ops_stack import wait_until
from tests.e2e.stack import Stack, Transport, running_stack

pytestmark = pytest.mark.envoy

POLICY = """
providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - name: orders-api
    rules: [{effect: allow}]
"""
RESTARTS = 5
WITHIN_SECONDS = 2.0  # from the restart command to the first 200 through Envoy
LOAD_THREADS = 3
BACK_OFF_SECONDS = 0.05
TIME_WAIT = "06"  # the state column of /proc/net/tcp
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")  # and an empty SETTINGS
SETTINGS, ACK = 0x4, 0x1
STARTUP_EVENTS = ("policy_loaded", "http_listening", "listening")


@dataclass
class Crashable:
    stack: Stack
    metrics_port: int
    admin_port: int
    times: list[float] = field(default_factory=list)

    @property
    def token(self) -> str:
        return self.stack.idp.token(sub="user-123")

    @property
    def envoy_side_port(self) -> int:
        """The sidecar port Envoy's ext_authz connects to (gRPC, or HTTP/1.1 with envoy/envoy-http.yaml)."""
        return self.stack.ports.http if self.stack.transport == "http" else self.stack.ports.extauthz

    @property
    def cluster(self) -> str:
        return "extauthz_http" if self.stack.transport == "http" else "extauthz"

    def kill(self) -> None:
        process = self.stack.sidecar.process
        assert process is not None
        process.kill()
        process.wait(10)

    def restart(self, run: str) -> float:
        """Start the sidecar again on the same addresses: seconds from the command to the first 200."""
        sidecar = self.stack.sidecar
        sidecar.log_path = self.stack.workdir / f"sidecar-{run}.log"
        token = self.token
        started_at, started = time.time(), time.monotonic()
        try:
            sidecar.start(wait_ready=False)  # returns once the gRPC port is open; raises if the process exits
            while (status := self.stack.request("GET", "/x", token).status) != 200:
                assert status == 503, status
                assert time.monotonic() - started < 30, f"no 200 within 30 s: {timeline(sidecar.log_path, started_at)}"
                time.sleep(0.01)
        except RuntimeError as exc:
            raise AssertionError(f"{exc}:\n{sidecar.logs()}") from None
        elapsed = time.monotonic() - started
        self.times.append(elapsed)
        print(f"{run}: first 200 after {elapsed:.3f} s ({timeline(sidecar.log_path, started_at)})")
        return elapsed


def timeline(log_path: Path, started_at: float) -> str:
    """When the new process logged its startup steps, in seconds from the restart command."""
    seen = {}
    for line in log_path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") in STARTUP_EVENTS and entry["event"] not in seen:
                seen[entry["event"]] = datetime.fromisoformat(entry["timestamp"]).timestamp() - started_at
    return ", ".join(f"{event} {seen[event]:.3f} s" for event in STARTUP_EVENTS if event in seen)


def tcp_states(port: int) -> list[str]:
    """The states of the TCP sockets bound to local port ``port`` (the server's ends).

    IPv6 too: grpc.aio listens dual-stack, its IPv4 connections are IPv6 sockets.
    """
    states = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[1].rpartition(":")[2], 16) == port:
                states.append(fields[3])
    return states


def scrape_closed_by_the_server(port: int) -> None:
    """A /healthz the server answers and closes first, as it does every scrape: TIME_WAIT on its end."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as scrape:
        scrape.sendall(b"GET /healthz HTTP/1.1\r\nhost: sidecar\r\n\r\n")
        answer = b""
        while chunk := scrape.recv(4096):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200 "), answer


@contextmanager
def admin_connection(port: int) -> Iterator[socket.socket]:
    """An HTTP/2 connection the admin server (grpc.aio) has accepted and read all of, held open."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as admin:
        admin.sendall(H2_PREFACE)
        received = b""
        while True:  # until the server acknowledges our SETTINGS: it has read everything sent
            while len(received) < 9 or len(received) < 9 + int.from_bytes(received[:3], "big"):
                chunk = admin.recv(4096)
                assert chunk, "the admin server closed the connection"
                received += chunk
            kind, flags, size = received[3], received[4], int.from_bytes(received[:3], "big")
            received = received[9 + size:]
            if kind == SETTINGS and flags & ACK:
                break
        yield admin


def envoy_connections(crashable: Crashable) -> int:
    return crashable.stack.envoy.stats().get(f"cluster.{crashable.cluster}.upstream_cx_active", 0)


@contextmanager
def crashable_stack(workdir: Path, transport: Transport) -> Iterator[Crashable]:
    """Every listener the sidecar has, so the restart proves each of them binds over TIME_WAIT."""
    metrics_port, admin_port = free_port(), free_port()
    args = ["--metrics-address", f"127.0.0.1:{metrics_port}", "--admin-address", f"127.0.0.1:{admin_port}"]
    with running_stack(workdir, POLICY, sidecar_args=args, transport=transport) as stack:
        crashable = Crashable(stack, metrics_port, admin_port)
        yield crashable
    restarted = crashable.stack.sidecar.process
    assert restarted is not None and restarted.poll() is not None  # the stack stopped the last one started


@pytest.mark.parametrize("transport", ["grpc", "grpcio", "http"])
def test_a_killed_sidecar_restarted_at_once_answers_within_2s_while_idle(
    tmp_path: Path, transport: Transport,
) -> None:
    """Envoy's connections sit idle when the sidecar dies: the case that always leaves TIME_WAIT behind."""
    with crashable_stack(tmp_path, transport) as crashable:
        for run in range(1, RESTARTS + 1):
            for _ in range(3):
                assert crashable.stack.request("GET", "/x", crashable.token).status == 200
            wait_until(lambda: envoy_connections(crashable) >= 1, "Envoy to hold a connection to the sidecar")
            ports = (crashable.envoy_side_port, crashable.metrics_port, crashable.admin_port)
            earlier = {port: tcp_states(port).count(TIME_WAIT) for port in ports}  # left by the runs before
            scrape_closed_by_the_server(crashable.metrics_port)
            with admin_connection(crashable.admin_port) as admin:
                crashable.kill()
                while admin.recv(4096):  # to the kernel's FIN: closing now leaves TIME_WAIT on the server's end
                    pass
            for port, before in earlier.items():
                wait_until(lambda port=port, before=before: tcp_states(port).count(TIME_WAIT) > before,
                           f"a new TIME_WAIT on port {port}", 10)
            assert crashable.restart(f"{transport}-idle-{run}") < WITHIN_SECONDS, crashable.times
    print(f"{transport}, idle: " + ", ".join(f"{t:.3f}" for t in crashable.times))


class Load:
    """Threads sending requests through Envoy, each recording (sent, answered, status).

    Back to back while they are answered; after a 503 a thread waits
    :data:`BACK_OFF_SECONDS` (the 503 says ``retry-after: 1``): a storm of
    instant 503s would only measure how much CPU the test's own clients take
    from the sidecar starting on the same cores.
    """

    def __init__(self, crashable: Crashable, threads: int) -> None:
        self.crashable = crashable
        self.token = crashable.token
        self.stopping = threading.Event()
        self.results: list[list[tuple[float, float, int]]] = [[] for _ in range(threads)]
        self.threads = [threading.Thread(target=self._send, args=(mine,), daemon=True) for mine in self.results]

    def _send(self, results: list[tuple[float, float, int]]) -> None:
        while not self.stopping.is_set():
            sent = time.monotonic()
            try:
                status = self.crashable.stack.request("GET", "/x", self.token).status
            except OSError:
                status = 0  # Envoy itself did not answer: counted, and fails the test below
            results.append((sent, time.monotonic(), status))
            if status != 200:
                self.stopping.wait(BACK_OFF_SECONDS)

    def answered_since(self, moment: float) -> bool:
        """Every thread has had a 200 for a request sent after ``moment``."""
        return all(any(status == 200 and sent > moment for sent, _, status in mine) for mine in self.results)

    def in_flight_at(self, moment: float) -> int:
        return sum(1 for mine in self.results for sent, answered, _ in mine if sent <= moment <= answered)

    def statuses(self) -> set[int]:
        return {status for mine in self.results for _, _, status in mine}

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(30)


def test_a_killed_sidecar_restarted_at_once_answers_within_2s_under_load(tmp_path: Path) -> None:
    with crashable_stack(tmp_path, "grpc") as crashable, Load(crashable, LOAD_THREADS) as load:
        in_flight = []
        since = time.monotonic()
        for run in range(1, RESTARTS + 1):
            wait_until(lambda since=since: load.answered_since(since), "every load thread to get a 200")
            killed = time.monotonic()
            crashable.kill()
            in_flight.append(load.in_flight_at(killed))
            assert crashable.restart(f"load-{run}") < WITHIN_SECONDS, crashable.times
            since = time.monotonic()
        wait_until(lambda: load.answered_since(since), "every load thread to get a 200 after the last restart")
    assert load.statuses() == {200, 503}, load.statuses()  # clients saw the outage as the documented 503 only
    print(f"grpc, under load: {', '.join(f'{t:.3f}' for t in crashable.times)}; "
          f"requests in flight at each kill: {in_flight}")

