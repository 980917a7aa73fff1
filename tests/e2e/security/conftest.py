"""The adversarial suite's collector: every variant records one row; the session prints the table.

A test asks for ``record`` and calls it once, before its assertions, so a failing
variant is counted too (the table is printed by the hooks in tests/conftest.py,
which also gather the rows of pytest-xdist workers)::

    record("6. Methods", wrongly_allowed=0, leaked=0, saw="405")

The variant name defaults to the test's parametrize id. At the end of the session
the table (one line per class) is printed, and written as JSON to the path in
``$EXTAUTHZ_SECURITY_RESULTS`` if set. ``test_zz_doc_table.py`` runs last and fails
when the whole suite ran and docs/SECURITY.md shows other results.

The transport suite (``test_transport_*.py``) records with ``transport_record`` instead:
one row per attack variant and server, for docs/SECURITY.md's second table.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.security import results
from tests.e2e.security.transport_harness import Sidecars

HERE = Path(__file__).resolve().parent
LAST = results.LAST_FILE


def pytest_collection_modifyitems(session: pytest.Session, config: pytest.Config, items: list[pytest.Item]) -> None:
    """The doc-table check runs after every other test of the session (without xdist)."""
    last = [i for i in items if i.path.name == LAST]
    items[:] = [i for i in items if i.path.name != LAST] + last


def pytest_deselected(items: list[pytest.Item]) -> None:
    if items:
        results.STATE["deselected"] = True


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[..., None]:
    node = request.node
    default_variant = node.callspec.id if hasattr(node, "callspec") else node.name

    def _record(cls: str, wrongly_allowed: int | bool, leaked: int | bool, saw: str,
                variant: str | None = None) -> None:
        results.add(results.Row(cls, variant or default_variant, int(bool(wrongly_allowed)), int(bool(leaked)),
                                saw, node.nodeid))

    return _record


@pytest.fixture
def transport_record(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Record one transport row: ``held`` or the bounds missed, how the connection ended, the expectation."""
    node = request.node

    def _record(cls: str, variant: str, server: str, saw: str, ended: str, expected: str, facts: str = "",
                wrongly_allowed: int | bool = 0) -> None:
        results.add(results.Row(cls, variant, int(bool(wrongly_allowed)), 0, saw, node.nodeid, server=server,
                                ended=ended, expected=expected, facts=facts))

    return _record


@pytest.fixture(scope="session")
def transport_sidecars(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sidecars]:
    """The transport suite's sidecars (one per gRPC server, started on first use, replaced when an attack
    left one grown or dead), one IdP and one PDP that never answers; all stopped at the end."""
    running = Sidecars(tmp_path_factory.mktemp("transport"))
    try:
        yield running
    finally:
        running.close()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """The transport table beside the request table that tests/conftest.py prints."""
    rows = results.transport_rows(list(results.ROWS.values()))
    if rows:
        terminalreporter.section("adversarial transport suite: results per attack and server")
        terminalreporter.write_line(results.transport_table(rows))
