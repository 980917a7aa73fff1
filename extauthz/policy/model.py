"""The policy as immutable objects, parsed once by :mod:`extauthz.policy.loader`.

Everything the hot path needs (compiled patterns, sorted rules, resolved
secrets) is prepared here at load time, so a request only reads these objects.
Field names mirror the camelCase policy file; docs/policy.md is the reference.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cached_property
from types import MappingProxyType
from typing import Any

from extauthz.policy.patterns import Pattern, Template


class Effect(StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class Presence(StrEnum):
    MUST_EXIST = "must_exist"
    MUST_ABSENT = "must_absent"


class FilterEffect(StrEnum):
    RETAIN = "retain"
    DESTROY = "destroy"


class Mode(StrEnum):
    """``monitor`` logs what would be denied and allows (rollout safety)."""

    ENFORCE = "enforce"
    MONITOR = "monitor"


class VariableSource(StrEnum):
    JWT_CLAIM = "jwtClaim"
    HEADER = "header"
    QUERY = "query"
    PATH_SEGMENT = "pathSegment"
    METHOD = "method"
    HOST = "host"
    PATH = "path"


@dataclass(frozen=True)
class Variable:
    name: str
    source: VariableSource
    key: str = ""
    index: int = 0


# --- rules ---------------------------------------------------------------


@dataclass(frozen=True)
class PathCondition:
    pattern: Pattern
    presence: Presence = Presence.MUST_EXIST


@dataclass(frozen=True)
class TokenCondition:
    claim: Pattern
    value: Pattern | None = None
    presence: Presence = Presence.MUST_EXIST


class Consistency(StrEnum):
    UNSPECIFIED = "UNSPECIFIED"
    MINIMIZE_LATENCY = "MINIMIZE_LATENCY"
    HIGHER_CONSISTENCY = "HIGHER_CONSISTENCY"


@dataclass(frozen=True)
class TupleTemplate:
    user: Template
    relation: Template
    obj: Template
    condition: Mapping[str, object] | None = None


@dataclass(frozen=True)
class FgaCondition:
    """A relationship question asked of OpenFGA (docs/relationships.md)."""

    user: Template
    relation: Template
    obj: Template
    backend: str
    contextual_tuples: tuple[TupleTemplate, ...] = ()
    context: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))
    consistency: Consistency = Consistency.UNSPECIFIED
    presence: Presence = Presence.MUST_EXIST


@dataclass(frozen=True)
class AuthzenCondition:
    """An AuthZEN evaluation with the API-gateway profile (docs/relationships.md)."""

    backend: str
    presence: Presence = Presence.MUST_EXIST


@dataclass(frozen=True)
class Rule:
    """A rule; ``Proxy.rules`` holds them in evaluation order (priority, then file order)."""

    index: int
    effect: Effect
    methods: frozenset[str] | None = None
    variables: tuple[Variable, ...] = ()
    path: PathCondition | None = None
    token: tuple[TokenCondition, ...] = ()
    fga: FgaCondition | None = None
    authzen: AuthzenCondition | None = None
    priority: int = 100
    notes: str = ""

    @property
    def is_relationship(self) -> bool:
        return self.fga is not None or self.authzen is not None

    @cached_property
    def uses_values(self) -> bool:
        """Does deciding this rule need the request's variable values? (Most rules don't: no lookup then.)"""
        patterns = [c.claim for c in self.token] + [c.value for c in self.token if c.value is not None]
        if self.path is not None:
            patterns.append(self.path.pattern)
        return bool(self.variables) or self.is_relationship or any(p.variables for p in patterns)


# --- filters -------------------------------------------------------------


@dataclass(frozen=True)
class FilterOperation:
    index: int
    effect: FilterEffect
    json_path: Pattern
    match_field: Pattern | None = None
    match_value: Pattern | None = None
    priority: int = 100
    notes: str = ""

    @property
    def is_row(self) -> bool:
        return self.match_field is not None


@dataclass(frozen=True)
class Filter:
    index: int
    default_operation: FilterEffect
    operations: tuple[FilterOperation, ...]
    variables: tuple[Variable, ...] = ()
    methods: frozenset[str] | None = None
    path: Pattern | None = None
    statuses: frozenset[int] | None = None
    notes: str = ""


# --- providers -----------------------------------------------------------


@dataclass(frozen=True)
class TokenSource:
    """Where a token is read from: exactly one of header, cookie or query."""

    header: str = ""
    prefix: str = ""
    cookie: str = ""
    query: str = ""


@dataclass(frozen=True)
class Provider:
    name: str
    issuer: str
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    jwks_uri: str = ""
    discovery: bool = False
    jwks_file: str = ""
    jwks_inline: Mapping[str, object] | None = None
    hmac_secret_file: str = ""
    hmac_secret: bytes = field(default=b"", repr=False)
    clock_skew_seconds: int = 30
    require_exp: bool = True
    max_token_age_seconds: int | None = None
    sources: tuple[TokenSource, ...] = (TokenSource(header="authorization", prefix="Bearer "),)
    forward_token: bool = False
    jwks_refresh_seconds: int = 60
    jwks_timeout_seconds: float = 5.0


# --- proxies -------------------------------------------------------------


@dataclass(frozen=True)
class PublicPath:
    path: Pattern
    methods: frozenset[str] | None = None


@dataclass(frozen=True)
class TargetCredential:
    """The upstream credential: the value comes from a file or an env var, never the policy."""

    header: str
    prefix: str = ""
    file: str = ""
    env: str = ""
    value: str = field(default="", repr=False)


@dataclass(frozen=True)
class IdentityHeader:
    name: str
    value: Template


@dataclass(frozen=True)
class Upstream:
    target_credential: TargetCredential | None = None
    identity_headers: tuple[IdentityHeader, ...] = ()


@dataclass(frozen=True)
class Proxy:
    name: str
    providers: tuple[str, ...]
    default_effect: Effect = Effect.DENY
    rules: tuple[Rule, ...] = ()
    filters: tuple[Filter, ...] = ()
    hosts: tuple[str, ...] = ()
    public_paths: tuple[PublicPath, ...] = ()
    upstream: Upstream = Upstream()
    mode: Mode = Mode.ENFORCE
    default: bool = False

    @cached_property
    def has_relationships(self) -> bool:
        """Does any rule ask a relationship backend? If not, a Check decides in one plain pass."""
        return any(rule.is_relationship for rule in self.rules)


# --- relationship backends -----------------------------------------------


@dataclass(frozen=True)
class BackendAuth:
    """Bearer auth for a backend: a preshared key file, or OIDC client credentials."""

    token_file: str = ""
    client_id: str = ""
    client_secret_file: str = ""
    token_url: str = ""
    audience: str = ""


@dataclass(frozen=True)
class OpenFgaBackend:
    name: str
    url: str
    store_id: str
    authorization_model_id: str
    timeout_ms: int = 150
    auth: BackendAuth = BackendAuth()


@dataclass(frozen=True)
class RouteTemplate:
    """An OpenAPI path template (``/todos/{todoId}``); the AuthZEN client compiles it once per policy."""

    template: str
    methods: frozenset[str] | None = None


@dataclass(frozen=True)
class AuthzenBackend:
    name: str
    url: str
    routes: tuple[RouteTemplate, ...]
    timeout_ms: int = 150
    auth: BackendAuth = BackendAuth()


@dataclass(frozen=True)
class RelationshipCacheSettings:
    allowed_ttl_seconds: float = 10.0
    denied_ttl_seconds: float = 5.0
    max_entries: int = 100_000
    redis_url: str = ""
    redis_timeout_ms: int = 20


# --- server --------------------------------------------------------------


@dataclass(frozen=True)
class TlsSettings:
    cert_file: str
    key_file: str
    client_ca_file: str = ""


@dataclass(frozen=True)
class ShadowSettings:
    file: str
    """Absolute path of the candidate policy."""
    response_sample_rate: float = 0.1


@dataclass(frozen=True)
class ServerSettings:
    grpc_address: str = "127.0.0.1:9001"
    http_address: str = ""
    """The HTTP ext_authz listener (Envoy's ``http_service``); off when empty."""
    metrics_address: str = ""
    workers: int = 1
    """Sidecar processes sharing the listening ports (SO_REUSEPORT)."""
    admin_address: str = ""
    tls: TlsSettings | None = None
    token_cache_size: int = 10_000
    token_cache_ttl_seconds: int = 60
    max_body_bytes: int = 1 << 20
    drain_seconds: float = 5.0
    shadow: ShadowSettings | None = None
    """A candidate policy evaluated beside this one (the active policy decides); reloaded on its own."""


@dataclass(frozen=True)
class Policy:
    providers: Mapping[str, Provider]
    proxies: tuple[Proxy, ...]
    openfga: Mapping[str, OpenFgaBackend] = field(default_factory=lambda: MappingProxyType({}))
    authzen: Mapping[str, AuthzenBackend] = field(default_factory=lambda: MappingProxyType({}))
    relationship_cache: RelationshipCacheSettings = RelationshipCacheSettings()
    server: ServerSettings = ServerSettings()
    source: str = ""
    digest: str = ""

    def proxy_named(self, name: str) -> Proxy | None:
        for proxy in self.proxies:
            if proxy.name == name:
                return proxy
        return None


def freeze(value: object) -> Any:
    """Read-only copies of parsed JSON/YAML values: mappings become proxies, lists tuples."""
    if isinstance(value, dict):
        return MappingProxyType({k: freeze(v) for k, v in value.items()})
    if isinstance(value, list):
        return tuple(freeze(v) for v in value)
    return value


def thaw(value: object) -> Any:
    """Plain dicts and lists again, for JSON encoders and parsers that want them."""
    if isinstance(value, Mapping):
        return {str(k): thaw(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [thaw(v) for v in value]
    return value
