"""The benchmark harness cannot rot: its smoke mode runs every scenario through real Envoy under wrk.

It asserts what makes a benchmark meaningful, not how fast anything is: every
scenario was verified and then loaded, served only 2xx answers, and the report
(Markdown, PNG chart, JSON) was written.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
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
