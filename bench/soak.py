"""Does the sidecar's memory stay flat? Many distinct callers through the shipped stack, RSS sampled over time.

    python -m bench.soak [--requests 100000] [--tokens 20000] [--minutes 10] [--connections 16] [--json]
                         [--results-dir DIR]

The shipped stack (demo IdP serving its JWKS, bench/upstream.py, ``extauthz
serve`` on the seed policy, Envoy on envoy/envoy.yaml) is driven by wrk with
``--tokens`` distinct valid RS256 tokens (one ``sub`` each, minted with the IdP's
key), rotating, so the verified-token cache (10,000 entries by default) keeps
filling and evicting. One request in ten is ``GET /v1/orders`` (the ~10 KB body
filtered by ext_proc), the others ``GET /v1/products/1`` (Check only).

The load runs in chunks; after each, the sidecar's RSS (VmRSS, its process
tree) and Envoy's request counters are read. Reported: RSS after ``--requests``
requests, RSS at the end, and the slope of RSS over the part of the soak after
that point (least squares, MB/min). A flat line after the caches have filled is
what a leak-free sidecar shows. Any non-2xx answer is an error (exit 1).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.harness import WRK_SUMMARY, cpu_seconds, envoy_counts, machine_facts, require_wrk, rss_mb, started, wrk
from bench.workloads import ORDERS_BYTES, seed_policy
from extauthz.demo.idp import IdentityProvider
from extauthz.demo.processes import REPO, Envoy, Ports, SidecarProcess, render_envoy_config

RESULTS = REPO / "bench" / "results"

# Rotates through the token file (one per line) from an offset, so successive chunks continue the rotation.
ROTATE = """
local tokens, i = {}, 0
init = function(args)
  for line in io.lines(args[1]) do tokens[#tokens + 1] = line end
  i = tonumber(args[2])
end
request = function()
  i = i + 1
  local path = (i % 10 == 0) and "/v1/orders" or "/v1/products/1"
  return wrk.format("GET", path, {["authorization"] = "Bearer " .. tokens[(i % #tokens) + 1]})
end
"""


@dataclass
class Sample:
    seconds: float
    requests: int
    rss_mb: float


@dataclass
class Soak:
    tokens: int
    requests: int = 0
    non_2xx: int = 0
    socket_errors: int = 0
    rss_start_mb: float = 0.0
    rss_at_target_mb: float | None = None
    seconds_at_target: float | None = None
    rss_end_mb: float = 0.0
    slope_mb_per_min: float | None = None
    slope_from_seconds: float = 0.0
    """The slope is fitted from here on: after ``--requests``, or over the second half if too few samples follow."""
    sidecar_cpu_us_per_request: float = 0.0
    samples: list[Sample] = field(default_factory=list)


def slope_per_minute(samples: list[Sample]) -> float | None:
    """Least-squares slope of RSS over time; None with fewer than three samples."""
    if len(samples) < 3:
        return None
    xs = [s.seconds / 60 for s in samples]
    ys = [s.rss_mb for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else None


def run(args: argparse.Namespace, log: Callable[[str], None]) -> Soak:
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp, IdentityProvider() as idp:
        workdir = Path(tmp)
        started_at = time.monotonic()
        tokens = [idp.token(sub=f"user-{i}", ttl=24 * 3600) for i in range(args.tokens)]
        log(f"minted {len(tokens):,} distinct RS256 tokens in {time.monotonic() - started_at:.1f} s")
        token_file = workdir / "tokens.txt"
        token_file.write_text("\n".join(tokens) + "\n")
        script = workdir / "rotate.lua"
        script.write_text(ROTATE + WRK_SUMMARY)
        policy = workdir / "policy.yaml"
        policy.write_text(seed_policy(idp.issuer, idp.jwks_uri))
        with started("bench.upstream", "--orders-bytes", str(ORDERS_BYTES), log=workdir / "upstream.log") as up:
            ports = Ports.free()
            ports.app = up.port
            sidecar = SidecarProcess(policy, ports.extauthz, log_path=workdir / "sidecar.log")
            envoy = Envoy(render_envoy_config(ports), log_path=workdir / "envoy.log")
            try:
                sidecar.start()
                envoy.start()
                assert sidecar.process is not None
                return _drive(args, log, sidecar.process.pid, envoy, ports.listener, token_file, script)
            finally:
                envoy.stop()
                sidecar.stop()


def _drive(args: argparse.Namespace, log: Callable[[str], None], pid: int, envoy: Envoy, port: int,
           token_file: Path, script: Path) -> Soak:
    result = Soak(tokens=args.tokens, rss_start_mb=rss_mb(pid))
    url = f"http://127.0.0.1:{port}/"
    counts0 = envoy_counts(envoy)
    cpu0 = cpu_seconds(pid)
    t0 = time.monotonic()
    deadline = t0 + args.minutes * 60
    offset = 0
    result.samples.append(Sample(0.0, 0, result.rss_start_mb))
    log(f"sidecar RSS at start: {result.rss_start_mb:.1f} MB")
    while result.requests < args.requests or time.monotonic() < deadline:
        summary = wrk(url, args.chunk, args.connections, script, script_args=(str(token_file), str(offset)))
        offset += summary["requests"]
        counts = {k: v - counts0[k] for k, v in envoy_counts(envoy).items()}
        result.requests = counts["completed"]
        result.non_2xx = counts["completed"] - counts["2xx"]
        result.socket_errors += sum(summary[k] for k in ("connect", "read", "write", "timeout"))
        sample = Sample(time.monotonic() - t0, result.requests, rss_mb(pid))
        result.samples.append(sample)
        if result.rss_at_target_mb is None and result.requests >= args.requests:
            result.rss_at_target_mb, result.seconds_at_target = sample.rss_mb, sample.seconds
        log(f"  {sample.seconds:7.1f} s  {sample.requests:>9,} requests  RSS {sample.rss_mb:7.1f} MB"
            + (f"  NON-2XX {result.non_2xx}" if result.non_2xx else ""))
    result.rss_end_mb = result.samples[-1].rss_mb
    result.sidecar_cpu_us_per_request = (cpu_seconds(pid) - cpu0) / max(1, result.requests) * 1e6
    reached = result.seconds_at_target if result.seconds_at_target is not None else float("inf")
    after = [s for s in result.samples if s.seconds >= reached]
    window = after if len(after) >= 3 else result.samples[len(result.samples) // 2:]
    result.slope_from_seconds = window[0].seconds
    result.slope_mb_per_min = slope_per_minute(window)
    return result


def report(soak: Soak, args: argparse.Namespace, facts: dict[str, str]) -> str:
    slope = "n/a (too few samples)" if soak.slope_mb_per_min is None else f"{soak.slope_mb_per_min:+.2f} MB/min"
    lines = [
        "# Sidecar memory under many distinct callers", "",
        f"Generated by `{facts['command']}` on {facts['date']} ({facts['cpu']}, {facts['cores']} cores, "
        f"Envoy {facts['envoy']}, Python {facts['python']}).", "",
        f"- {soak.tokens:,} distinct tokens, {soak.requests:,} requests over "
        f"{soak.samples[-1].seconds / 60:.1f} min, {args.connections} connections; one request in ten filtered",
        f"- sidecar RSS at start (policy loaded, before any request): {soak.rss_start_mb:.1f} MB",
        "- sidecar RSS after {:,} requests: {}".format(
            args.requests, "not reached" if soak.rss_at_target_mb is None else f"{soak.rss_at_target_mb:.1f} MB"),
        f"- sidecar RSS at the end: {soak.rss_end_mb:.1f} MB",
        f"- RSS slope from {soak.slope_from_seconds / 60:.1f} min on: {slope}",
        f"- sidecar CPU per request: {soak.sidecar_cpu_us_per_request:.0f} µs (every token verified at least once)",
        f"- non-2xx: {soak.non_2xx}, socket errors: {soak.socket_errors}"
        + ("  **ERRORS: these figures measure error answers**" if soak.non_2xx or soak.socket_errors else ""),
        "", "| seconds | requests | RSS MB |", "|---:|---:|---:|",
        *[f"| {s.seconds:.0f} | {s.requests:,} | {s.rss_mb:.1f} |" for s in soak.samples],
    ]
    return "\n".join(lines) + "\n"


def chart(soak: Soak, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot([s.requests for s in soak.samples], [s.rss_mb for s in soak.samples], marker=".")
    ax.set_xlabel("requests")
    ax.set_ylabel("sidecar RSS MB")
    ax.set_ylim(bottom=0)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=100_000, help="report RSS once this many were served")
    parser.add_argument("--tokens", type=int, default=20_000, help="distinct valid tokens, rotated")
    parser.add_argument("--minutes", type=float, default=10.0, help="soak at least this long")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=10, help="seconds of load between two RSS samples")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    require_wrk(parser)
    command = "python -m bench.soak " + " ".join(sys.argv[1:] if argv is None else argv)
    facts = machine_facts(command.strip())

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    soak = run(args, log)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    text = report(soak, args, facts)
    (args.results_dir / "soak.md").write_text(text)
    (args.results_dir / "soak.json").write_text(json.dumps({"facts": facts, **asdict(soak)}, indent=2) + "\n")
    chart(soak, args.results_dir / "soak.png", f"{command} - {facts['date']}")
    print(json.dumps({"facts": facts, **asdict(soak)}, indent=2) if args.json else text)
    return 1 if soak.non_2xx or soak.socket_errors or not soak.requests else 0


if __name__ == "__main__":
    sys.exit(main())
