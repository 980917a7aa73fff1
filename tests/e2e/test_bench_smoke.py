"""The benchmark harness cannot rot: its smoke mode runs every scenario through real Envoy under wrk.

It asserts what makes a benchmark meaningful, not how fast anything is: every
scenario was verified and then loaded, served only 2xx answers, and the report
(Markdown, PNG chart, JSON) was written.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.compare import ORDER

pytestmark = pytest.mark.envoy
REPO = Path(__file__).resolve().parents[2]


def test_smoke_run_loads_every_scenario_without_errors_and_writes_the_report(tmp_path: Path) -> None:
    assert shutil.which("wrk"), "wrk is not installed: `make test` installs it (apt-get install wrk)"
    out = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--smoke", "--json", "--results-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    rows = {r["label"]: r for r in report["rows"]}
    assert list(rows) == [*ORDER, "floor (end)"]
    for label, row in rows.items():
        assert not row["skipped"], f"{label} skipped: {row['skipped']}"
        assert not row["failed"], f"{label}: {row['failed']}"
        assert row["requests"] > 0, label
        assert (row["non_2xx"], row["socket_errors"]) == (0, 0), label
        assert row["envoy_cpu_us"] > 0, label
        assert row["rps_vs_floor"] is not None, label
    for label in ("floor", "extauthz_authz_only", "extauthz_grpcio", "shipped_unfiltered", "shipped_filtered_10k",
                  "relationship_cached", "http_transport", "http_ceiling"):
        assert rows[label]["sidecar_cpu_us"] > 0 and rows[label]["sidecar_rss_mb"] > 0, label
    # each scenario did what it claims, by Envoy's own counters (per completed request: the few requests
    # in flight when wrk stops have started their filters but not completed)
    assert rows["shipped_filtered_10k"]["filter_calls"]["ext_proc streams"] == pytest.approx(1.0, abs=0.05)
    assert "ext_proc streams" not in rows["shipped_unfiltered"]["filter_calls"]
    assert rows["jwt_rbac"]["filter_calls"]["rbac allowed"] == pytest.approx(1.0, abs=0.05)
    assert "ext_authz ok" not in rows["envoy"]["filter_calls"]
    assert rows["http_ceiling"]["filter_calls"]["ext_authz ok"] == pytest.approx(1.0, abs=0.05)
    assert "ext_proc streams" not in rows["http_ceiling"]["filter_calls"]  # the fixed allow marks it unfiltered
    assert rows["shipped_filtered_10k"]["bytes_per_response"] < 2000  # ~10 KB upstream, one caller's rows out

    markdown = (tmp_path / "compare.md").read_text()
    assert "| shipped_filtered_10k |" in markdown and "python -m bench.compare --smoke" in markdown
    assert (tmp_path / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "compare.json").read_text())["rows"] == report["rows"]


def test_rounds_run_every_scenario_again_between_floors_and_report_medians(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--smoke", "--rounds", "2", "--only", "extauthz_grpcio", "--json",
         "--results-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    assert [r["label"] for r in report["runs"]] == [
        "floor (round 1)", "extauthz_grpcio (round 1)", "floor (round 2)", "extauthz_grpcio (round 2)", "floor (end)"]
    assert [r["label"] for r in report["rows"]] == ["floor (median of 3)", "extauthz_grpcio (median of 2)"]
    median = report["rows"][1]
    assert median["requests"] == sum(r["requests"] for r in report["runs"] if r["scenario"] == "extauthz_grpcio")
    assert "served by grpc.aio (its listening line)" in median["checks"]
    assert "| extauthz_grpcio |" in (tmp_path / "compare.md").read_text()  # each round's ratios, beside the medians


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_baseline_reruns_each_sidecar_scenario_with_the_refs_code_from_a_worktree_it_then_removes(
        tmp_path: Path) -> None:
    """With HEAD as the baseline both sidecars run the same code: only where it was imported from tells them apart,
    which is exactly what must be proven (a baseline row silently running this tree's sidecar would read 1.0)."""
    assert shutil.which("wrk"), "wrk is not installed: `make test` installs it (apt-get install wrk)"
    commit, short = _git("rev-parse", "HEAD"), _git("rev-parse", "--short", "HEAD")
    out = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--smoke", "--baseline", "HEAD", "--only",
         "envoy,extauthz_grpcio,http_transport", "--json", "--results-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    report = json.loads(out.stdout)
    baseline = report["baseline"]
    assert (baseline["ref"], baseline["commit"], baseline["short"]) == ("HEAD", commit, short)
    tree = Path(baseline["tree"])
    module = tree / "extauthz" / "__init__.py"
    assert Path(baseline["module"]) == module and not module.is_relative_to(REPO)

    rows = {r["label"]: r for r in report["rows"]}
    # only the scenarios that start the sidecar get a baseline row, each right after its current one
    assert list(rows) == ["floor", "envoy", "extauthz_grpcio", f"extauthz_grpcio@{short}", "http_transport",
                          f"http_transport@{short}", "floor (end)"]
    for name in ("extauthz_grpcio", "http_transport"):
        current, base = rows[name], rows[f"{name}@{short}"]
        for row in (current, base):
            assert not row["skipped"] and not row["failed"], row["label"]
            assert row["requests"] > 0 and (row["non_2xx"], row["socket_errors"]) == (0, 0), row["label"]
            assert row["sidecar_cpu_us"] > 0 and row["rps_vs_floor"] and row["sidecar_cpu_vs_floor"], row["label"]
        assert (current["baseline"], base["baseline"]) == ("", commit)
        assert f"the sidecar is {short}'s: extauthz imported from {module}" in base["checks"]
        assert not any("imported from" in check for check in current["checks"])
        assert base["checks"][1:] == current["checks"], name  # the same checks passed against the same configs
    assert "served by grpc.aio (its listening line)" in rows[f"extauthz_grpcio@{short}"]["checks"]
    pairs = {p["scenario"]: p for p in baseline["pairs"]}
    assert list(pairs) == ["extauthz_grpcio", "http_transport"]
    for name, pair in pairs.items():
        assert pair["baseline"] == f"{name}@{short}"
        assert pair["rps_ratio"] > 0 and pair["sidecar_cpu_ratio"] > 0
        assert pair["rps_ratio"] == pytest.approx(rows[name]["rps"] / rows[f"{name}@{short}"]["rps"])

    # gone, and from git's list of worktrees too
    assert not tree.exists() and not tree.parent.exists()
    assert str(tree) not in _git("worktree", "list", "--porcelain")
    markdown = (tmp_path / "compare.md").read_text()
    assert f"| extauthz_grpcio@{short} |" in markdown and "req/s now ÷ baseline" in markdown


def test_baseline_worktree_is_removed_when_the_run_is_interrupted_with_ctrl_c(tmp_path: Path) -> None:
    assert shutil.which("wrk"), "wrk is not installed: `make test` installs it (apt-get install wrk)"
    process = subprocess.Popen(  # a session of its own: the Ctrl-C goes to it and its children, as at a terminal
        [sys.executable, "-m", "bench.compare", "--smoke", "--baseline", "HEAD", "--only", "extauthz_authz_only",
         "--results-dir", str(tmp_path)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    tree: Path | None = None
    seen: list[str] = []
    try:
        assert process.stderr is not None
        deadline = time.monotonic() + 120
        for line in process.stderr:
            seen.append(line)
            if "its sidecar imports extauthz from" in line:
                tree = Path(line.rpartition(" from ")[2].strip()).parents[1]
            if line.startswith("[3/") and "@" in line:  # the baseline's own sidecar is up or starting
                assert tree is not None and tree.exists(), "".join(seen)
                os.killpg(process.pid, signal.SIGINT)
                break
            assert time.monotonic() < deadline, "".join(seen)
        assert tree is not None, "".join(seen)
        seen.append(process.communicate(timeout=120)[1])
        assert process.returncode != 0
        assert not tree.exists() and not tree.parent.exists(), "".join(seen)
        assert str(tree) not in _git("worktree", "list", "--porcelain")
    finally:
        with contextlib.suppress(ProcessLookupError):  # whatever of the run is left: this test started it
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def test_baseline_pairs_are_the_median_of_each_rounds_ratio_not_the_ratio_of_the_medians() -> None:
    from bench.compare import Row, pairs

    def run(scenario: str, round_: int, rps: float, sidecar: float, failed: str = "") -> Row:
        return Row(scenario, scenario, "", round_, baseline="c0ffee" if "@" in scenario else "",
                   requests=int(rps * 10), seconds=10.0, rps=rps, sidecar_cpu_us=sidecar, failed=failed)

    # round 2 ran on a machine twice as fast: each pair still reads 0.9 and 1.1
    runs = [run("floor", 1, 1000, 400), run("x", 1, 900, 440), run("x@c0ffee", 1, 1000, 400),
            run("floor", 2, 2000, 200), run("x", 2, 1800, 220), run("x@c0ffee", 2, 2000, 200),
            run("floor", 3, 1000, 400), run("x", 3, 1, 1, failed="boom"), run("x@c0ffee", 3, 1000, 400)]
    [pair] = pairs(runs)
    assert (pair.scenario, pair.baseline) == ("x", "x@c0ffee")
    assert pair.rps_ratio_by_round == [pytest.approx(0.9), pytest.approx(0.9), None]  # a failed half is no ratio
    assert pair.rps_ratio == pytest.approx(0.9) and pair.sidecar_cpu_ratio == pytest.approx(1.1)


def test_baseline_that_names_no_commit_stops_before_anything_starts() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.compare", "--smoke", "--baseline", "no-such-ref-anywhere"],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert out.returncode == 2 and "'no-such-ref-anywhere' names no commit" in out.stderr


def test_envoy_instructions_count_an_http_check_as_a_second_exchange_for_envoy() -> None:
    assert shutil.which("valgrind"), "valgrind is not installed: `make test` installs it (apt-get install valgrind)"
    out = subprocess.run(
        [sys.executable, "-m", "bench.envoy_instructions", "--requests", "60", "--warmup", "20",
         "--only", "envoy,http_ceiling", "--json"],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    counts = json.loads(out.stdout)["instructions_per_request"]
    # Envoy proxies a request in ~190k instructions; asking an HTTP ext_authz server first more than doubles it
    assert 50_000 < counts["envoy"] < 1_000_000
    assert counts["http_ceiling"] > 1.5 * counts["envoy"]


def test_soak_smoke_serves_distinct_callers_and_samples_the_sidecar_memory(tmp_path: Path) -> None:
    assert shutil.which("wrk"), "wrk is not installed: `make test` installs it (apt-get install wrk)"
    out = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--requests", "2000", "--tokens", "300", "--minutes", "0",
         "--chunk", "1", "--connections", "4", "--json", "--results-dir", str(tmp_path)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert out.returncode == 0, out.stderr[-4000:]
    soak = json.loads(out.stdout)
    assert soak["requests"] >= 2000 and (soak["non_2xx"], soak["socket_errors"]) == (0, 0)
    assert soak["rss_at_target_mb"] > 0 and soak["rss_end_mb"] > 0
    assert [s["requests"] for s in soak["samples"]] == sorted(s["requests"] for s in soak["samples"])
    assert "sidecar RSS after 2,000 requests" in (tmp_path / "soak.md").read_text()
    assert (tmp_path / "soak.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_microbenchmarks_workload_builds_and_every_benchmark_runs_once() -> None:
    """``make bench-micro`` cannot rot either: each benchmark's setup holds (the Check allows, a rule matches)."""
    from bench.micro import Workload

    work = Workload()
    assert work.run(work.check()).allowed and work.run(work.check_filtered_route()).allowed
    assert work.run(work.check_grpc())  # a serialised CheckResponse; Workload checked it is an allow
    assert work.run(work.rules()).rule is not None
    assert work.filter_engine() and work.filter_body()
