"""Shared pytest fixtures."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.security import results as security_results
from tests.openfga_server import OpenFgaServer, journeys_server
from tests.redis_server import RedisServer, any_redis

SECURITY_DIR = Path(__file__).resolve().parent / "e2e" / "security"

# --- relationships (OpenFGA, Redis) ---------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real Redis (the machine's, or one started for the session); fails, never skips, without one."""
    with any_redis() as server:
        yield server


@pytest.fixture(scope="module")
def fga() -> Iterator[OpenFgaServer]:
    """A local OpenFGA server with the journeys model and tuples, one per module that uses it."""
    with journeys_server() as server:
        yield server


@pytest.fixture
def fga_spec_clean(fga: OpenFgaServer) -> Iterator[None]:
    """Each test starts without earlier calls or scripted answers, and every request the client sent
    in it must have matched the published spec (only its shape when the spec is not at hand, see
    tests/openfga_server.py). Modules opt in with ``pytest.mark.usefixtures``."""
    fga.calls.clear()
    fga.script.clear()
    yield
    assert fga.invalid == [], fga.invalid
    fga.script.clear()


# --- the adversarial suite's table (tests/e2e/security) ------------------------------------------
# Here rather than in tests/e2e/security/conftest.py: under pytest-xdist the controller
# collects nothing, so only this top-level conftest is loaded there.

@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """The xdist controller collects the rows its workers recorded."""
    for row in getattr(node, "workeroutput", {}).get("security_rows", []):
        security_results.add(security_results.Row(**row))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    rows = list(security_results.ROWS.values())
    if not rows:
        return
    terminalreporter.section("adversarial suite: results per attack class")
    terminalreporter.write_line(security_results.table(rows))
    stale = security_results.STATE.get("stale_doc")
    if stale:
        terminalreporter.section("docs/SECURITY.md is stale", red=True)
        terminalreporter.write_line(str(stale))


def _every_file_recorded() -> bool:
    """Did every file of the suite record rows (the whole suite ran, on however many workers)?"""
    recorded = {row.test.split("::", 1)[0].rsplit("/", 1)[-1] for row in security_results.ROWS.values()}
    return {p.name for p in SECURITY_DIR.glob("test_*.py") if p.name != security_results.LAST_FILE} <= recorded


@pytest.hookimpl(tryfirst=True)  # before xdist sends the worker's output to the controller
def pytest_sessionfinish(session: pytest.Session) -> None:
    rows = list(security_results.ROWS.values())
    worker_output = getattr(session.config, "workeroutput", None)
    if worker_output is not None:  # an xdist worker: hand the rows to the controller, which prints the table
        worker_output["security_rows"] = [asdict(row) for row in rows]
        return
    target = os.environ.get(security_results.RESULTS_ENV)
    if target and rows:
        Path(target).write_text(json.dumps(security_results.as_json(rows), indent=2) + "\n")
    distributed = getattr(session.config.option, "dist", "no") != "no"
    if distributed and _every_file_recorded() and not os.environ.get(security_results.REGENERATING_ENV) \
            and not (session.config.option.keyword or session.config.option.markexpr):
        # Under xdist no single worker holds every row: the controller compares the table.
        problem = security_results.stale(rows)
        if problem:
            security_results.STATE["stale_doc"] = problem
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

