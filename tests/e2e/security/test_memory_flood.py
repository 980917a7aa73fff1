"""A flood of distinct, huge interpolated values must not grow the sidecar's memory.

A rule whose path pattern interpolates a ``pathSegment`` variable compiles one
RE2 program per distinct value. An attacker who sends every request with a new
40 KB segment used to add ~280 KB of RSS per request until the count-bounded
cache filled (8192 entries: over 2 GB). Now a value over the length cap leaves
the pattern unresolved (the allow rule does not match: 403) and the compiled
cache is bounded by bytes, so the real sidecar, behind the real Envoy, stays
flat whatever the flood sends.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from extauthz.policy.patterns import MAX_VALUE_LENGTH
from tests.e2e.stack import Stack, running_stack

pytestmark = pytest.mark.envoy

POLICY = """
providers:
  - name: idp
    issuer: ISSUER
    jwksUri: JWKS_URI
    audiences: [orders-api]
proxies:
  - name: orders-api
    defaultRuleEffect: deny
    rules:
      - {"effect": "allow", "methods": ["GET"],
         "variables": [{"name": "tenantId", "source": "pathSegment", "index": 2}],
         "path": {"path": {"pattern": "^/v1/tenants/{{tenantId}}/"}, "presence": "must_exist"},
         "notes": "a tenant's resources, addressed by the segment that names it"}
"""

REQUESTS = 10_000
SEGMENT_BYTES = 40_000  # fits Envoy's default 60 KiB request-header limit with the token
THREADS = 4
CLASS = "13. Memory through variables"
PEAK_LIMIT_MB = 150


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


@dataclass
class Flood:
    statuses: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    baseline_kb: int = 0
    peak_kb: int = 0
    after_kb: int = 0
    seconds: float = 0.0


def segment(i: int) -> str:
    """A distinct 40 KB segment: the index up front, so every value is a new cache key."""
    head = f"t{i:07d}-"
    return head + "x" * (SEGMENT_BYTES - len(head))


def _send(stack: Stack, token: str, indices: range, flood: Flood, lock: threading.Lock) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", stack.ports.listener, timeout=30)
    seen: Counter[int] = Counter()
    headers = {"authorization": f"Bearer {token}"}
    try:
        for i in indices:
            try:
                conn.request("GET", f"/v1/tenants/{segment(i)}/orders", headers=headers)
                response = conn.getresponse()
                response.read()
                seen[response.status] += 1
                if response.will_close:
                    conn.close()
                    conn = http.client.HTTPConnection("127.0.0.1", stack.ports.listener, timeout=30)
            except (OSError, http.client.HTTPException) as exc:
                with lock:
                    flood.errors.append(f"{type(exc).__name__}: {exc}")
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", stack.ports.listener, timeout=30)
    finally:
        conn.close()
        with lock:
            flood.statuses.update(seen)


def flood(stack: Stack, requests: int = REQUESTS, threads: int = THREADS) -> Flood:
    """Send the requests from a few keep-alive connections while sampling the sidecar's RSS."""
    assert stack.sidecar.process is not None
    pid = stack.sidecar.process.pid
    token = stack.idp.token(sub="user-1")
    result = Flood(baseline_kb=rss_kb(pid))
    result.peak_kb = result.baseline_kb
    lock = threading.Lock()
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.05):
            result.peak_kb = max(result.peak_kb, rss_kb(pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    share = -(-requests // threads)
    senders = [threading.Thread(target=_send, args=(stack, token, range(start, min(start + share, requests)),
                                                    result, lock))
               for start in range(0, requests, share)]
    started = time.monotonic()
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    result.seconds = time.monotonic() - started
    done.set()
    sampler.join()
    result.after_kb = rss_kb(pid)
    result.peak_kb = max(result.peak_kb, result.after_kb)
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("memory-flood")
    try:
        with running_stack(workdir, POLICY) as running:
            yield running
    finally:
        # One decision line per request, each carrying its 40 KB path: ~400 MB that
        # pytest would keep among its last temporary directories. The head is enough.
        log = workdir / "sidecar.log"
        if log.exists():
            with log.open("r+b") as f:
                f.truncate(1 << 20)


def _warm_up(stack: Stack, token: str) -> None:
    """Import paths, gRPC buffers and JWKS are paid for before the baseline is read."""
    for i in range(50):
        stack.request("GET", f"/v1/tenants/warm-{i}/orders", token)
        stack.request("GET", f"/v1/tenants/{'w' * 2000}{i}/orders", token)


def test_the_cap_fails_closed_and_ordinary_ids_still_match(stack: Stack, record: Callable[..., None]) -> None:
    token = stack.idp.token(sub="user-1")
    assert stack.request("GET", "/v1/tenants/acme/orders", token).status == 200
    assert stack.request("GET", f"/v1/tenants/{'a' * MAX_VALUE_LENGTH}/orders", token).status == 200
    over = stack.request("GET", f"/v1/tenants/{'a' * (MAX_VALUE_LENGTH + 1)}/orders", token)
    record(CLASS, wrongly_allowed=over.status < 300, leaked=0, saw=str(over.status),
           variant="a segment one character over the cap")
    assert over.status == 403
    assert stack.request("GET", f"/v1/tenants/{segment(0)}/orders", token).status == 403
    decision = over.json()["decisionId"]
    line = next(ln for ln in stack.sidecar.logs().splitlines() if decision in ln)
    assert json.loads(line)["reason"] == "default deny"  # the allow rule was unresolved, so nothing matched


def test_a_flood_of_distinct_40kb_segments_keeps_the_sidecar_flat(stack: Stack, record: Callable[..., None]) -> None:
    _warm_up(stack, stack.idp.token(sub="user-1"))
    result = flood(stack)
    record(CLASS, wrongly_allowed=any(200 <= status < 300 for status in result.statuses), leaked=0,
           saw=f"403, sidecar RSS {'under' if result.peak_kb < PEAK_LIMIT_MB * 1024 else 'OVER'} {PEAK_LIMIT_MB} MB",
           variant=f"{REQUESTS} distinct 40 KB path segments")
    mb = 1024
    report = (f"{REQUESTS} requests in {result.seconds:.1f} s; sidecar RSS {result.baseline_kb / mb:.1f} MB before, "
              f"peak {result.peak_kb / mb:.1f} MB, {result.after_kb / mb:.1f} MB after "
              f"(growth {(result.peak_kb - result.baseline_kb) / mb:.1f} MB); statuses {dict(result.statuses)}")
    print(report)
    answered = sum(result.statuses.values())
    assert answered >= REQUESTS * 0.99, f"{report}; errors: {result.errors[:5]}"
    # An over-cap value is unresolved: the allow rule never matches it, so nothing gets through.
    assert not any(200 <= status < 300 for status in result.statuses), report
    assert result.statuses[403] >= REQUESTS * 0.95, report
    assert result.peak_kb < PEAK_LIMIT_MB * mb, report
