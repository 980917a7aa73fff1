"""What the benchmarks share: processes and their CPU and memory from /proc, wrk, Envoy's counters."""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from extauthz.demo.processes import REPO, Envoy, envoy_binary, free_port, stop_process, wait_port

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# wrk's own summary as one JSON line (latencies in microseconds); ``done`` runs once, after the load.
WRK_SUMMARY = """
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,"write":%d,' ..
    '"status":%d,"timeout":%d,"p50_us":%d,"p90_us":%d,"p99_us":%d,"max_us":%d}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""

# --- processes and /proc --------------------------------------------------------------------------


def _stat(pid: int) -> list[str]:
    """Fields of /proc/<pid>/stat from the state on (the command name may hold spaces)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants: ``extauthz serve --workers N`` is a supervisor with N worker children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError):
                children.setdefault(int(_stat(int(entry.name))[1]), []).append(int(entry.name))
    tree, todo = [], [pid]
    while todo:
        current = todo.pop()
        tree.append(current)
        todo.extend(children.get(current, []))
    return tree


def cpu_seconds(pid: int) -> float:
    """utime + stime of every thread of ``pid`` and its descendants so far (from /proc/<pid>/stat)."""
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            fields = _stat(member)
            total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
    return total


def rss_mb(pid: int) -> float:
    """Resident memory of ``pid`` and its descendants, in MiB."""
    total = 0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total / 1024


class Module:
    """``python -m <module> ...`` from the repository, as its own process (its CPU is its own)."""

    def __init__(self, module: str, port: int, *args: str, log: Path) -> None:
        self.port = port
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", module, "--port", str(port), *args], cwd=REPO,
            stdout=log.open("wb"), stderr=subprocess.STDOUT,
        )
        wait_port(port, 30, self.process)

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        stop_process(self.process, grace=5)


@contextlib.contextmanager
def started(module: str, *args: str, log: Path) -> Iterator[Module]:
    proc = Module(module, free_port(), *args, log=log)
    try:
        yield proc
    finally:
        proc.stop()


def in_parallel(*starts: Callable[[], object]) -> None:
    """Start processes at the same time (Envoy's start does not need the sidecar's): halves the smoke run."""
    errors: list[BaseException] = []

    def run(start: Callable[[], object]) -> None:
        try:
            start()
        except BaseException as exc:  # re-raised below, in the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in starts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


# --- load and counters --------------------------------------------------------------------------------


def wrk(url: str, seconds: int, connections: int, script: Path, token: str | None = None,
        script_args: tuple[str, ...] = ()) -> dict[str, Any]:
    """One ``wrk -t1`` run; ``script`` must print :data:`WRK_SUMMARY`'s line, which is returned parsed."""
    command = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", "-s", str(script),
               *(["-H", f"authorization: Bearer {token}"] if token else []),
               url, *(["--", *script_args] if script_args else [])]
    out = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 60, check=False)
    for line in out.stdout.splitlines():
        if line.startswith("WRK_JSON "):
            result: dict[str, Any] = json.loads(line.removeprefix("WRK_JSON "))
            return result
    raise RuntimeError(f"wrk printed no summary (exit {out.returncode}): {out.stderr.strip() or out.stdout[-500:]}")


COUNTERS = {
    "completed": "http.ingress.downstream_rq_completed", "2xx": "http.ingress.downstream_rq_2xx",
    "ext_authz ok": "http.ingress.ext_authz.ok", "ext_proc streams": "http.ingress.ext_proc.streams_started",
    "jwt_authn allowed": "http.ingress.jwt_authn.allowed", "rbac allowed": "http.ingress.rbac.allowed",
}


def envoy_counts(envoy: Envoy) -> dict[str, int]:
    stats = envoy.stats()
    return {name: stats.get(stat, 0) for name, stat in COUNTERS.items()}


def require_wrk(parser: argparse.ArgumentParser) -> None:
    """Stop with a usable message, not a traceback, where wrk is missing (``make bench`` installs it)."""
    if shutil.which("wrk") is None:
        parser.error("wrk is not installed: run `make bench` (it installs wrk) or `apt-get install wrk`")


def machine_facts(command: str) -> dict[str, str]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown")
    envoy = subprocess.run([envoy_binary(), "--version"], capture_output=True, text=True, check=False).stdout
    wrk_version = subprocess.run(["wrk", "-v"], capture_output=True, text=True, check=False).stdout
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "cores": str(os.cpu_count()),
        "cpu": model,
        "load_average_at_start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "envoy": envoy.strip().rpartition("version: ")[2] or "unknown",
        "python": platform.python_version(),
        "wrk": wrk_version.splitlines()[0].strip() if wrk_version else "unknown",
        "kernel": platform.release(),
    }
