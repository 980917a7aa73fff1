"""The tables in docs/SECURITY.md are this suite's last full run: they cannot drift from the tests.

Both the request table and the transport table ("The transport under attack") are
compared. Runs after every other test of the session (see conftest.py) and only when
the whole suite ran; ``python -m tests.e2e.security.report`` regenerates the tables
(``--transport``: the transport table alone, from the transport files alone). Under
pytest-xdist the workers hand their rows to the controller, which compares the
table at the end of the session and fails it when the doc is stale.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.e2e.security import results

HERE = Path(__file__).resolve().parent


def _whole_suite(session: pytest.Session, config: pytest.Config) -> str | None:
    """Why this session is not the whole suite, or None if it is."""
    if config.option.keyword or config.option.markexpr:
        return "tests were selected with -k or -m"
    if results.STATE["deselected"]:
        return "some tests were deselected"
    if any("::" in str(arg) for arg in config.args):
        return "single tests were selected"
    ran = {item.path for item in session.items}
    missing = sorted(p.name for p in HERE.glob("test_*.py") if p not in ran)
    if missing:
        return f"not every file ran ({', '.join(missing)} missing)"
    return None


def test_docs_security_table_matches_this_run(request: pytest.FixtureRequest) -> None:
    if os.environ.get(results.REGENERATING_ENV):
        pytest.skip("python -m tests.e2e.security.report is regenerating the table")
    if hasattr(request.config, "workerinput"):
        # Under pytest-xdist no worker holds every row: the controller compares the table at the
        # end of the session (tests/conftest.py). Here: the doc still has a table to compare.
        text = results.SECURITY_DOC.read_text()
        for begin, end in ((results.BEGIN, results.END), (results.TRANSPORT_BEGIN, results.TRANSPORT_END)):
            documented = results.doc_table(text, begin, end)
            assert documented is not None and "| **Total** |" in documented
        return
    why = _whole_suite(request.session, request.config)
    if why is not None:
        pytest.skip(f"the table is only compared after a full run: {why}")
    problem = results.stale(list(results.ROWS.values()))
    assert problem is None, problem
