"""Prometheus metrics, named ``extauthz_*``; labels stay low-cardinality (no paths, no subs).

With ``serve --workers N`` every worker writes its values to files in the
supervisor's ``PROMETHEUS_MULTIPROC_DIR`` (prometheus_client's multiprocess
mode) and the supervisor serves their sum; each gauge says how its workers'
values combine (``multiprocess_mode``), and gauges read at scrape time from the
runtime (readiness, key ages) are the supervisor's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

REGISTRY = CollectorRegistry(auto_describe=True)

_CHILDREN: dict[tuple[Counter | Histogram, tuple[str, ...]], Any] = {}
_MAX_CHILDREN = 4096  # label values are few (proxies x codes x rules x phases); a bound all the same


def child(metric: Counter | Histogram, *values: str) -> Any:
    """``metric.labels(*values)``, remembered: on the request path, looking a child up cost more than counting.

    Only for counters and histograms, which never drop their children (a cleared
    gauge would leave a stale child here).
    """
    key = (metric, values)
    found = _CHILDREN.get(key)
    if found is None:
        if len(_CHILDREN) >= _MAX_CHILDREN:
            _CHILDREN.clear()
        found = _CHILDREN[key] = metric.labels(*values)
    return found


class _ReplacedGauge(Gauge):
    """A gauge whose ``clear()`` zeroes what it drops first.

    In multiprocess mode a dropped child's last value stays in the worker's
    file: a replaced policy digest would still read 1 (the supervisor leaves
    the zeroes out, as a single process leaves the dropped child out).
    """

    def clear(self) -> None:
        for family in self.collect():
            for sample in family.samples:
                self.labels(**sample.labels).set(0)
        super().clear()


_LATENCY_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)

decisions = Counter(
    "extauthz_decisions", "Check decisions.", ["proxy", "result", "code", "rule"], registry=REGISTRY
)
check_latency = Histogram(
    "extauthz_check_duration_seconds", "Time to answer one Check.", buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
jwks_fetches = Counter(
    "extauthz_jwks_fetches", "JWKS fetch attempts.", ["provider", "result"], registry=REGISTRY
)
token_cache = Counter(
    "extauthz_token_cache_lookups", "Verified-token cache lookups.", ["result"], registry=REGISTRY
)
policy_info = _ReplacedGauge(
    "extauthz_policy_info", "The loaded policy (value 1), labelled with its hash.", ["digest"],
    registry=REGISTRY, multiprocess_mode="livemax",  # workers: 1 for every digest some live worker serves
)


def record_jwks_fetch(provider: str, ok: bool) -> None:
    jwks_fetches.labels(provider, "ok" if ok else "error").inc()
reloads = Counter("extauthz_policy_reloads", "Policy reload attempts.", ["result"], registry=REGISTRY)

# --- relationship backends (OpenFGA, AuthZEN) and their cache ---------------
# Labels name the backend as the policy does, never a user, object or path.
relationship_calls = Counter(
    "extauthz_relationship_backend_calls",
    "HTTP calls to relationship backends (each attempt, a retry counts again).",
    ["backend", "api", "result", "cause"], registry=REGISTRY,
)
relationship_call_latency = Histogram(
    "extauthz_relationship_backend_call_duration_seconds", "Time of one relationship backend HTTP call.",
    ["backend"], buckets=_LATENCY_BUCKETS, registry=REGISTRY,
)
relationship_unresolved = Counter(
    "extauthz_relationship_unresolved",
    "Relationship conditions left unresolved (fail closed), by backend and cause.",
    ["backend", "cause"], registry=REGISTRY,
)
relationship_cache = Counter(
    "extauthz_relationship_cache_lookups",
    "Relationship answer cache lookups: tier memory|redis, result hit|miss|shared|bypass|error.",
    ["tier", "result"], registry=REGISTRY,
)

# --- operations: reloads, key freshness, readiness (read at scrape time) ------
policy_rejected = Gauge(
    "extauthz_policy_file_rejected",
    "1 while the policy file on disk was rejected and an older policy keeps serving; alert on it.",
    registry=REGISTRY, multiprocess_mode="livemax",  # workers: 1 when any live worker rejected it
)


class _LiveState(Collector):
    """Gauges computed when Prometheus scrapes, from whatever runtime is serving now.

    A reload replaces the verifier and its key sets, so key ages cannot live in
    ordinary labelled gauges without leaving stale providers behind; the server
    installs :attr:`source` once and every scrape asks it afresh.
    """

    def __init__(self) -> None:
        self.source: Callable[[], tuple[bool, Mapping[str, float | None]]] = lambda: (False, {})

    def describe(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("extauthz_ready", "1 when every provider has signing keys loaded.")
        yield GaugeMetricFamily("extauthz_jwks_key_age_seconds", "Seconds since a provider's keys were loaded.",
                                labels=["provider"])

    def collect(self) -> Iterator[Metric]:
        ready, ages = self.source()
        yield GaugeMetricFamily("extauthz_ready", "1 when every provider has signing keys loaded.",
                                value=1.0 if ready else 0.0)
        family = GaugeMetricFamily("extauthz_jwks_key_age_seconds",
                                   "Seconds since a provider's keys were loaded.", labels=["provider"])
        for provider, age in sorted(ages.items()):
            if age is not None:
                family.add_metric([provider], age)
        yield family


live_state = _LiveState()
REGISTRY.register(live_state)
tls_not_after = Gauge(
    "extauthz_tls_certificate_expiry_timestamp_seconds",
    "Expiry (Unix time) of the gRPC listener's serving certificate; alert well before it.",
    registry=REGISTRY, multiprocess_mode="livemin",  # workers: the soonest expiry any live worker serves
)
tls_reloads = Counter(
    "extauthz_tls_reloads", "Listener certificate rotations picked up from disk.", ["result"], registry=REGISTRY
)

# --- response filtering (ext_proc) -----------------------------------------------
extproc_latency = Histogram(
    "extauthz_extproc_message_duration_seconds",
    "Time to answer one ext_proc message, by phase (response_headers, response_body).",
    ["phase"], buckets=(0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
filtered_bytes = Counter(
    "extauthz_filtered_bytes",
    "Body bytes of filtered responses: side=upstream (after content decoding) or client (after filtering).",
    ["proxy", "side"], registry=REGISTRY,
)
filter_outcomes = Counter(
    "extauthz_response_filter_outcomes",
    "Responses seen by the response filter: passed, filtered, blocked (502, with a code) or body_not_received "
    "(Envoy never sent a body it was asked for); proxy is empty when the identity is unknown.",
    ["proxy", "outcome", "code"], registry=REGISTRY,
)

# --- the shadow policy (server.shadow): a candidate evaluated beside the active one ----------------
shadow_info = _ReplacedGauge(
    "extauthz_shadow_policy_info", "The shadow policy loaded beside the active one (value 1), labelled with its hash.",
    ["digest"], registry=REGISTRY, multiprocess_mode="livemax",
)
shadow_decisions = Counter(
    "extauthz_shadow_decisions",
    "Checks evaluated by the shadow policy, by the active and the shadow decision's code (shadow=undecided: it "
    "would have needed more relationship backend calls than its budget); the two differ: a difference.",
    ["proxy", "active", "shadow"], registry=REGISTRY,
)
shadow_differences = Counter(
    "extauthz_shadow_differences",
    "Checks the shadow policy decides differently (another status or code), by both codes: the agreement rate "
    "is 1 - differences / decisions{shadow!=\"undecided\"}.",
    ["proxy", "active", "shadow"], registry=REGISTRY,
)
shadow_responses = Counter(
    "extauthz_shadow_responses",
    "Responses compared with the shadow policy's filters: same, different (another body), or scope (a filter "
    "applies under one policy only; counted at the Check).",
    ["proxy", "result"], registry=REGISTRY,
)
shadow_skipped = Counter(
    "extauthz_shadow_skipped",
    "Shadow evaluations not made: busy (too many pending; the active answers never wait) or error.",
    ["reason"], registry=REGISTRY,
)
shadow_reloads = Counter("extauthz_shadow_reloads", "Shadow policy load attempts.", ["result"], registry=REGISTRY)
shadow_rejected = Gauge(
    "extauthz_shadow_file_rejected",
    "1 while the shadow policy file was rejected (the active policy is not affected).",
    registry=REGISTRY, multiprocess_mode="livemax",
)
