"""``extauthz serve --workers N``: N sidecar processes on one port, under a small supervisor.

Python runs one core per process, so a pod with more than one core runs one
worker per core. Each worker is the whole sidecar (its own event loop, token and
relationship caches, JWKS refreshes, policy watcher); the workers bind the same
gRPC port with ``SO_REUSEPORT`` and the kernel spreads incoming *connections*
over them. Nothing is shared but Redis, when the policy configures it.

The supervisor is the parent: it loads and checks the policy once (a broken
policy fails before any worker starts), probes the ports once, serves
``/metrics``, ``/healthz`` and ``/readyz`` for the whole sidecar, forwards
SIGTERM, SIGINT and SIGHUP, restarts a worker that dies (with backoff) and exits
once every worker has drained and exited. It runs no gRPC server and builds
no runtime, so it stays small.

Workers are started by re-running ``python -m extauthz serve ... --worker-of
INDEX:FD`` rather than by ``multiprocessing``: a worker is then exactly the
process a single-worker sidecar is (same entry point, same signal handling,
nothing pickled, no fork of a process that may hold gRPC threads), and ``ps``
shows what each process is. ``FD`` is the write end of a pipe: the worker
writes a JSON line with its readiness every :data:`HEARTBEAT_SECONDS`; the
supervisor reads it for ``/readyz`` and to find a wedged worker, and the worker
reads the pipe breaking as "the supervisor is gone" and drains.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from extauthz.observability.http import ObservabilityServer
from extauthz.policy.model import Policy
from extauthz.server.validation import (
    INHERITED_SOCKETS_ENV,
    ListenError,
    bind_unix,
    parse_address,
    parse_admin_address,
    probe_listen,
)

log = structlog.get_logger("extauthz.workers")

HEARTBEAT_SECONDS = 0.5
"""How often a worker tells the supervisor how it is."""
STALE_SECONDS = 5.0
"""A worker silent this long counts as not ready (its event loop is not getting round to anything)."""
UNRESPONSIVE_SECONDS = 30.0
"""A worker silent this long is killed and replaced, as kubelet's liveness probe would restart a single process."""
STABLE_SECONDS = 30.0
"""A worker that ran this long before dying is restarted at once; faster deaths back off."""
BACKOFF_SECONDS = (0.5, 30.0)
"""First and longest wait before restarting a worker that keeps dying."""
STOP_MARGIN_SECONDS = 15.0
"""After SIGTERM, beyond drainSeconds and the in-flight grace, before stragglers are killed."""

# Worker exit codes that mean "this cannot work" (the CLI's exit codes 2-6): a worker of
# the first generation that exits with one of them before ever reporting stops the sidecar
# with the same code, instead of being restarted forever.
_STARTUP_MISTAKES = frozenset({2, 3, 4, 5, 6})


# --- how many ------------------------------------------------------------------------


def parse_workers(value: str) -> int | str:
    """``--workers``: a positive number or ``auto``; raises ValueError (argparse reports it)."""
    if value == "auto":
        return value
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"--workers takes a positive number or auto, found {value!r}")
    return int(value)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), self_cgroup: str | None = None) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (1.5 for 150000/100000), or None when unlimited.

    cgroup v2 (``cpu.max``) first, then v1 (``cpu.cfs_quota_us``); in this
    process's own cgroup (from ``/proc/self/cgroup``) and at the root, where a
    container with its own cgroup namespace sees its limit.
    """
    if self_cgroup is None:
        try:
            self_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            self_cgroup = ""
    v2_path = v1_path = ""
    for line in self_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and not controllers:
            v2_path = path
        elif "cpu" in controllers.split(","):
            v1_path = path
    for directory in dict.fromkeys((root / v2_path.lstrip("/"), root)):
        try:
            quota, _, period = (directory / "cpu.max").read_text().strip().partition(" ")
        except OSError:
            continue
        if quota == "max":
            return None
        return int(quota) / int(period or "100000")
    for directory in dict.fromkeys((root / "cpu" / v1_path.lstrip("/"), root / "cpu")):
        try:
            quota_us = int((directory / "cpu.cfs_quota_us").read_text())
            period_us = int((directory / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return None if quota_us <= 0 else quota_us / period_us
    return None


def available_cpus(root: Path = Path("/sys/fs/cgroup"), self_cgroup: str | None = None) -> int:
    """CPUs this process may use: its affinity, capped by the cgroup quota rounded up (as kubelet rounds
    a CPU limit for ``resourceFieldRef``, so ``auto`` and Envoy's ``--concurrency`` agree)."""
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root, self_cgroup)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return max(1, cpus)


def resolve_workers(value: int | str | None) -> int:
    """The number of workers for ``--workers``, or the policy's ``server.workers`` (1 when unset)."""
    if value is None:
        return 1
    if isinstance(value, str):
        value = parse_workers(value)
    return available_cpus() if value == "auto" else int(value)


def line_atomic_stderr() -> None:
    """Make every log line one ``write(2)``: the supervisor and its workers share stderr.

    Python's stderr is unbuffered when it is not a terminal, and ``print`` (which
    structlog uses) writes a line and its newline separately, so two processes'
    lines would interleave mid-line and break the JSON a log shipper reads. A
    line-buffered stream over the same descriptor writes each line whole.
    """
    stream = sys.stderr
    if not isinstance(stream, io.TextIOWrapper):
        return
    try:
        fd = stream.fileno()
    except (OSError, ValueError):
        return
    stream.flush()
    raw = io.FileIO(fd, "w", closefd=False)
    sys.stderr = io.TextIOWrapper(io.BufferedWriter(raw, buffer_size=1 << 16), encoding=stream.encoding,
                                  errors=stream.errors, line_buffering=True)


# --- the worker's end --------------------------------------------------------------


@dataclass(frozen=True)
class WorkerOf:
    """``--worker-of INDEX:FD``: this process is worker INDEX; FD is its pipe to the supervisor."""

    index: int
    fd: int

    @classmethod
    def parse(cls, value: str) -> WorkerOf:
        index, sep, fd = value.partition(":")
        if not sep or not index.isdigit() or not fd.isdigit():
            raise ValueError(f"--worker-of takes INDEX:FD, found {value!r}")
        return cls(int(index), int(fd))


class _PipeProtocol(asyncio.BaseProtocol):
    def __init__(self, lost: Callable[[], None]) -> None:
        self._lost = lost

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost()


class WorkerLink:
    """The worker's side of the pipe: readiness heartbeats out, the supervisor's death in."""

    MAX_BUFFERED = 64 * 1024
    """A supervisor that stops reading must not make a worker buffer without end: heartbeats are dropped."""

    def __init__(self, of: WorkerOf) -> None:
        self.of = of
        self._transport: asyncio.WriteTransport | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self, readiness: Callable[[], tuple[bool, Mapping[str, Any]]], draining: Callable[[], bool],
                    orphaned: Callable[[], None]) -> None:
        """Report every heartbeat; call ``orphaned`` (drain and exit) if the supervisor goes away."""
        def lost() -> None:
            if not self._closing:
                log.warning("supervisor_gone", worker=self.of.index,
                            detail="the pipe to the supervisor broke: draining and exiting")
                orphaned()

        loop = asyncio.get_running_loop()
        pipe = os.fdopen(self.of.fd, "wb", buffering=0)
        self._transport, _ = await loop.connect_write_pipe(lambda: _PipeProtocol(lost), pipe)
        self._task = asyncio.create_task(self._beat(readiness, draining), name="worker-heartbeat")

    async def _beat(self, readiness: Callable[[], tuple[bool, Mapping[str, Any]]],
                    draining: Callable[[], bool]) -> None:
        while self._transport is not None and not self._transport.is_closing():
            ready, body = readiness()
            line = json.dumps({"ready": ready, "draining": draining(), "readiness": body}, default=str)
            if self._transport.get_write_buffer_size() < self.MAX_BUFFERED:
                self._transport.write(line.encode() + b"\n")
            await asyncio.sleep(HEARTBEAT_SECONDS)

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._transport is not None:
            self._transport.close()


# --- the supervisor ------------------------------------------------------------------


@dataclass
class _Slot:
    """One worker position: its current process and what it last reported."""

    index: int
    process: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    report: dict[str, Any] | None = None
    reported_at: float = 0.0
    spawned: int = 0
    failures: int = 0
    """Deaths in a row of workers that did not run :data:`STABLE_SECONDS`: sets the backoff."""
    pids: list[int] = field(default_factory=list)
    """Every process this slot has had: their counters stay in the metrics directory."""
    exit_code: int | None = None
    digest_since: float = 0.0
    """When the supervisor first heard the policy digest this worker serves now."""

    @property
    def digest(self) -> str | None:
        policy = ((self.report or {}).get("readiness") or {}).get("policy") or {}
        return policy.get("digest") if isinstance(policy, dict) else None

    @property
    def ready(self) -> bool:
        return (self.process is not None and self.report is not None and bool(self.report.get("ready"))
                and not self.report.get("draining") and time.monotonic() - self.reported_at < STALE_SECONDS)


@dataclass(frozen=True)
class SupervisorSettings:
    """What the supervisor serves and what every worker is started with."""

    config: Path
    grpc_address: str
    metrics_address: str
    admin_address: str
    http_address: str
    watch_interval: float
    log_format: str
    log_level: str


def metrics_directory() -> str:
    """A private directory for the workers' metric files, in memory when it can be.

    ``/dev/shm`` first (a tmpfs, and writable in a container whose root
    filesystem is read-only, as in k8s/base), unless ``TMPDIR`` names a place;
    else the system's temporary directory. Raises OSError naming where it tried.
    """
    places: list[str | None] = [None] if os.environ.get("TMPDIR") else ["/dev/shm", None]  # noqa: S108
    errors = []
    for place in places:
        try:
            return tempfile.mkdtemp(prefix="extauthz-metrics-", dir=place)
        except OSError as exc:
            errors.append(f"{place or tempfile.gettempdir()}: {exc.strerror}")
    raise OSError(f"no writable directory for the workers' metrics ({'; '.join(errors)}): "
                  f"mount an emptyDir and point TMPDIR at it")


def describe_exit(code: int) -> str:
    return f"signal {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


LISTEN_BACKLOG = 100
"""Connections waiting to be accepted on a Unix socket the workers share (asyncio's own default)."""


class Supervisor:
    def __init__(self, policy: Policy, settings: SupervisorSettings, workers: int) -> None:
        self.policy = policy
        self.settings = settings
        self.slots = [_Slot(index) for index in range(workers)]
        self.restarts = 0
        self.fatal: int | None = None
        self.metrics_dir = ""
        self.http: ObservabilityServer | None = None
        self._stopping: asyncio.Event | None = None
        self._listening = asyncio.Event()
        self._kill_timer: asyncio.TimerHandle | None = None
        self._shared: dict[str, socket.socket] = {}
        """Unix sockets bound here for the workers, by address."""

    def check_addresses(self) -> None:
        """Every listen address works for N processes, and nothing else holds one: before any worker starts."""
        shared = [(self.settings.grpc_address, "gRPC, server.grpcAddress")]
        if self.settings.http_address:
            shared.append((self.settings.http_address, "HTTP ext_authz, server.httpAddress"))
        for spec, what in shared:
            address = parse_address(spec)
            if address.is_unix:
                self._bind_shared(spec, address.unix_path, what)
                continue
            if address.port == 0:
                raise ListenError(f"cannot listen on {spec} ({what}) with {len(self.slots)} workers: "
                                  f"port 0 would give every worker a port of its own")
            probe_listen(spec, what)
        if self.settings.admin_address:
            parse_admin_address(self.settings.admin_address)
            probe_listen(self.settings.admin_address, "admin, server.adminAddress")
        if self.settings.metrics_address:
            parse_address(self.settings.metrics_address, unix=False)
            probe_listen(self.settings.metrics_address, "metrics, server.metricsAddress")

    def _bind_shared(self, spec: str, path: str, what: str) -> None:
        """A Unix socket, bound and listening here once, for every worker to accept on (it cannot be shared
        through SO_REUSEPORT as a TCP port is). grpc.aio binds its own sockets, so it cannot take part."""
        from extauthz.server.app import GRPC_SERVER_ENV, grpc_server

        if spec == self.settings.grpc_address and grpc_server() != "lean":
            raise ListenError(f"cannot listen on {spec} ({what}) with {len(self.slots)} workers: grpc.aio "
                              f"({GRPC_SERVER_ENV}=grpcio) binds its own sockets, so a Unix socket "
                              "serves one process there (--workers 1), or use a TCP port")
        sock = bind_unix(path, spec)
        sock.listen(LISTEN_BACKLOG)
        self._shared[spec] = sock

    async def run(self) -> int:
        """Until every worker has exited after a signal; returns the process exit code."""
        try:
            self.check_addresses()
            self._stopping = asyncio.Event()
            self.metrics_dir = metrics_directory()
            return await self._run()
        finally:
            if self.metrics_dir:
                shutil.rmtree(self.metrics_dir, ignore_errors=True)
            for sock in self._shared.values():
                sock.close()

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop, signal.SIGTERM)
        loop.add_signal_handler(signal.SIGINT, self.stop, signal.SIGINT)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        log.info("supervisor_started", workers=len(self.slots), pid=os.getpid(),
                 address=self.settings.grpc_address, policy=self.policy.digest)
        watchdog = asyncio.create_task(self._watchdog(), name="worker-watchdog")
        http = asyncio.create_task(self._serve_http(), name="supervisor-http")
        try:
            await asyncio.gather(*(self._keep(slot) for slot in self.slots))
        finally:
            watchdog.cancel()
            http.cancel()
            await asyncio.gather(http, return_exceptions=True)
            if self._kill_timer is not None:
                self._kill_timer.cancel()
            if self.http is not None:
                await self.http.stop()
        if self.fatal is not None:
            return self.fatal
        failed = {slot.index: slot.exit_code for slot in self.slots if slot.exit_code}
        log.info("stopped", workers=len(self.slots), **({"failed": failed} if failed else {}))
        return 1 if failed else 0

    async def _serve_http(self) -> None:
        """``/metrics``, ``/healthz``, ``/readyz``, once every worker listens.

        A single process opens this port only once its gRPC server is built, so
        a startup probe that answers means Checks are answered too; the same
        holds here.
        """
        assert self._stopping is not None
        if not self.settings.metrics_address:
            return
        await self._listening.wait()
        if self._stopping.is_set():
            return
        listen = parse_address(self.settings.metrics_address, unix=False)
        self.http = ObservabilityServer(listen.host, listen.port, self.registry(), self.readiness)
        try:
            await self.http.start()
        except OSError as exc:  # taken since the probe: as fatal as it is for a single process
            self.http = None
            log.error("http_listen_failed", address=self.settings.metrics_address, error=str(exc))
            self.fatal = 5  # the CLI's exit code for an address that cannot be listened on
            self.stop(signal.SIGINT)

    # --- signals ---

    def stop(self, sig: signal.Signals) -> None:
        """SIGTERM: every worker drains as a single process would; SIGINT: they stop at once."""
        assert self._stopping is not None
        first = not self._stopping.is_set()
        self._stopping.set()
        self._listening.set()
        if self.http is not None:
            self.http.draining = True  # /readyz answers 503 at once
        if first:
            drain = self.policy.server.drain_seconds if sig == signal.SIGTERM else 0.0
            log.info("draining", signal=sig.name, drain_seconds=drain, workers=len(self.slots))
            self._kill_timer = asyncio.get_running_loop().call_later(
                drain + 2.0 + STOP_MARGIN_SECONDS, self._kill_stragglers)
        for slot in self.slots:
            self._signal(slot, sig)

    def reload(self) -> None:
        """SIGHUP reaches every worker that is up; one still starting reads the file as it starts."""
        reached = [slot.index for slot in self.slots if slot.report is not None and self._signal(slot, signal.SIGHUP)]
        log.info("reload_requested", workers=reached)

    @staticmethod
    def _signal(slot: _Slot, sig: signal.Signals) -> bool:
        if slot.process is None or slot.process.returncode is not None:
            return False
        with contextlib.suppress(ProcessLookupError):
            slot.process.send_signal(sig)
            return True
        return False

    def _kill_stragglers(self) -> None:
        for slot in self.slots:
            if slot.process is not None and slot.process.returncode is None:
                log.error("worker_kill", worker=slot.index, pid=slot.process.pid,
                          reason="still running well after the drain")
                self._signal(slot, signal.SIGKILL)

    # --- workers ---

    def _argv(self, index: int, fd: int) -> list[str]:
        s = self.settings
        return [sys.executable, "-m", "extauthz", "serve", "--config", str(s.config),
                "--grpc-address", s.grpc_address, "--metrics-address", "", "--http-address", s.http_address,
                "--admin-address", s.admin_address if index == 0 else "",
                "--watch-interval", str(s.watch_interval), "--log-format", s.log_format, "--log-level", s.log_level,
                "--worker-of", f"{index}:{fd}"]

    async def _keep(self, slot: _Slot) -> None:
        """Run the slot's worker, and a new one each time it dies, until the sidecar stops."""
        assert self._stopping is not None
        while not self._stopping.is_set():
            code = await self._run_worker(slot)
            slot.exit_code = code
            if self._stopping.is_set():
                return
            if slot.spawned == 1 and slot.report is None and code in _STARTUP_MISTAKES:
                log.error("worker_failed_to_start", worker=slot.index, exit=describe_exit(code),
                          detail="stopping: the sidecar cannot start (the worker said why, above)")
                self.fatal = code
                self.stop(signal.SIGINT)
                return
            lived = time.monotonic() - slot.started_at
            slot.failures = 0 if lived >= STABLE_SECONDS else slot.failures + 1
            delay = min(BACKOFF_SECONDS[1], BACKOFF_SECONDS[0] * 2 ** slot.failures)
            self.restarts += 1
            log.error("worker_exited", worker=slot.index, exit=describe_exit(code), lived_seconds=round(lived, 1),
                      restart_in_seconds=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), delay)

    async def _run_worker(self, slot: _Slot) -> int:
        loop = asyncio.get_running_loop()
        read_end, write_end = os.pipe()
        shared = {spec: sock.fileno() for spec, sock in self._shared.items()}
        try:
            process = await asyncio.create_subprocess_exec(
                *self._argv(slot.index, write_end), pass_fds=(write_end, *shared.values()), process_group=0,
                env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": self.metrics_dir,
                     **({INHERITED_SOCKETS_ENV: json.dumps(shared)} if shared else {})},
            )
        except OSError as exc:
            os.close(read_end)
            log.error("worker_spawn_failed", worker=slot.index, error=str(exc))
            slot.started_at = time.monotonic()
            return -int(signal.SIGKILL)
        finally:
            os.close(write_end)
        slot.process, slot.report, slot.started_at = process, None, time.monotonic()
        slot.spawned += 1
        slot.pids.append(process.pid)
        log.info("worker_started", worker=slot.index, pid=process.pid)
        reader = asyncio.StreamReader(limit=1 << 20)
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(read_end, "rb", buffering=0))
        listening = asyncio.create_task(self._listen(slot, reader), name=f"worker-{slot.index}-reports")
        try:
            code = await process.wait()
            await asyncio.wait([listening], timeout=1.0)
        finally:
            listening.cancel()
            transport.close()
            mark_process_dead(process.pid, self.metrics_dir)  # type: ignore[no-untyped-call]
            slot.process = None
        return code

    async def _listen(self, slot: _Slot, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            try:
                report = json.loads(line)
            except ValueError:
                continue
            if isinstance(report, dict):
                previous = slot.digest if slot.report is not None else None
                slot.report, slot.reported_at = report, time.monotonic()
                if slot.digest != previous:
                    slot.digest_since = slot.reported_at
                if all(other.digest_since for other in self.slots):
                    self._listening.set()  # every worker has reported once, so every one listens

    async def _watchdog(self) -> None:
        """Kill a worker that stopped reporting: its loop is wedged, and a restart is all that helps."""
        assert self._stopping is not None
        while not self._stopping.is_set():
            await asyncio.sleep(1.0)
            for slot in self.slots:
                silent = time.monotonic() - slot.reported_at
                if slot.process is not None and slot.report is not None and silent > UNRESPONSIVE_SECONDS \
                        and not self._stopping.is_set():
                    log.error("worker_unresponsive", worker=slot.index, pid=slot.process.pid,
                              silent_seconds=round(silent, 1), action="killed; it will be restarted")
                    self._signal(slot, signal.SIGKILL)

    # --- health and metrics of the whole sidecar ---

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """Ready when every worker is; the top level is the worker whose policy has served longest.

        So ``policy.digest`` shows a new policy only once every worker reported
        it (a worker restarted meanwhile already runs the newest), and
        ``workers`` names each worker's state.
        """
        reporting = [slot for slot in self.slots
                     if slot.report is not None and isinstance(slot.report.get("readiness"), dict)]
        laggard = min(reporting, key=lambda slot: slot.digest_since, default=None)
        body: dict[str, Any] = dict(laggard.report["readiness"]) if laggard and laggard.report else {
            # Until a worker reports (it is still loading its keys): the body a single process has then.
            "policy": {"digest": self.policy.digest, "file": str(self.settings.config), "loadedAt": None},
            "providers": {name: {"ready": False, "keyAgeSeconds": None, "lastError": "no worker has loaded keys yet"}
                          for name in self.policy.providers},
            "lastReload": None,
        }
        ready = all(slot.ready for slot in self.slots)
        workers = [{"worker": slot.index, "pid": slot.process.pid if slot.process else None, "ready": slot.ready,
                    "policy": slot.digest} for slot in self.slots]
        return ready, {**body, "ready": ready, "workers": workers, "restarts": self.restarts}

    def registry(self) -> CollectorRegistry:
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_WorkerFiles(self.metrics_dir))
        registry.register(_SupervisorState(self))
        return registry


class _WorkerFiles(Collector):
    """Every worker's metrics, summed (counters and histograms of dead workers included)."""

    def __init__(self, path: str) -> None:
        self._inner = MultiProcessCollector(None, path)  # type: ignore[no-untyped-call]

    def collect(self) -> Iterator[Metric]:
        for metric in self._inner.collect():  # type: ignore[no-untyped-call]
            if metric.name == "extauthz_policy_info":
                # A replaced digest stays in a worker's file at 0; one process drops it from the output.
                metric.samples = [s for s in metric.samples if s.value]
            yield metric


class _SupervisorState(Collector):
    """What only the supervisor knows, computed at scrape time from the workers' reports and files."""

    def __init__(self, supervisor: Supervisor) -> None:
        self.supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        slots = self.supervisor.slots
        yield GaugeMetricFamily("extauthz_workers", "Worker processes the sidecar runs (serve --workers).",
                                value=len(slots))
        yield GaugeMetricFamily("extauthz_workers_ready", "Worker processes reporting ready.",
                                value=sum(slot.ready for slot in slots))
        yield CounterMetricFamily("extauthz_worker_restarts", "Workers restarted after they died.",
                                  value=self.supervisor.restarts)
        ready = GaugeMetricFamily("extauthz_ready", "1 when every provider has signing keys loaded.",
                                  value=1.0 if all(slot.ready for slot in slots) else 0.0)
        yield ready
        ages: dict[str, float] = {}
        for slot in slots:
            providers = ((slot.report or {}).get("readiness") or {}).get("providers") or {}
            for name, state in providers.items():
                age = state.get("keyAgeSeconds") if isinstance(state, dict) else None
                if isinstance(age, int | float):
                    ages[name] = max(ages.get(name, 0.0), float(age))
        family = GaugeMetricFamily("extauthz_jwks_key_age_seconds",
                                   "Seconds since a provider's keys were loaded (the oldest over workers).",
                                   labels=["provider"])
        for provider, age in sorted(ages.items()):
            family.add_metric([provider], age)
        yield family
        checks = CounterMetricFamily(
            "extauthz_worker_decisions",
            "Check decisions by worker: how evenly Envoy's connections spread over the workers.",
            labels=["worker"])
        for slot in slots:
            checks.add_metric([str(slot.index)], _decisions(self.supervisor.metrics_dir, slot.pids))
        yield checks


def _decisions(directory: str, pids: list[int]) -> float:
    files = [path for pid in pids if os.path.exists(path := os.path.join(directory, f"counter_{pid}.db"))]
    total = 0.0
    for metric in MultiProcessCollector.merge(files, accumulate=True) if files else ():  # type: ignore[no-untyped-call]
        if metric.name == "extauthz_decisions":
            total += sum(s.value for s in metric.samples if s.name == "extauthz_decisions_total")
    return total


def supervise(policy: Policy, settings: SupervisorSettings, workers: int) -> int:
    """Run ``workers`` worker processes until SIGTERM or SIGINT; the exit code of the sidecar."""
    return asyncio.run(Supervisor(policy, settings, workers).run())
