"""Run the adversarial suite and write its results table into docs/SECURITY.md.

    python -m tests.e2e.security.report
    python -m tests.e2e.security.report --transport   # only the transport suite and its table

Runs ``pytest tests/e2e/security -q`` with ``$EXTAUTHZ_SECURITY_RESULTS`` pointing at a
temporary JSON file, then replaces the part of docs/SECURITY.md between
``<!-- results:begin -->`` and ``<!-- results:end -->`` with the table of that run
(also when some variants failed: the table then says which classes let something
through), and the part between ``<!-- transport-results:begin -->`` and
``<!-- transport-results:end -->`` with the transport suite's table (which attack held on
which server). With ``--transport`` it runs only the transport suite (``test_transport_*.py``,
about two minutes) and rewrites only its table. Exits with pytest's status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.e2e.security.results import (
    REGENERATING_ENV,
    REPO,
    RESULTS_ENV,
    SECURITY_DOC,
    TRANSPORT_BEGIN,
    TRANSPORT_END,
    Row,
    table,
    transport_table,
    with_table,
    with_tables,
)

HERE = Path(__file__).resolve().parent


def main() -> int:
    transport_only = "--transport" in sys.argv[1:]
    # The transport suite measures CPU and latency: it runs without xdist, one attack at a time.
    targets = (["-p", "no:xdist", *sorted(str(p.relative_to(REPO)) for p in HERE.glob("test_transport_*.py"))]
               if transport_only else ["tests/e2e/security"])
    with tempfile.TemporaryDirectory(prefix="extauthz-security-") as tmp:
        out = Path(tmp) / "results.json"
        env = {**os.environ, RESULTS_ENV: str(out), REGENERATING_ENV: "1"}
        status = subprocess.call([sys.executable, "-m", "pytest", *targets, "-q"], cwd=REPO, env=env)
        if not out.exists():
            print(f"the suite recorded no results (pytest exited with {status}); {SECURITY_DOC} left as it was")
            return status or 1
        rows = [Row(**variant) for variant in json.loads(out.read_text())["variants"]]
    if transport_only:
        SECURITY_DOC.write_text(with_table(SECURITY_DOC.read_text(), transport_table(rows), TRANSPORT_BEGIN,
                                           TRANSPORT_END))
        print(f"\n{SECURITY_DOC.relative_to(REPO)} updated:\n\n{transport_table(rows)}")
        return status
    SECURITY_DOC.write_text(with_tables(SECURITY_DOC.read_text(), rows))
    print(f"\n{SECURITY_DOC.relative_to(REPO)} updated:\n\n{table(rows)}\n\n{transport_table(rows)}")
    return status


if __name__ == "__main__":
    sys.exit(main())
