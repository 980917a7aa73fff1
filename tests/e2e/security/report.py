"""Run the adversarial suite and write its results table into docs/SECURITY.md.

    python -m tests.e2e.security.report

Runs ``pytest tests/e2e/security -q`` with ``$EXTAUTHZ_SECURITY_RESULTS`` pointing at a
temporary JSON file, then replaces the part of docs/SECURITY.md between
``<!-- results:begin -->`` and ``<!-- results:end -->`` with the table of that run
(also when some variants failed: the table then says which classes let something
through). Exits with pytest's status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tests.e2e.security.results import REGENERATING_ENV, REPO, RESULTS_ENV, SECURITY_DOC, Row, table, with_table


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="extauthz-security-") as tmp:
        out = Path(tmp) / "results.json"
        env = {**os.environ, RESULTS_ENV: str(out), REGENERATING_ENV: "1"}
        status = subprocess.call([sys.executable, "-m", "pytest", "tests/e2e/security", "-q"], cwd=REPO, env=env)
        if not out.exists():
            print(f"the suite recorded no results (pytest exited with {status}); {SECURITY_DOC} left as it was")
            return status or 1
        rows = [Row(**variant) for variant in json.loads(out.read_text())["variants"]]
    rendered = table(rows)
    SECURITY_DOC.write_text(with_table(SECURITY_DOC.read_text(), rendered))
    print(f"\n{SECURITY_DOC.relative_to(REPO)} updated:\n\n{rendered}")
    return status


if __name__ == "__main__":
    sys.exit(main())
