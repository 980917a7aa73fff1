"""The adversarial suite's results: one row per variant, one table line per attack class.

Shared by ``conftest.py`` (collects rows, prints the table, writes JSON, checks the
table in docs/SECURITY.md) and ``report.py`` (regenerates that table).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[3]
SECURITY_DOC = REPO / "docs" / "SECURITY.md"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
TRANSPORT_BEGIN, TRANSPORT_END = "<!-- transport-results:begin -->", "<!-- transport-results:end -->"
"""The second table: the transport suite (test_transport_*.py), one line per (variant, server)."""
SERVER_ORDER = {"lean": 0, "grpcio": 1, "http": 2}
LAST_FILE = "test_zz_doc_table.py"
"""The doc-table check, run after the rest of the suite."""
RESULTS_ENV = "EXTAUTHZ_SECURITY_RESULTS"
"""If set, the session writes its results as JSON to this path."""
REGENERATING_ENV = "EXTAUTHZ_SECURITY_REGENERATING"
"""Set by ``python -m tests.e2e.security.report``: the doc is about to be rewritten, so it is not compared."""


@dataclass(frozen=True)
class Row:
    cls: str
    """``"<n>. <name>"``; the table is ordered by ``n``."""
    variant: str
    wrongly_allowed: int
    """1 if a request the policy denies, a client identity header or a second token reached the upstream."""
    leaked: int
    """1 if the client received something a filter removes, or a 5xx for a token."""
    saw: str
    """What the caller saw, e.g. ``403``, ``200 filtered``, ``502 blocked``; for a transport row, ``held`` or
    ``not held: <the bounds missed>``."""
    test: str = ""
    server: str = ""
    """Set only on the transport suite's rows (``lean``, ``grpcio``, ``http``): they make the second table."""
    ended: str = ""
    """Transport rows: how the attacker's connection ended (``GOAWAY PROTOCOL_ERROR``, ``stayed open``...)."""
    expected: str = ""
    """Transport rows: ``held``, or ``fails: <why>`` for an expected failure."""
    facts: str = ""
    """Transport rows: stable observations (``128 of 400 admitted``)."""


ROWS: dict[str, Row] = {}
"""Test node id -> its row (a test records once; a rerun replaces it)."""
STATE: dict[str, object] = {"deselected": False}
"""Whether some collected test was deselected (``-k``, ``-m``, ``--lf``): then the run is not the whole suite."""


def add(row: Row) -> None:
    ROWS[row.test or f"{row.cls}/{row.variant}"] = row


def _order(cls: str) -> tuple[int, str]:
    number = re.match(r"\s*(\d+)", cls)
    return (int(number.group(1)) if number else 1_000, cls)


def request_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if not r.server]


def transport_rows(rows: list[Row]) -> list[Row]:
    return [r for r in rows if r.server]


def summary(rows: list[Row]) -> list[dict[str, Any]]:
    by_class: dict[str, list[Row]] = {}
    for row in request_rows(rows):
        by_class.setdefault(row.cls, []).append(row)
    out = []
    for cls in sorted(by_class, key=_order):
        group = by_class[cls]
        out.append({
            "class": cls,
            "variants": len(group),
            "wrongly_allowed": sum(r.wrongly_allowed for r in group),
            "leaked": sum(r.leaked for r in group),
            "saw": dict(sorted(Counter(r.saw for r in group).items())),
        })
    return out


def as_json(rows: list[Row]) -> dict[str, Any]:
    ordered = sorted(rows, key=lambda r: (_order(r.cls), r.variant, SERVER_ORDER.get(r.server, 9)))
    return {"classes": summary(rows), "variants": [asdict(r) for r in ordered]}


def _saw(counts: dict[str, int]) -> str:
    return ", ".join(f"{label} ({n})" for label, n in counts.items())


def table(rows: list[Row]) -> str:
    """The Markdown table (and the variants that let something through, if any)."""
    rows = request_rows(rows)
    lines = [
        "| Class | Variants tried | Wrongly allowed | Leaked | What the caller saw |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    classes = summary(rows)
    for c in classes:
        lines.append(f"| {c['class']} | {c['variants']} | {c['wrongly_allowed']} | {c['leaked']} | {_saw(c['saw'])} |")
    lines.append(f"| **Total** | {sum(c['variants'] for c in classes)} | "
                 f"{sum(c['wrongly_allowed'] for c in classes)} | {sum(c['leaked'] for c in classes)} | |")
    bad = [r for r in sorted(rows, key=lambda r: (_order(r.cls), r.variant)) if r.wrongly_allowed or r.leaked]
    if bad:
        lines += ["", "Variants that let something through:", ""]
        lines += [f"- {r.cls}, `{r.variant}`: caller saw {r.saw}"
                  + (", wrongly allowed" if r.wrongly_allowed else "") + (", leaked" if r.leaked else "")
                  for r in bad]
    return "\n".join(lines)


def _cell(text: str) -> str:
    return text.replace("|", "\\|") or "-"


def transport_table(rows: list[Row]) -> str:
    """The transport suite's table: per attack variant and server, whether every bound held.

    Only what every run must agree on, since a full run fails when the doc differs:
    held or not, and what the suite expects of that server. Which bound was missed,
    how the attacker's connection ended and the figures vary with timing (a GOAWAY
    raced by a close, a probe that met a full queue) and are printed by each test;
    so does whether a case expected to fail (grpc.aio's) failed this time, since
    some of those fail by a margin that varies with the machine's load.
    """
    lines = [
        "| Class | Variant | Server | Result | Expected |",
        "| --- | --- | --- | --- | --- |",
    ]
    ordered = sorted(transport_rows(rows), key=lambda r: (_order(r.cls), r.variant, SERVER_ORDER.get(r.server, 9)))
    for r in ordered:
        result = "held" if r.saw == "held" else "not held"
        if r.expected.startswith("fails:"):
            result = "expected to fail"
        lines.append(f"| {r.cls} | {_cell(r.variant)} | {r.server} | {result} | {_cell(r.expected)} |")
    must = [r for r in ordered if not r.expected.startswith("fails:")]
    held = sum(r.saw == "held" for r in must)
    lines.append(f"| **Total** | {len(ordered)} | | {held} of {len(must)} held, {len(ordered) - len(must)} "
                 "expected to fail | |")
    return "\n".join(lines)


def doc_table(text: str, begin: str = BEGIN, end_marker: str = END) -> str | None:
    """The generated part of docs/SECURITY.md between the markers, or None without them."""
    start, end = text.find(begin), text.find(end_marker)
    if start < 0 or end < start:
        return None
    return text[start + len(begin):end].strip()


def stale(rows: list[Row]) -> str | None:
    """Why docs/SECURITY.md does not show these results, or None when it does."""
    text = SECURITY_DOC.read_text()
    for begin, end, rendered in ((BEGIN, END, table(rows)),
                                 (TRANSPORT_BEGIN, TRANSPORT_END, transport_table(rows))):
        documented = doc_table(text, begin, end)
        if documented is None:
            return f"{SECURITY_DOC} lacks the {begin} / {end} markers"
        if documented != rendered:
            return ("docs/SECURITY.md shows other results than this run; regenerate it with "
                    "`python -m tests.e2e.security.report`.\n--- this run ---\n" + rendered
                    + "\n--- documented ---\n" + documented)
    return None


def with_table(text: str, rendered: str, begin: str = BEGIN, end_marker: str = END) -> str:
    start, end = text.find(begin), text.find(end_marker)
    if start < 0 or end < start:
        raise ValueError(f"{SECURITY_DOC} has no {begin} ... {end_marker} markers")
    return text[:start + len(begin)] + "\n" + rendered + "\n" + text[end:]


def with_tables(text: str, rows: list[Row]) -> str:
    """Both generated tables of docs/SECURITY.md replaced by these results."""
    text = with_table(text, table(rows))
    return with_table(text, transport_table(rows), TRANSPORT_BEGIN, TRANSPORT_END)
