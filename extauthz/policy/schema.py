"""The policy file's shape, declared once: every field, its type, default and bound.

These pydantic models are what the published JSON Schema (``extauthz schema``,
``docs/policy.schema.json``) is generated from, and the first pass of every
load: :func:`shape_issues` reports every type, bound, enum and unknown-field
mistake in the whole file in one run, each with its line. The loader then
compiles the runtime objects (:mod:`extauthz.policy.model`) and checks what a
schema cannot say (regexes, references between sections, files, URLs, ULIDs).

The runtime dataclasses never import pydantic: the decision core stays plain.
"""

from __future__ import annotations

import difflib
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr, ValidationError

from extauthz.policy.errors import Issue

SCHEMA_ID = "urn:extauthz:policy"

Seconds = Annotated[StrictInt, Field(ge=0)]
PositiveInt = Annotated[StrictInt, Field(gt=0)]
Number = StrictFloat  # strict, yet an integer such as 5 is a number too
Effect = Literal["allow", "deny"]
Presence = Literal["must_exist", "must_absent"]
FilterEffect = Literal["retain", "destroy"]
Mode = Literal["enforce", "monitor"]
VariableSource = Literal["jwtClaim", "header", "query", "pathSegment", "method", "host", "path"]
Consistency = Literal["UNSPECIFIED", "MINIMIZE_LATENCY", "HIGHER_CONSISTENCY"]
Method = Annotated[StrictStr, Field(description="An HTTP method; HEAD and OPTIONS are read as GET")]


def _title(name: str, field: Any) -> str:
    """Editors show a field's title: the name as written in policy files."""
    return str(field.alias or name)


class _Shape(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=False, frozen=True, field_title_generator=_title)


class PatternRef(_Shape):
    pattern: StrictStr = Field(description="An RE2 regular expression with search semantics; "
                                           "{{variable}} placeholders are regex-escaped values")


class TokenSource(_Shape):
    header: StrictStr = Field("", description="Header carrying the token (lower case)")
    prefix: StrictStr = Field("", description="Prefix before the token, e.g. 'Bearer '")
    cookie: StrictStr = Field("", description="Cookie carrying the token")
    query: StrictStr = Field("", description="Query parameter carrying the token")


class Provider(_Shape):
    name: StrictStr = Field(description="Name that proxies refer to")
    issuer: StrictStr = Field(description="The exact iss claim tokens must carry")
    audiences: list[StrictStr] | None = Field(None, description="Accepted aud values; at least one")
    audience: StrictStr | None = Field(None, description="A single accepted aud value (or use audiences)")
    jwks_uri: StrictStr = Field("", alias="jwksUri", description="URL of the issuer's JWKS")
    discovery: StrictBool = Field(False, description="Find jwks_uri through OIDC discovery on the issuer")
    jwks_file: StrictStr = Field("", alias="jwksFile", description="A JWKS on disk, re-read when it changes")
    jwks: dict[str, Any] | None = Field(None, description="An inline JWKS: {keys: [...]}")
    algorithms: list[StrictStr] | None = Field(None, description="Accepted signing algorithms "
                                                                  "(default RS256, ES256, PS256, EdDSA)")
    hmac_secret_file: StrictStr = Field("", alias="hmacSecretFile", description="Shared secret for HS* tokens")
    clock_skew_seconds: Seconds = Field(30, alias="clockSkewSeconds", description="Leeway for exp, nbf and iat")
    require_exp: StrictBool = Field(True, alias="requireExp", description="Refuse tokens without exp")
    max_token_age_seconds: Seconds | None = Field(None, alias="maxTokenAgeSeconds",
                                                  description="Refuse tokens issued (iat) longer ago than this")
    sources: list[TokenSource] | None = Field(None, alias="from",
                                              description="Where tokens are read (default: Authorization Bearer)")
    forward_token: StrictBool = Field(False, alias="forwardToken", description="Keep the token on the way upstream")
    jwks_refresh_seconds: PositiveInt = Field(60, alias="jwksRefreshSeconds",
                                              description="How often the JWKS is fetched again")
    jwks_timeout_seconds: Annotated[Number, Field(gt=0)] = Field(5.0, alias="jwksTimeoutSeconds",
                                                                  description="Timeout of one JWKS fetch")


class Variable(_Shape):
    name: StrictStr = Field(description="The name used as {{name}} in patterns and templates")
    source: VariableSource
    key: StrictStr = Field("", description="Claim (dotted), header or query parameter name")
    index: StrictInt | None = Field(None, description="Path segment, 0-based; negative counts from the end")


class PathCondition(_Shape):
    path: PatternRef
    presence: Presence = "must_exist"


class TokenCondition(_Shape):
    claim: PatternRef = Field(description="Matches claim names (dotted for nested claims)")
    value: PatternRef | None = Field(None, description="Matches the claim's values (JSON spelling for non-strings)")
    presence: Presence = "must_exist"


class TupleCondition(_Shape):
    name: StrictStr
    context: dict[str, Any] = Field(default_factory=dict)


class ContextualTuple(_Shape):
    user: StrictStr
    relation: StrictStr
    object: StrictStr
    condition: TupleCondition | None = None


class FgaCondition(_Shape):
    backend: StrictStr | None = Field(None, description="The OpenFGA backend; optional with one backend")
    user: StrictStr
    relation: StrictStr
    object: StrictStr
    contextual_tuples: list[ContextualTuple] = Field(default_factory=list, alias="contextualTuples")
    context: dict[str, Any] = Field(default_factory=dict)
    consistency: Consistency = "UNSPECIFIED"
    presence: Presence = "must_exist"


class AuthzenCondition(_Shape):
    backend: StrictStr | None = Field(None, description="The AuthZEN PDP; optional with one PDP")
    presence: Presence = "must_exist"


class Rule(_Shape):
    effect: Effect
    methods: list[Method] | None = Field(None, description="Methods the rule applies to (default: all)")
    variables: list[Variable] = Field(default_factory=list)
    path: PathCondition | None = None
    token: list[TokenCondition] = Field(default_factory=list)
    priority: StrictInt = Field(100, description="Lower is evaluated first; ties keep file order")
    notes: StrictStr = ""
    fga: FgaCondition | None = None
    authzen: AuthzenCondition | None = None


class FilterOperation(_Shape):
    effect: FilterEffect
    json_path: PatternRef = Field(alias="jsonPath", description="Matches dotted paths in the JSON body")
    match_field: PatternRef | None = Field(None, alias="matchField", description="Row operations: the field tested")
    match_value: PatternRef | None = Field(None, alias="matchValue", description="Row operations: its value")
    priority: StrictInt = 100
    notes: StrictStr = ""


class Filter(_Shape):
    variables: list[Variable] = Field(default_factory=list)
    default_operation: FilterEffect = Field("retain", alias="defaultFilterOperation")
    operations: list[FilterOperation] = Field(default_factory=list)
    notes: StrictStr = ""
    methods: list[Method] | None = None
    path: PatternRef | None = Field(None, description="Responses to requests whose path matches")
    statuses: list[StrictInt] | None = Field(None, description="Response statuses filtered (default: all)")


class PublicPath(_Shape):
    pattern: StrictStr
    methods: list[Method] | None = None


class TargetCredential(_Shape):
    header: StrictStr = "authorization"
    prefix: StrictStr = ""
    file: StrictStr = Field("", description="Secret file holding the credential")
    env: StrictStr = Field("", description="Environment variable holding the credential")


class Upstream(_Shape):
    target_credential: TargetCredential | None = Field(None, alias="targetCredential")
    identity_headers: dict[str, StrictStr] = Field(default_factory=dict, alias="identityHeaders",
                                                   description="Header name -> template such as {{sub}}")


class Proxy(_Shape):
    name: StrictStr
    providers: list[StrictStr] | None = Field(None, description="Providers trusted here (default: all)")
    default_rule_effect: Effect | None = Field(None, alias="defaultRuleEffect", description="Default: deny")
    proxy_default_rule_effect: Effect | None = Field(None, alias="proxyDefaultRuleEffect",
                                                     description="Same as defaultRuleEffect (seed spelling)")
    rules: list[Rule] = Field(default_factory=list)
    filters: list[Filter] = Field(default_factory=list)
    hosts: list[StrictStr] = Field(default_factory=list)
    public_paths: list[PublicPath] = Field(default_factory=list, alias="publicPaths")
    upstream: Upstream | None = None
    mode: Mode = "enforce"
    default: StrictBool = Field(False, description="Decides for hosts no other proxy lists")


class BackendAuth(_Shape):
    token_file: StrictStr = Field("", alias="tokenFile")
    client_id: StrictStr = Field("", alias="clientId")
    client_secret_file: StrictStr = Field("", alias="clientSecretFile")
    token_url: StrictStr = Field("", alias="tokenUrl")
    audience: StrictStr = ""


BackendTimeout = Annotated[StrictInt, Field(gt=0, le=500)]


class OpenFga(_Shape):
    name: StrictStr = "openfga"
    url: StrictStr
    store_id: StrictStr = Field(alias="storeId", description="A ULID")
    authorization_model_id: StrictStr = Field(alias="authorizationModelId", description="A ULID")
    timeout_ms: BackendTimeout = Field(150, alias="timeoutMs")
    auth: BackendAuth | None = None


class Authzen(_Shape):
    name: StrictStr = "authzen"
    url: StrictStr
    routes: list[StrictStr] = Field(default_factory=list, description="Path templates such as /todos/{todoId}")
    openapi: StrictStr | None = Field(None, description="An OpenAPI document whose paths are the routes")
    timeout_ms: BackendTimeout = Field(150, alias="timeoutMs")
    auth: BackendAuth | None = None


class Redis(_Shape):
    url: StrictStr
    timeout_ms: Annotated[StrictInt, Field(gt=0, le=200)] = Field(20, alias="timeoutMs")


class RelationshipCache(_Shape):
    allowed_ttl_seconds: Annotated[Number, Field(ge=0)] = Field(10.0, alias="allowedTtlSeconds")
    denied_ttl_seconds: Annotated[Number, Field(ge=0)] = Field(5.0, alias="deniedTtlSeconds")
    max_entries: PositiveInt = Field(100_000, alias="maxEntries")
    redis: Redis | None = None


class Relationships(_Shape):
    openfga: list[OpenFga] = Field(default_factory=list)
    authzen: list[Authzen] = Field(default_factory=list)
    cache: RelationshipCache | None = None


class Tls(_Shape):
    cert_file: StrictStr = Field("", alias="certFile")
    key_file: StrictStr = Field("", alias="keyFile")
    client_ca_file: StrictStr = Field("", alias="clientCaFile", description="Require client certificates (mTLS)")


class TokenCache(_Shape):
    size: Annotated[StrictInt, Field(ge=0)] = Field(10_000, description="Verified tokens kept; 0 turns it off")
    ttl_seconds: PositiveInt = Field(60, alias="ttlSeconds")


class Shadow(_Shape):
    file: StrictStr = Field(description="The candidate policy, evaluated beside this one on live traffic; it never "
                                        "decides. Relative to this file's directory")
    response_sample_rate: Annotated[Number, Field(ge=0, le=1)] = Field(
        0.1, alias="responseSampleRate", description="Share of filtered responses also filtered by the candidate")


class Server(_Shape):
    grpc_address: StrictStr = Field("127.0.0.1:9001", alias="grpcAddress")
    http_address: StrictStr = Field("", alias="httpAddress",
                                    description="Address of the HTTP ext_authz listener (Envoy's http_service); "
                                                "off when empty")
    metrics_address: StrictStr = Field("", alias="metricsAddress")
    admin_address: StrictStr = Field("", alias="adminAddress")
    workers: PositiveInt = Field(1, description="Sidecar processes sharing the ports (SO_REUSEPORT)")
    tls: Tls | None = None
    token_cache: TokenCache | None = Field(None, alias="tokenCache")
    max_body_bytes: PositiveInt = Field(1 << 20, alias="maxBodyBytes", description="Largest body a filter buffers")
    drain_seconds: Annotated[Number, Field(ge=0)] = Field(5.0, alias="drainSeconds",
                                                          description="Keep serving this long after SIGTERM")
    shadow: Shadow | None = None


class PolicyDocument(_Shape):
    """An extauthz policy: identity providers, proxies with rules and filters, relationship backends."""

    model_config = ConfigDict(extra="forbid", frozen=True, title="extauthz policy", field_title_generator=_title)

    providers: list[Provider] = Field(default_factory=list)
    proxies: list[Proxy] = Field(default_factory=list)
    relationships: Relationships | None = None
    server: Server | None = None


def json_schema() -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) editors use to check and complete policy files."""
    schema = PolicyDocument.model_json_schema(by_alias=True, mode="validation")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": SCHEMA_ID, **schema}


# --- errors in the project's words, at their lines ---------------------------------------------


def shape_issues(document: object, file: str) -> list[Issue]:
    """Every shape mistake in the document, each with its file, line and field path."""
    try:
        PolicyDocument.model_validate(document)
    except ValidationError as exc:
        return [_issue(error, document, file) for error in exc.errors(include_url=False)]
    return []


def field_path(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _issue(error: Any, document: object, file: str) -> Issue:
    loc: tuple[int | str, ...] = tuple(part for part in error["loc"] if not _is_union_tag(part))
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    line = _line(document, loc, keyed=kind == "extra_forbidden")
    if kind == "extra_forbidden":
        allowed = _allowed_at(loc[:-1])
        hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.75)
        message = "unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else "") \
            + f"; allowed: {', '.join(allowed)}"
    elif kind == "missing":
        message = "required field is missing"
    elif kind == "literal_error":
        message = f"must be one of {ctx.get('expected', '').replace(' or ', ', ').replace(chr(39), '')}, " \
                  f"found {describe(value)}"
    elif kind in ("greater_than_equal", "greater_than", "less_than_equal", "less_than"):
        bound = ctx.get("ge", ctx.get("gt", ctx.get("le", ctx.get("lt"))))
        words = {"greater_than_equal": f"at least {bound}", "greater_than": f"greater than {bound}",
                 "less_than_equal": f"at most {bound}", "less_than": f"less than {bound}"}[kind]
        if kind == "greater_than_equal" and bound == 0:
            words = "zero or more"
        message = f"must be {words}, found {value!r}"
    else:
        message = f"must be {_EXPECTED.get(kind, 'of another type')}, found {describe(value)}"
    return Issue(file, line, field_path(loc), message)


_EXPECTED = {
    "string_type": "a string", "int_type": "an integer", "float_type": "a number", "bool_type": "true or false",
    "dict_type": "an object", "model_type": "an object", "model_attributes_type": "an object",
    "list_type": "a list", "int_from_float": "an integer",
}


def describe(value: object) -> str:
    """How a found value is named in messages: ``a string ('5')``, ``an object``, ``nothing``."""
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return f"true or false ({value!r})"
    for kind, name in ((str, "a string"), (int, "an integer"), (float, "a number")):
        if type(value) is kind:
            return f"{name} ({value!r})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _is_union_tag(part: int | str) -> bool:
    """pydantic names the branch of a union in the location (``int``, ``float``): not a field."""
    return isinstance(part, str) and (part in ("int", "float", "str", "bool") or part.startswith(("constrained-",
                                                                                                     "function-")))


def _line(document: object, loc: tuple[int | str, ...], keyed: bool) -> int:
    """The line of the value at ``loc`` in the line-aware document (its key's line for an unknown field)."""
    node, line = document, getattr(document, "line", 0) or 1
    for part in loc:
        lines = getattr(node, "lines", None)
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            line = lines[part] if lines and part < len(lines) else line
            node = node[part]
        elif isinstance(part, str) and isinstance(node, dict) and part in node:
            line = lines.get(part, line) if isinstance(lines, dict) else line
            node = node[part]
        else:
            break
    del keyed
    return int(line)


def _allowed_at(loc: tuple[int | str, ...]) -> list[str]:
    """The field names (as written in files) of the object at ``loc``."""
    model: Any = PolicyDocument
    for part in loc:
        if isinstance(part, int) or model is None:
            continue
        field = next((f for n, f in model.model_fields.items() if (f.alias or n) == part), None)
        model = _model_of(field.annotation) if field is not None else None
    if model is None:
        return []
    return sorted(f.alias or n for n, f in model.model_fields.items())


def _model_of(annotation: Any) -> Any:
    """The model inside ``X``, ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def shape_issues_main() -> int:
    """The shape pass as a child process of the server (see :func:`extauthz.policy.loader.parse_policy`).

    Reads the policy's bytes on stdin, the file name as ``sys.argv[1]``; prints
    the issues as a JSON list of ``[line, field, message]``. The server runs
    this pass in a child so pydantic (about 10 MB once imported and the models
    built) never lives in the serving process, whose memory is held for days.
    """
    import json
    import sys

    from extauthz.policy.source import read_document

    file = sys.argv[1]
    document = read_document(sys.stdin.buffer.read(), file)
    issues = shape_issues(document, file)
    json.dump([[i.line, i.field, i.message] for i in issues], sys.stdout)
    return 0
