"""Prometheus metrics, named ``extauthz_*``; labels stay low-cardinality (no paths, no subs)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

REGISTRY = CollectorRegistry(auto_describe=True)

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
policy_info = Gauge(
    "extauthz_policy_info", "The loaded policy (value 1), labelled with its hash.", ["digest"],
    registry=REGISTRY,
)


def record_jwks_fetch(provider: str, ok: bool) -> None:
    jwks_fetches.labels(provider, "ok" if ok else "error").inc()
reloads = Counter("extauthz_policy_reloads", "Policy reload attempts.", ["result"], registry=REGISTRY)
