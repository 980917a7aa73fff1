"""Load a policy file (YAML or JSON) into immutable :class:`Policy` objects.

The loader is strict on purpose: unknown fields, duplicate keys, bad regexes,
unreadable secrets and dangling references are all errors, reported together
and each with ``file:line: field: message``. A policy either loads whole or not
at all, so a broken edit can never half-replace the running one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from extauthz.core.normalize import normalize_host
from extauthz.policy.errors import Issue, PolicyError
from extauthz.policy.model import (
    AuthzenBackend,
    AuthzenCondition,
    BackendAuth,
    Consistency,
    Effect,
    FgaCondition,
    Filter,
    FilterEffect,
    FilterOperation,
    IdentityHeader,
    Mode,
    OpenFgaBackend,
    PathCondition,
    Policy,
    Presence,
    Provider,
    Proxy,
    PublicPath,
    RelationshipCacheSettings,
    RouteTemplate,
    Rule,
    ServerSettings,
    ShadowSettings,
    TargetCredential,
    TlsSettings,
    TokenCondition,
    TokenSource,
    TupleTemplate,
    Upstream,
    Variable,
    VariableSource,
    freeze,
)
from extauthz.policy.patterns import Pattern, PatternError, Template
from extauthz.policy.source import LDict, LList, read_document

ASYMMETRIC_ALGORITHMS = frozenset(
    {"RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"}
)
HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
HTTP_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
# Always available in templates and patterns without a declaration.
DEFAULT_TOKEN_SOURCES = (TokenSource(header="authorization", prefix="Bearer "),)
BUILTIN_VARIABLES = ("sub", "method", "host", "path")

T = TypeVar("T")


# --- field reading ---------------------------------------------------------


class _Abort(Exception):
    """Stops parsing one object after an error was recorded for it."""


class _Ctx:
    def __init__(self, file: str, base_dir: Path) -> None:
        self.file = file
        self.base_dir = base_dir
        self.issues: list[Issue] = []

    def error(self, line: int, field: str, message: str) -> None:
        self.issues.append(Issue(self.file, line, field, message))

    def resolve_path(self, value: str) -> Path:
        path = Path(value)
        return path if path.is_absolute() else self.base_dir / path


_TYPE_NAMES: dict[type, str] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    LDict: "an object",
    LList: "a list",
}


class _Obj:
    """One mapping of the policy file: typed access, and unknown fields reported."""

    def __init__(self, ctx: _Ctx, value: object, path: str, line: int, allowed: set[str]) -> None:
        self.ctx = ctx
        self.path = path
        self.line = line
        if not isinstance(value, LDict):
            ctx.error(line, path, f"must be an object, found {_describe(value)}")
            raise _Abort
        self.data = value
        for key in value:
            if key not in allowed:
                hint = _closest(key, allowed)
                ctx.error(
                    value.lines[key],
                    self.sub(key),
                    "unknown field" + (f" (did you mean {hint!r}?)" if hint else "")
                    + f"; allowed: {', '.join(sorted(allowed))}",
                )

    def sub(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def line_of(self, key: str) -> int:
        return self.data.lines.get(key, self.line)

    def has(self, key: str) -> bool:
        return key in self.data

    def error(self, key: str, message: str) -> None:
        self.ctx.error(self.line_of(key), self.sub(key), message)

    def get(self, key: str, kind: type[T], default: T | None = None, required: bool = False) -> T:
        if key not in self.data:
            if required or default is None:
                self.ctx.error(self.line, self.sub(key), "required field is missing")
                raise _Abort
            return default
        value = self.data[key]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            self.error(key, f"must be {_TYPE_NAMES.get(kind, kind.__name__)}, found {_describe(value)}")
            raise _Abort
        return value

    def optional(self, key: str, kind: type[T]) -> T | None:
        if key not in self.data or self.data[key] is None:
            return None
        return self.get(key, kind)

    def obj(self, key: str, allowed: set[str]) -> _Obj | None:
        if key not in self.data:
            return None
        return _Obj(self.ctx, self.data[key], self.sub(key), self.line_of(key), allowed)

    def items(self, key: str) -> Iterator[tuple[str, int, object]]:
        """(path, line, value) of each element of a list field."""
        values = self.get(key, LList, LList())
        lines = getattr(values, "lines", [])
        for i, value in enumerate(values):
            yield f"{self.sub(key)}[{i}]", (lines[i] if i < len(lines) else self.line), value

    def enum(self, key: str, kind: type[T], default: T | None = None) -> T:
        raw = self.get(key, str, None if default is None else str(default))
        try:
            return kind(raw)  # type: ignore[call-arg]
        except ValueError:
            choices = ", ".join(m.value for m in kind)  # type: ignore[attr-defined]
            self.error(key, f"must be one of {choices}, found {raw!r}")
            raise _Abort from None

    def pattern(self, key: str, variables: set[str] | None) -> Pattern:
        raw = self.get(key, str, required=True)
        return _pattern(self.ctx, raw, self.sub(key), self.line_of(key), variables)

    def methods(self, key: str) -> frozenset[str] | None:
        if key not in self.data:
            return None
        methods = set()
        for path, line, value in self.items(key):
            if not isinstance(value, str) or value.upper() not in HTTP_METHODS:
                self.ctx.error(line, path, f"must be an HTTP method, found {value!r}")
                continue
            methods.add(value.upper())
        return frozenset(methods)

    def positive(self, key: str, kind: type[T], default: T) -> T:
        value = self.get(key, kind, default)
        if value <= 0:  # type: ignore[operator]
            self.error(key, f"must be greater than zero, found {value}")
        return value


def _describe(value: object) -> str:
    if value is None:
        return "nothing"
    for kind, name in _TYPE_NAMES.items():
        if type(value) is kind:
            return f"{name} ({value!r})" if kind in (str, int, float, bool) else name
    return repr(value)


def _closest(key: str, allowed: set[str]) -> str | None:
    import difflib

    matches = difflib.get_close_matches(key, sorted(allowed), n=1, cutoff=0.75)
    return matches[0] if matches else None


def _pattern(ctx: _Ctx, raw: str, path: str, line: int, variables: set[str] | None) -> Pattern:
    try:
        pattern = Pattern.parse(raw)
    except PatternError as exc:
        ctx.error(line, path, str(exc) + " (RE2 syntax: no backreferences or lookaround)")
        raise _Abort from None
    _check_variables(ctx, pattern.variables, path, line, variables)
    return pattern


def _template(ctx: _Ctx, raw: str, path: str, line: int, variables: set[str] | None) -> Template:
    template = Template.parse(raw)
    _check_variables(ctx, template.variables, path, line, variables)
    return template


def _check_variables(
    ctx: _Ctx, used: tuple[str, ...], path: str, line: int, declared: set[str] | None
) -> None:
    if declared is None:
        return
    for name in used:
        if name not in declared:
            ctx.error(
                line,
                path,
                f"uses {{{{{name}}}}} but no variable {name!r} is declared "
                f"(declared: {', '.join(sorted(declared)) or 'none'})",
            )


def _typed(ctx: _Ctx, obj: _Obj, key: str, kind: type[T]) -> list[T]:
    """The elements of a list field that have the right type; the others are reported."""
    out: list[T] = []
    for path, line, value in obj.items(key):
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            out.append(value)
        else:
            ctx.error(line, path, f"must be {_TYPE_NAMES.get(kind, kind.__name__)}, found {_describe(value)}")
    return out


def _each(ctx: _Ctx, obj: _Obj, key: str, parse: Callable[[str, int, object], T]) -> list[T]:
    """Parse every element of a list field, collecting errors instead of stopping."""
    out: list[T] = []
    for path, line, value in obj.items(key):
        try:
            out.append(parse(path, line, value))
        except _Abort:
            continue
    return out


# --- sections --------------------------------------------------------------


def _variables(ctx: _Ctx, obj: _Obj) -> tuple[Variable, ...]:
    def parse(path: str, line: int, value: object) -> Variable:
        v = _Obj(ctx, value, path, line, {"name", "source", "key", "index"})
        name = v.get("name", str, required=True)
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.\-]*", name):
            v.error("name", f"must be a plain identifier, found {name!r}")
        source = v.enum("source", VariableSource)
        key = v.get("key", str, "")
        index = 0
        if source in (VariableSource.JWT_CLAIM, VariableSource.HEADER, VariableSource.QUERY) and not key:
            v.error("key", f"is required for source {source.value}")
        if source is VariableSource.PATH_SEGMENT:
            if "index" in v.data:
                index = v.get("index", int)
            elif key.lstrip("-").isdigit():
                index = int(key)
            else:
                v.error("index", "is required for source pathSegment (0-based; negative counts from the end)")
        if source is VariableSource.HEADER:
            key = key.lower()
        return Variable(name, source, key, index)

    variables = _each(ctx, obj, "variables", parse)
    seen: set[str] = set()
    for var in variables:
        if var.name in seen:
            obj.error("variables", f"variable {var.name!r} is declared twice")
        seen.add(var.name)
    return tuple(variables)


def _presence(obj: _Obj) -> Presence:
    return obj.enum("presence", Presence, Presence.MUST_EXIST)


def _rule(ctx: _Ctx, path: str, line: int, value: object, index: int, policy: _PolicyRefs) -> Rule:
    r = _Obj(
        ctx,
        value,
        path,
        line,
        {"effect", "methods", "variables", "path", "token", "priority", "notes", "fga", "authzen"},
    )
    effect = r.enum("effect", Effect, None)
    variables = _variables(ctx, r)
    names = {v.name for v in variables} | set(BUILTIN_VARIABLES)
    path_condition = None
    p = r.obj("path", {"path", "presence"})
    if p is not None:
        inner = p.obj("path", {"pattern"})
        if inner is None:
            p.error("path", "required field is missing (write path: {path: {pattern: ...}})")
            raise _Abort
        path_condition = PathCondition(inner.pattern("pattern", names), _presence(p))

    def token(tpath: str, tline: int, tvalue: object) -> TokenCondition:
        t = _Obj(ctx, tvalue, tpath, tline, {"claim", "value", "presence"})
        claim = t.obj("claim", {"pattern"})
        if claim is None:
            t.error("claim", "required field is missing")
            raise _Abort
        value_obj = t.obj("value", {"pattern"})
        return TokenCondition(
            claim.pattern("pattern", names),
            value_obj.pattern("pattern", names) if value_obj else None,
            _presence(t),
        )

    tokens = tuple(_each(ctx, r, "token", token))
    fga = None
    f = r.obj(
        "fga",
        {"backend", "user", "relation", "object", "contextualTuples", "context", "consistency", "presence"},
    )
    if f is not None:
        backend = policy.backend_name(f, "openfga")

        def tmpl(o: _Obj, key: str) -> Template:
            return _template(ctx, o.get(key, str, required=True), o.sub(key), o.line_of(key), names)

        def tuple_template(tp: str, tl: int, tv: object) -> TupleTemplate:
            t = _Obj(ctx, tv, tp, tl, {"user", "relation", "object", "condition"})
            cond = t.obj("condition", {"name", "context"})
            condition = None
            if cond is not None:
                condition = {"name": cond.get("name", str, required=True)}
                if cond.has("context"):
                    condition["context"] = _context(ctx, cond, "context", names)
            return TupleTemplate(
                tmpl(t, "user"), tmpl(t, "relation"), tmpl(t, "object"),
                freeze(condition) if condition is not None else None,
            )

        fga = FgaCondition(
            user=tmpl(f, "user"),
            relation=tmpl(f, "relation"),
            obj=tmpl(f, "object"),
            backend=backend,
            contextual_tuples=tuple(_each(ctx, f, "contextualTuples", tuple_template)),
            context=_context(ctx, f, "context", names),
            consistency=f.enum("consistency", Consistency, Consistency.UNSPECIFIED),
            presence=_presence(f),
        )
    authzen = None
    a = r.obj("authzen", {"backend", "presence"})
    if a is not None:
        authzen = AuthzenCondition(policy.backend_name(a, "authzen"), _presence(a))
    if fga is not None and authzen is not None:
        r.error("authzen", "a rule carries at most one relationship condition (fga or authzen)")
    return Rule(
        index=index,
        effect=effect,
        methods=r.methods("methods"),
        variables=variables,
        path=path_condition,
        token=tokens,
        fga=fga,
        authzen=authzen,
        priority=r.get("priority", int, 100),
        notes=r.get("notes", str, ""),
    )


def _context(ctx: _Ctx, obj: _Obj, key: str, names: set[str]) -> Any:
    """A condition ``context`` object, frozen; ``{{var}}`` in its strings must name declared variables."""
    value = obj.get(key, LDict, LDict())

    def check(item: object, path: str) -> None:
        if isinstance(item, str):
            _check_variables(ctx, Template.parse(item).variables, path, obj.line_of(key), names)
        elif isinstance(item, dict):
            for k, v in item.items():
                check(v, f"{path}.{k}")
        elif isinstance(item, list):
            for i, v in enumerate(item):
                check(v, f"{path}[{i}]")

    check(value, obj.sub(key))
    return freeze(value)


def _filter(ctx: _Ctx, path: str, line: int, value: object, index: int) -> Filter:
    f = _Obj(
        ctx,
        value,
        path,
        line,
        {"variables", "defaultFilterOperation", "operations", "notes", "methods", "path", "statuses"},
    )
    variables = _variables(ctx, f)
    names = {v.name for v in variables} | set(BUILTIN_VARIABLES)

    def operation(opath: str, oline: int, ovalue: object, ) -> FilterOperation:
        o = _Obj(
            ctx,
            ovalue,
            opath,
            oline,
            {"effect", "jsonPath", "matchField", "matchValue", "priority", "notes"},
        )

        def pat(key: str) -> Pattern | None:
            inner = o.obj(key, {"pattern"})
            return inner.pattern("pattern", names) if inner is not None else None

        json_path = pat("jsonPath")
        if json_path is None:
            o.error("jsonPath", "required field is missing")
            raise _Abort
        match_field, match_value = pat("matchField"), pat("matchValue")
        if (match_field is None) != (match_value is None):
            o.error(
                "matchValue" if match_field else "matchField",
                "matchField and matchValue go together (a row operation needs both)",
            )
        return FilterOperation(
            index=0,
            effect=o.enum("effect", FilterEffect, None),
            json_path=json_path,
            match_field=match_field,
            match_value=match_value,
            priority=o.get("priority", int, 100),
            notes=o.get("notes", str, ""),
        )

    operations = [
        FilterOperation(
            index=i, effect=op.effect, json_path=op.json_path, match_field=op.match_field,
            match_value=op.match_value, priority=op.priority, notes=op.notes,
        )
        for i, op in enumerate(_each(ctx, f, "operations", operation))
    ]
    operations.sort(key=lambda op: (op.priority, op.index))
    statuses = frozenset(_typed(ctx, f, "statuses", int)) if f.has("statuses") else None
    path_pattern = None
    po = f.obj("path", {"pattern"})
    if po is not None:
        path_pattern = po.pattern("pattern", names)
    return Filter(
        index=index,
        default_operation=f.enum("defaultFilterOperation", FilterEffect, FilterEffect.RETAIN),
        operations=tuple(operations),
        variables=variables,
        methods=f.methods("methods"),
        path=path_pattern,
        statuses=statuses,
        notes=f.get("notes", str, ""),
    )


def _provider(ctx: _Ctx, path: str, line: int, value: object) -> Provider:
    p = _Obj(
        ctx,
        value,
        path,
        line,
        {
            "name", "issuer", "audiences", "audience", "jwksUri", "discovery", "jwksFile", "jwks",
            "algorithms", "hmacSecretFile", "clockSkewSeconds", "requireExp", "maxTokenAgeSeconds",
            "from", "forwardToken", "jwksRefreshSeconds", "jwksTimeoutSeconds",
        },
    )
    name = p.get("name", str, required=True)
    issuer = p.get("issuer", str, required=True)
    if p.has("audience") and p.has("audiences"):
        p.error("audience", "give either audience or audiences, not both")
    if p.has("audience"):
        audiences: tuple[str, ...] = (p.get("audience", str),)
    else:
        audiences = tuple(_typed(ctx, p, "audiences", str))
    if not audiences:
        p.error("audiences", "at least one audience is required: a token for another API must not pass")
    algorithms = (
        tuple(_typed(ctx, p, "algorithms", str)) if p.has("algorithms") else ("RS256", "ES256", "PS256", "EdDSA")
    )
    for alg in algorithms:
        if alg not in ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS:
            p.error("algorithms", f"unsupported algorithm {alg!r} ('none' is never allowed); "
                    f"choose from {', '.join(sorted(ASYMMETRIC_ALGORITHMS | HMAC_ALGORITHMS))}")
    hmac = [a for a in algorithms if a in HMAC_ALGORITHMS]
    key_fields = [k for k in ("jwksUri", "discovery", "jwksFile", "jwks", "hmacSecretFile") if p.has(k)]
    if p.has("discovery") and not p.get("discovery", bool):
        key_fields.remove("discovery")
    hmac_secret = b""
    if hmac:
        if len(hmac) != len(algorithms):
            p.error("algorithms", "HS* algorithms cannot be mixed with asymmetric ones in one provider "
                    "(a public key would become an HMAC secret)")
        if key_fields != ["hmacSecretFile"]:
            p.error("hmacSecretFile", "HS* algorithms need hmacSecretFile and no other key source")
        else:
            secret_path = ctx.resolve_path(p.get("hmacSecretFile", str))
            try:
                hmac_secret = secret_path.read_bytes().strip()
            except OSError as exc:
                p.error("hmacSecretFile", f"cannot read {secret_path}: {exc.strerror}")
            if hmac_secret and len(hmac_secret) < 32:
                p.error("hmacSecretFile", "HMAC secrets must be at least 32 bytes")
    elif len(key_fields) != 1:
        p.error(key_fields[1] if len(key_fields) > 1 else "jwksUri",
                "exactly one key source is required: jwksUri, discovery: true, jwksFile or jwks"
                f" (found {', '.join(key_fields) or 'none'})")
    jwks_file = p.get("jwksFile", str, "")
    if jwks_file:
        jwks_file = str(ctx.resolve_path(jwks_file))
    jwks_inline = p.optional("jwks", LDict)
    if jwks_inline is not None and not isinstance(jwks_inline.get("keys"), list):
        p.error("jwks", "must be a JWKS object with a 'keys' list")

    def source(spath: str, sline: int, svalue: object) -> TokenSource:
        s = _Obj(ctx, svalue, spath, sline, {"header", "prefix", "cookie", "query"})
        kinds = [k for k in ("header", "cookie", "query") if s.has(k)]
        if len(kinds) != 1:
            s.error("header", "give exactly one of header, cookie or query")
            raise _Abort
        if s.has("prefix") and not s.has("header"):
            s.error("prefix", "prefix applies only to header sources")
        return TokenSource(
            header=s.get("header", str, "").lower(),
            prefix=s.get("prefix", str, ""),
            cookie=s.get("cookie", str, ""),
            query=s.get("query", str, ""),
        )

    sources = tuple(_each(ctx, p, "from", source)) if p.has("from") else DEFAULT_TOKEN_SOURCES
    return Provider(
        name=name,
        issuer=issuer,
        audiences=audiences,
        algorithms=algorithms,
        jwks_uri=p.get("jwksUri", str, ""),
        discovery=p.get("discovery", bool, False),
        jwks_file=jwks_file,
        jwks_inline=jwks_inline,
        hmac_secret_file=p.get("hmacSecretFile", str, ""),
        hmac_secret=hmac_secret,
        clock_skew_seconds=p.get("clockSkewSeconds", int, 30),
        require_exp=p.get("requireExp", bool, True),
        max_token_age_seconds=p.optional("maxTokenAgeSeconds", int),
        sources=sources,
        forward_token=p.get("forwardToken", bool, False),
        jwks_refresh_seconds=p.positive("jwksRefreshSeconds", int, 60),
        jwks_timeout_seconds=p.positive("jwksTimeoutSeconds", float, 5.0),
    )


def _upstream(ctx: _Ctx, u: _Obj) -> Upstream:
    credential = None
    c = u.obj("targetCredential", {"header", "prefix", "file", "env"})
    if c is not None:
        header = c.get("header", str, "authorization").lower()
        file, env = c.get("file", str, ""), c.get("env", str, "")
        value = ""
        if bool(file) == bool(env):
            c.error("file", "give exactly one of file or env (secrets are never inlined in the policy)")
        elif file:
            secret = ctx.resolve_path(file)
            try:
                value = secret.read_text().strip()
            except OSError as exc:
                c.error("file", f"cannot read {secret}: {exc.strerror}")
        else:
            value = os.environ.get(env, "")
            if not value:
                c.error("env", f"environment variable {env} is not set or empty")
        credential = TargetCredential(header, c.get("prefix", str, ""), file, env, value)
    headers: list[IdentityHeader] = []
    h = u.get("identityHeaders", LDict, LDict())
    for name, template in h.items():
        line = h.lines.get(name, u.line)
        field = u.sub(f"identityHeaders.{name}")
        if not isinstance(template, str):
            ctx.error(line, field, "must be a string template such as '{{sub}}'")
            continue
        if not re.fullmatch(r"[A-Za-z0-9\-_]+", name) or name.lower() in {"host", ":authority", "content-length"}:
            ctx.error(line, field, f"{name!r} cannot be an identity header")
            continue
        headers.append(IdentityHeader(name.lower(), Template.parse(template)))
    return Upstream(credential, tuple(headers))


class _PolicyRefs:
    """Names defined elsewhere in the file, to check references against."""

    def __init__(self, openfga: set[str], authzen: set[str]) -> None:
        self.names = {"openfga": openfga, "authzen": authzen}

    def backend_name(self, obj: _Obj, kind: str) -> str:
        names = self.names[kind]
        if obj.has("backend"):
            name = obj.get("backend", str)
            if name not in names:
                obj.error("backend", f"no {kind} backend named {name!r} under relationships.{kind}")
            return name
        if len(names) != 1:
            obj.ctx.error(obj.line, obj.sub("backend"),
                          f"name the {kind} backend ({len(names)} are defined under relationships.{kind})")
            return ""
        return next(iter(names))


def _proxy(ctx: _Ctx, path: str, line: int, value: object, providers: set[str], refs: _PolicyRefs) -> Proxy:
    p = _Obj(
        ctx,
        value,
        path,
        line,
        {
            "name", "providers", "defaultRuleEffect", "proxyDefaultRuleEffect", "rules", "filters",
            "hosts", "publicPaths", "upstream", "mode", "default",
        },
    )
    name = p.get("name", str, required=True)
    trusted = tuple(_typed(ctx, p, "providers", str)) if p.has("providers") else tuple(sorted(providers))
    for provider in trusted:
        if provider not in providers:
            p.error("providers", f"no provider named {provider!r} (defined: {', '.join(sorted(providers)) or 'none'})")
    if p.has("defaultRuleEffect") and p.has("proxyDefaultRuleEffect"):
        p.error("proxyDefaultRuleEffect", "give defaultRuleEffect or proxyDefaultRuleEffect, not both")
    effect_key = "proxyDefaultRuleEffect" if p.has("proxyDefaultRuleEffect") else "defaultRuleEffect"
    default_effect = p.enum(effect_key, Effect, Effect.DENY)
    rules: list[Rule] = []
    for i, (rule_path, rule_line, rule_value) in enumerate(p.items("rules")):
        try:
            rules.append(_rule(ctx, rule_path, rule_line, rule_value, i, refs))
        except _Abort:
            continue
    rules.sort(key=lambda r: (r.priority, r.index))
    filters: list[Filter] = []
    for i, (filter_path, filter_line, filter_value) in enumerate(p.items("filters")):
        try:
            filters.append(_filter(ctx, filter_path, filter_line, filter_value, i))
        except _Abort:
            continue

    def public(pp: str, pl: int, pv: object) -> PublicPath:
        o = _Obj(ctx, pv, pp, pl, {"pattern", "methods"})
        return PublicPath(o.pattern("pattern", set()), o.methods("methods"))

    upstream_obj = p.obj("upstream", {"targetCredential", "identityHeaders"})
    return Proxy(
        name=name,
        providers=trusted,
        default_effect=default_effect,
        rules=tuple(rules),
        filters=tuple(filters),
        hosts=tuple(_hosts(ctx, p)),
        public_paths=tuple(_each(ctx, p, "publicPaths", public)),
        upstream=_upstream(ctx, upstream_obj) if upstream_obj else Upstream(),
        mode=p.enum("mode", Mode, Mode.ENFORCE),
        default=p.get("default", bool, False),
    )


def _hosts(ctx: _Ctx, p: _Obj) -> list[str]:
    """Hosts in the form requests are compared in (lower case, no port, no trailing dot)."""
    hosts: list[str] = []
    for host_path, host_line, value in p.items("hosts"):
        host = normalize_host(str(value))
        if not host:
            ctx.error(host_line, host_path, f"{value!r} is not a host name (e.g. api.example.com)")
        else:
            hosts.append(host)
    return hosts


def _backend_auth(ctx: _Ctx, obj: _Obj | None) -> BackendAuth:
    if obj is None:
        return BackendAuth()
    auth = BackendAuth(
        token_file=_file(ctx, obj, "tokenFile"),
        client_id=obj.get("clientId", str, ""),
        client_secret_file=_file(ctx, obj, "clientSecretFile"),
        token_url=obj.get("tokenUrl", str, ""),
        audience=obj.get("audience", str, ""),
    )
    if auth.token_file and auth.client_id:
        obj.error("clientId", "give tokenFile (preshared key) or client credentials, not both")
    if auth.client_id and not (auth.client_secret_file and auth.token_url):
        obj.error("clientId", "client credentials need clientId, clientSecretFile and tokenUrl")
    return auth


def _file(ctx: _Ctx, obj: _Obj, key: str) -> str:
    value = obj.get(key, str, "")
    if not value:
        return ""
    path = ctx.resolve_path(value)
    if not path.is_file():
        obj.error(key, f"file {path} does not exist")
    return str(path)


_AUTH_FIELDS = {"tokenFile", "clientId", "clientSecretFile", "tokenUrl", "audience"}


def _openapi_routes(ctx: _Ctx, obj: _Obj) -> list[RouteTemplate]:
    file = obj.get("openapi", str)
    path = ctx.resolve_path(file)
    try:
        document = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        obj.error("openapi", f"cannot read OpenAPI document {path}: {exc}")
        return []
    paths = document.get("paths") if isinstance(document, dict) else None
    if not isinstance(paths, dict):
        obj.error("openapi", f"{path} has no 'paths' object")
        return []
    routes = []
    for template, item in paths.items():
        methods = frozenset(k.upper() for k in (item or {}) if k.upper() in HTTP_METHODS)
        routes.append(RouteTemplate(str(template), methods or None))
    return routes


def _relationships(
    ctx: _Ctx, root: _Obj
) -> tuple[dict[str, OpenFgaBackend], dict[str, AuthzenBackend], RelationshipCacheSettings]:
    rel = root.obj("relationships", {"openfga", "authzen", "cache"})
    if rel is None:
        return {}, {}, RelationshipCacheSettings()

    def fga(path: str, line: int, value: object) -> OpenFgaBackend:
        o = _Obj(ctx, value, path, line, {"name", "url", "storeId", "authorizationModelId", "timeoutMs", "auth"})
        return OpenFgaBackend(
            name=o.get("name", str, "openfga"),
            url=_backend_url(o, "url", ("http", "https")),
            store_id=_ulid(o, "storeId"),
            authorization_model_id=_ulid(o, "authorizationModelId"),
            timeout_ms=_backend_timeout(o),
            auth=_backend_auth(ctx, o.obj("auth", _AUTH_FIELDS)),
        )

    def authzen(path: str, line: int, value: object) -> AuthzenBackend:
        o = _Obj(ctx, value, path, line, {"name", "url", "routes", "openapi", "timeoutMs", "auth"})
        routes: list[RouteTemplate] = []
        if o.has("openapi"):
            routes.extend(_openapi_routes(ctx, o))
        for rp, rl, rv in o.items("routes"):
            if not isinstance(rv, str) or not rv.startswith("/"):
                ctx.error(rl, rp, "must be a path template such as /todos/{todoId}")
                continue
            routes.append(RouteTemplate(rv))
        if not routes:
            o.error("routes", "an AuthZEN backend needs route templates (routes or openapi)")
        return AuthzenBackend(
            name=o.get("name", str, "authzen"),
            url=_backend_url(o, "url", ("http", "https")),
            routes=tuple(routes),
            timeout_ms=_backend_timeout(o),
            auth=_backend_auth(ctx, o.obj("auth", _AUTH_FIELDS)),
        )

    fgas = _each(ctx, rel, "openfga", fga)
    authzens = _each(ctx, rel, "authzen", authzen)
    for kind, backends in (("openfga", fgas), ("authzen", authzens)):
        names = [b.name for b in backends]
        for name in sorted({n for n in names if names.count(n) > 1}):
            rel.error(kind, f"backend name {name!r} is used twice (name each backend)")
    cache = RelationshipCacheSettings()
    c = rel.obj("cache", {"allowedTtlSeconds", "deniedTtlSeconds", "maxEntries", "redis"})
    if c is not None:
        redis = c.obj("redis", {"url", "timeoutMs"})
        redis_timeout = redis.positive("timeoutMs", int, 20) if redis else 20
        if redis is not None and redis_timeout > MAX_REDIS_TIMEOUT_MS:
            redis.error("timeoutMs", f"must be at most {MAX_REDIS_TIMEOUT_MS} (a shared cache lookup that is "
                        f"slower than the backend defeats the cache), found {redis_timeout}")
        cache = RelationshipCacheSettings(
            allowed_ttl_seconds=_ttl(c, "allowedTtlSeconds", 10.0),
            denied_ttl_seconds=_ttl(c, "deniedTtlSeconds", 5.0),
            max_entries=c.positive("maxEntries", int, 100_000),
            redis_url=_backend_url(redis, "url", ("redis", "rediss", "unix")) if redis else "",
            redis_timeout_ms=redis_timeout,
        )
    return ({b.name: b for b in fgas}, {b.name: b for b in authzens}, cache)


# Envoy's ext_authz timeout in the shipped config is 1 s and a decision may need two
# lookup rounds (allow rules, then deny rules), so one backend's budget must fit twice.
MAX_BACKEND_TIMEOUT_MS = 500
MAX_REDIS_TIMEOUT_MS = 200
_ULID = re.compile(r"[0-9A-HJKMNP-TV-Z]{26}")


def _backend_url(o: _Obj, key: str, schemes: tuple[str, ...]) -> str:
    raw = o.get(key, str, required=True)
    parts = urlsplit(raw)
    if parts.scheme not in schemes or not (parts.netloc or parts.scheme == "unix") or parts.fragment:
        o.error(key, f"must be an absolute {'/'.join(schemes)} URL, found {raw!r}")
    elif parts.scheme in ("http", "https") and parts.query:
        o.error(key, f"must not carry a query string, found {raw!r}")
    return raw.rstrip("/")


def _ulid(o: _Obj, key: str) -> str:
    """OpenFGA store and model ids are ULIDs; a typo is caught at load, not as a 400 per request."""
    value = o.get(key, str, required=True)
    if not _ULID.fullmatch(value):
        o.error(key, f"must be a ULID (26 characters, Crockford base32, upper case), found {value!r}")
    return value


def _backend_timeout(o: _Obj) -> int:
    value = o.positive("timeoutMs", int, 150)
    if value > MAX_BACKEND_TIMEOUT_MS:
        o.error("timeoutMs", f"must be at most {MAX_BACKEND_TIMEOUT_MS}: a lookup has to finish well inside "
                "Envoy's ext_authz timeout (1 s), twice over (allow rules, then deny rules), "
                f"found {value}")
    return value


def _ttl(o: _Obj, key: str, default: float) -> float:
    value = o.get(key, float, default)
    if value < 0:
        o.error(key, f"must be zero (do not cache) or more, found {value}")
    return value


def _server(ctx: _Ctx, root: _Obj) -> ServerSettings:
    s = root.obj(
        "server",
        {"grpcAddress", "httpAddress", "metricsAddress", "adminAddress", "workers", "tls", "tokenCache",
         "maxBodyBytes", "drainSeconds", "shadow"},
    )
    if s is None:
        return ServerSettings()
    tls = None
    t = s.obj("tls", {"certFile", "keyFile", "clientCaFile"})
    if t is not None:
        tls = TlsSettings(_file(ctx, t, "certFile"), _file(ctx, t, "keyFile"), _file(ctx, t, "clientCaFile"))
        if not tls.cert_file or not tls.key_file:
            t.error("certFile", "TLS needs certFile and keyFile")
    cache = s.obj("tokenCache", {"size", "ttlSeconds"})
    shadow = None
    sh = s.obj("shadow", {"file", "responseSampleRate"})
    if sh is not None:
        # Not required to exist: a candidate that is missing or broken is reported and retried, never fatal.
        shadow = ShadowSettings(str(ctx.resolve_path(sh.get("file", str, required=True))),
                                sh.get("responseSampleRate", float, 0.1))
    defaults = ServerSettings()
    return ServerSettings(
        grpc_address=s.get("grpcAddress", str, defaults.grpc_address),
        http_address=s.get("httpAddress", str, ""),
        metrics_address=s.get("metricsAddress", str, ""),
        workers=s.positive("workers", int, defaults.workers),
        admin_address=s.get("adminAddress", str, ""),
        tls=tls,
        token_cache_size=cache.get("size", int, defaults.token_cache_size) if cache else defaults.token_cache_size,
        token_cache_ttl_seconds=(
            cache.positive("ttlSeconds", int, defaults.token_cache_ttl_seconds) if cache
            else defaults.token_cache_ttl_seconds
        ),
        max_body_bytes=s.positive("maxBodyBytes", int, defaults.max_body_bytes),
        drain_seconds=s.get("drainSeconds", float, defaults.drain_seconds),
        shadow=shadow,
    )


# --- entry points ----------------------------------------------------------


def load_policy(path: str | os.PathLike[str]) -> Policy:
    """Read, validate and compile a policy file; raises :class:`PolicyError` with every issue."""
    file = Path(path)
    try:
        text = file.read_bytes()
    except OSError as exc:
        raise PolicyError([Issue(str(file), 0, "", f"cannot read policy: {exc.strerror}")]) from None
    return parse_policy(text, str(file), policy_directory(file))


def policy_directory(file: Path) -> Path:
    """Where the paths a policy names are relative to: the directory the file is named in, links not followed.

    Kubernetes mounts ``policy.yaml`` as a link into a timestamped directory
    that kubelet deletes on the next update; a path resolved through the link
    would name a file about to vanish (a shadow policy, a certificate).
    """
    return Path(os.path.abspath(file)).parent


def parse_policy(text: bytes | str, file: str = "<policy>", base_dir: Path | None = None, *,
                 shape_in_child: bool = False, started: ShapeCheck | None = None) -> Policy:
    """Shape first (every type, bound and unknown field in the file, from the declared model), then meaning
    (patterns, references, files); all issues of both passes are reported together, each once.

    ``shape_in_child``: the server's choice. The shape pass is pydantic's, and
    pydantic with the policy models costs a long-running process about 10 MB
    that it would hold for good after one load; the pass then runs in a short
    child process instead (:class:`ShapeCheck`), on the very same bytes, while
    this process runs the second pass. ``started``: a child already at work on
    this file (:func:`start_shape_check`), used if it read these very bytes.
    """
    raw = text.encode() if isinstance(text, str) else text
    ctx = _Ctx(file, base_dir or Path.cwd())
    document = read_document(raw, file)
    check = None
    if started is not None and started.raw == raw and started.file == file:
        check = started
    elif started is not None:
        started.close()
    if check is None and shape_in_child:
        check = ShapeCheck(raw, file)
    try:
        shape = _shape_issues(document, file) if check is None else []
        try:
            policy = _parse_root(ctx, document)
        except _Abort:
            policy = None
        if check is not None:
            shape = check.issues(document)
    finally:
        if check is not None:
            check.close()
    issues = merge_issues(ctx.issues, shape)
    if issues or policy is None:
        raise PolicyError(issues or [Issue(file, 0, "", "the policy could not be read")])
    digest = hashlib.sha256(raw).hexdigest()[:16]
    return Policy(
        providers=policy.providers, proxies=policy.proxies, openfga=policy.openfga,
        authzen=policy.authzen, relationship_cache=policy.relationship_cache,
        server=policy.server, source=file, digest=digest,
    )


def _shape_issues(document: object, file: str) -> list[Issue]:
    """The shape pass in this process; pydantic is imported only here, when a policy is checked."""
    from extauthz.policy.schema import shape_issues

    return shape_issues(document, file)


class ShapeCheck:
    """The shape pass (:func:`extauthz.policy.schema.shape_issues`) in a child process, started at once.

    The child is this interpreter with this process's ``sys.path``, so it runs
    the very code that would run here, on the same bytes; it imports pydantic
    while the caller runs the second pass. Should it fail for any reason of its
    own (cannot start, killed, times out, prints nonsense), the pass runs here
    instead: a policy is never loaded with fewer checks, only with more memory.
    """

    TIMEOUT_SECONDS = 60.0

    def __init__(self, raw: bytes, file: str) -> None:
        self.raw = raw
        self.file = file
        self.process: subprocess.Popen[bytes] | None = None
        code = ("import json, sys; sys.path[:] = json.loads(sys.argv.pop(1)); "
                "from extauthz.policy.schema import shape_issues_main; sys.exit(shape_issues_main())")
        try:
            self.process = subprocess.Popen(  # this interpreter, fixed code, no shell
                [sys.executable, "-c", code, json.dumps(sys.path), file],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )
        except (OSError, ValueError, subprocess.SubprocessError):
            self.process = None

    def issues(self, document: object) -> list[Issue]:
        """The child's issues; computed here if the child did not deliver them."""
        if self.process is not None:
            try:
                out, _ = self.process.communicate(self.raw, timeout=self.TIMEOUT_SECONDS)
                if self.process.returncode == 0:
                    return [Issue(self.file, int(line), str(field), str(message))
                            for line, field, message in json.loads(out)]
            except (OSError, ValueError, TypeError, subprocess.SubprocessError):
                pass
        return _shape_issues(document, self.file)

    def close(self) -> None:
        """Never leave the child behind (the caller failed, or it timed out)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def start_shape_check(path: str | os.PathLike[str]) -> ShapeCheck | None:
    """The shape pass of a policy file, started in a child now, for a load that comes later.

    A restarted sidecar must answer again within a second or two: started
    before the server's own imports, the child's interpreter and pydantic load
    on the other core meanwhile instead of after them. None if the file cannot
    be read (the load reports that itself).
    """
    try:
        raw = Path(path).read_bytes()
    except OSError:
        return None
    return ShapeCheck(raw, str(path))


def _parse_root(ctx: _Ctx, document: object) -> Policy:
    root = _Obj(ctx, document, "", 1, {"providers", "proxies", "relationships", "server"})
    providers = {p.name: p for p in _each(ctx, root, "providers", lambda pa, li, va: _provider(ctx, pa, li, va))}
    if len(providers) != len(list(root.items("providers"))) and not ctx.issues:
        root.error("providers", "provider names must be unique")
    openfga, authzen, cache = _relationships(ctx, root)
    refs = _PolicyRefs(set(openfga), set(authzen))
    proxies = _each(ctx, root, "proxies", lambda pa, li, va: _proxy(ctx, pa, li, va, set(providers), refs))
    if not root.has("proxies") or (not proxies and not ctx.issues):
        root.error("proxies", "at least one proxy is required")
    names = [p.name for p in proxies]
    for name in {n for n in names if names.count(n) > 1}:
        root.error("proxies", f"proxy name {name!r} is used twice")
    _check_selection(ctx, root)
    return Policy(
        providers=MappingProxyType(providers),
        proxies=tuple(proxies),
        openfga=MappingProxyType(openfga),
        authzen=MappingProxyType(authzen),
        relationship_cache=cache,
        server=_server(ctx, root),
    )


def _check_selection(ctx: _Ctx, root: _Obj) -> None:
    """Refuse what would make proxy selection ambiguous: a host two proxies claim, or two defaults.

    Either would leave the proxy that decides a request to file order (a
    reordering or a merge would silently move traffic to other rules), so each
    is reported where the second claim is written.
    """
    hosts: dict[str, str] = {}
    default = ""
    for path, _, value in root.items("proxies"):
        if not isinstance(value, LDict):
            continue
        name = value.get("name")
        label = repr(name) if isinstance(name, str) else path
        lines = getattr(value, "lines", {})
        claimed = value.get("hosts")
        if isinstance(claimed, LList):
            host_lines = getattr(claimed, "lines", [])
            for i, raw in enumerate(claimed):
                host = normalize_host(str(raw)) if isinstance(raw, str) else None
                if not host:
                    continue
                other = hosts.setdefault(host, label)
                if other != label:
                    line = host_lines[i] if i < len(host_lines) else lines.get("hosts", root.line)
                    ctx.error(line, f"{path}.hosts[{i}]", f"host {host!r} is also claimed by proxy {other}: a "
                              "request to it could be decided by either (give each host to one proxy)")
        if value.get("default") is True:
            if default:
                ctx.error(lines.get("default", root.line), f"{path}.default",
                          f"only one proxy can be the default ({default} already is)")
            else:
                default = label


def load_rule(obj: Mapping[str, Any], index: int = 0) -> Rule:
    """Parse one rule object as pasted from the seeds (for the CLI and tests)."""
    import json

    refs = _PolicyRefs(set(), set())
    return _single(json.dumps({"r": obj}), lambda ctx, d: _rule(ctx, "rule", 1, d["r"], index, refs))


def load_filter(obj: Mapping[str, Any], index: int = 0) -> Filter:
    """Parse one filter object as pasted from the seeds (for the CLI and tests)."""
    import json

    return _single(json.dumps({"f": obj}), lambda ctx, d: _filter(ctx, "filter", 1, d["f"], index))


def _single(text: str, parse: Callable[[_Ctx, Any], T]) -> T:
    ctx = _Ctx("<inline>", Path.cwd())
    document = read_document(text.encode(), "<inline>")
    try:
        result = parse(ctx, document)
    except _Abort:
        result = None
    if ctx.issues or result is None:
        raise PolicyError(ctx.issues)
    return result


def merge_issues(meaning: list[Issue], shape: list[Issue]) -> list[Issue]:
    """Both passes' issues, each field reported once, in file order.

    The loader's own message wins where both speak of the same field (it knows
    the context: "did you mean", which backends exist); a shape issue inside a
    field the loader already refused as a whole is not repeated.
    """
    said = {issue.field for issue in meaning}

    def covered(field: str) -> bool:
        return any(field == f or field.startswith((f + ".", f + "[")) or f.startswith((field + ".", field + "["))
                   for f in said)

    return sorted([*meaning, *(i for i in shape if not covered(i.field))], key=lambda i: (i.line, i.field))
