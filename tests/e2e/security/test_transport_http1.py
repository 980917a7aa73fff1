"""The HTTP/1.1 ext_authz port under attack (class 12 of "The transport under attack" in docs/SECURITY.md).

The same measurements as the gRPC port's attacks (:mod:`tests.e2e.security.transport_harness`),
with the probe an HTTP/1.1 keep-alive check request as Envoy's ``http_service`` sends
it, on its own connection: peak RSS, CPU per megabyte sent, probe latency and answer.
What the listener must also do is in each variant: answer pipelined requests in
order, refuse a head over its limit with a 400 and close, and keep serving new
connections while others hold theirs open.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.e2e.security import transport_harness as th
from tests.e2e.security.transport_harness import Measure, Outcome, Sidecar, Sidecars

CLASS = "12. HTTP/1.1 transport"

ATTACKS: dict[str, Callable[[Sidecar, Measure], Outcome]] = {
    "1,000 pipelined check requests in one write": th.http_pipelined,
    "a connection that sends nothing": lambda sc, m: th.slowloris(sc, m, count=1, port=sc.http_port, http=True),
    "50 heads trickling in a byte at a time": th.http_trickle,
    "1,100 connections each holding a request": th.http_flood,
    "a 1 MB head that never ends": th.http_huge_head,
}


@pytest.mark.parametrize("variant", list(ATTACKS))
def test_12_http_transport(transport_sidecars: Sidecars, transport_record: Callable[..., None],
                           variant: str) -> None:
    sidecar = transport_sidecars.get("lean")  # the HTTP listener is the same whichever gRPC server runs beside it
    with Measure(sidecar, probe="http") as measure:
        outcome = ATTACKS[variant](sidecar, measure)
    measured = measure.result
    measured.sent = outcome.sent
    misses = measured.misses() + outcome.problems
    if outcome.allowed:
        misses.append("an allow for a request the policy denies")
    transport_record(CLASS, variant, "http", "held" if not misses else "not held: " + "; ".join(misses),
                     outcome.ended, "held", "; ".join(outcome.facts), wrongly_allowed=outcome.allowed)
    report = f"{CLASS} / {variant}: {measured.summary()}; ended: {outcome.ended}; {outcome.facts + outcome.notes}"
    print(report)
    assert not misses, report
