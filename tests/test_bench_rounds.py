"""How ``bench.compare`` turns runs into ratios: each round against the floor as it was around that round.

The harness itself is exercised through real Envoy by the smoke test
(tests/e2e/test_bench_smoke.py); these pin the arithmetic the report rests on,
on runs whose figures are chosen so that a wrong pairing shows.
"""

from __future__ import annotations

import pytest

from bench.compare import Row, add_ratios, rounds_table, summarize


def run(scenario: str, round_: int, rps: float, sidecar: float, *, label: str = "", failed: str = "") -> Row:
    return Row(scenario, label or f"{scenario} (round {round_})", "", round_, requests=int(rps * 10), seconds=10.0,
               rps=rps, p50_ms=16_000 / rps, p99_ms=40_000 / rps, envoy_cpu_us=100.0, sidecar_cpu_us=sidecar,
               failed=failed)


def test_each_round_is_measured_against_the_floor_runs_around_it() -> None:
    runs = [run("floor", 1, 1000, 400), run("extauthz", 1, 900, 440),
            run("floor", 2, 2000, 200), run("extauthz", 2, 1800, 220),
            run("floor", 2, 2000, 200, label="floor (end)")]
    note = add_ratios(runs)
    first, second = runs[1], runs[3]
    # against the floor's mean over the whole run (1,667 req/s) the first round would read 0.54
    assert first.rps_vs_floor == pytest.approx(900 / 1500)
    assert second.rps_vs_floor == pytest.approx(1800 / 2000)
    assert first.sidecar_cpu_vs_floor == pytest.approx(440 / 300)
    assert second.sidecar_cpu_vs_floor == pytest.approx(220 / 200)
    assert "3 times" in note and "1,000, 2,000, 2,000" in note

    median = {r.scenario: r for r in summarize(runs)}["extauthz"]
    assert median.label == "extauthz (median of 2)"
    assert median.rps == 1350 and median.requests == 27_000
    assert median.rps_vs_floor == pytest.approx((0.6 + 0.9) / 2)
    assert median.sidecar_cpu_vs_floor == pytest.approx((440 / 300 + 1.1) / 2)
    assert rounds_table(runs) == [["extauthz", "0.60  0.90", "1.47  1.10"]]


def test_a_failed_floor_run_is_skipped_and_a_failed_round_is_left_out_of_the_median() -> None:
    runs = [run("floor", 1, 1000, 400), run("extauthz", 1, 900, 440),
            run("floor", 2, 5000, 100, failed="RuntimeError: envoy exited"), run("extauthz", 2, 1, 1, failed="x"),
            run("extauthz", 2, 1000, 400, label="extauthz (again)"), run("floor", 2, 1000, 400, label="floor (end)")]
    add_ratios(runs)
    assert runs[1].rps_vs_floor == pytest.approx(0.9)  # the failed floor run is no reference
    median = {r.scenario: r for r in summarize(runs)}["extauthz"]
    assert median.rps == 950 and median.bad  # a failed round is reported, never averaged in
    assert "extauthz (round 2): x" in median.failed


def test_one_round_reports_its_runs_as_they_are_against_the_first_and_last_floor() -> None:
    runs = [run("floor", 1, 1000, 400, label="floor"), run("extauthz", 1, 900, 440, label="extauthz"),
            run("floor", 1, 1200, 400, label="floor (end)")]
    note = add_ratios(runs)
    assert summarize(runs) is runs
    assert runs[1].rps_vs_floor == pytest.approx(900 / 1100)
    assert note.startswith("Drift: the floor ran first at 1,000 req/s and last at 1,200 req/s (+20.0%)")
