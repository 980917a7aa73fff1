"""Custom resources checked against the CRDs they will meet, as strictly as the API server would.

``kubernetes-validate`` knows the built-in kinds only; a SecurityPolicy, an
EnvoyFilter or a cert-manager Certificate is checked here against the
``openAPIV3Schema`` of the version its CRD serves (tests/fixtures/crds/, pinned
releases). The rules are the API server's for structural schemas, with
``kubectl apply``'s default of strict field validation: a field the schema does not
declare is an error (the server would reject it, or, with validation off, prune it
in silence: either way the setting would not be what the file says), unless
``x-kubernetes-preserve-unknown-fields`` keeps it; ``additionalProperties`` types the
values of maps; ``x-kubernetes-int-or-string`` takes either; ``nullable``, ``enum``,
``required``, ``pattern`` (RE2, as Go's regexp), lengths, bounds, item and property
counts, ``format`` (int32/int64 ranges, byte, date-time, ipv4, ipv6) and list
uniqueness (``x-kubernetes-list-type: set|map``) are enforced; ``anyOf``, ``oneOf``,
``allOf`` and ``not`` constrain values without declaring fields, as in a structural
schema. A ``null`` where the schema does not allow one is reported too: the server
would drop it and apply the default, which is rarely what the author meant.

Not evaluated: CEL rules (``x-kubernetes-validations``). They are counted on every
node an object reaches (:attr:`Result.cel_rules_skipped`), so a test can say how
many went unchecked; the wiring tests check by hand the cross-field rules our
manifests depend on. Defaults are not applied (a missing optional field is fine).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import difflib
import ipaddress
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import re2
import yaml

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "crds"

Schema = dict[str, Any]
PathParts = tuple[str | int, ...]

_INT_RANGES = {"int32": (-(2**31), 2**31 - 1), "int64": (-(2**63), 2**63 - 1)}
# ObjectMeta fields a manifest may carry; the API server fills or refuses the rest.
_OBJECT_META = {"name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences"}
_DNS_SUBDOMAIN = re2.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_VALUE = re2.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Violation:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path or '<root>'}: {self.message}"


@dataclass
class Result:
    violations: list[Violation] = field(default_factory=list)
    cel_rules_skipped: int = 0


class CrdValidationError(AssertionError):
    """Raised by :func:`validate`: every violation of one object, one per line."""

    def __init__(self, name: str, violations: list[Violation]) -> None:
        super().__init__(f"{name}:\n" + "\n".join(f"  {v}" for v in violations))
        self.violations = violations


def _dotted(path: PathParts) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


@dataclass(frozen=True)
class Crd:
    group: str
    kind: str
    scope: str
    versions: dict[str, Schema]
    """Served versions only: name -> openAPIV3Schema."""
    source: Path


@cache
def load_crds(directory: Path = FIXTURES) -> dict[tuple[str, str], Crd]:
    """Every CustomResourceDefinition under ``directory``, by (group, kind)."""
    crds: dict[tuple[str, str], Crd] = {}
    for path in sorted(directory.rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            key = (spec["group"], spec["names"]["kind"])
            assert key not in crds, f"{key} is defined twice ({crds[key].source} and {path})"
            versions = {v["name"]: v["schema"]["openAPIV3Schema"] for v in spec["versions"] if v.get("served")}
            crds[key] = Crd(spec["group"], spec["names"]["kind"], spec["scope"], versions, path)
    return crds


def is_custom(obj: dict[str, Any], directory: Path = FIXTURES) -> bool:
    group = str(obj.get("apiVersion", "")).rpartition("/")[0]
    return (group, obj.get("kind")) in load_crds(directory)


def schema_of(obj: dict[str, Any], directory: Path = FIXTURES) -> tuple[Crd, Schema]:
    group, _, version = str(obj.get("apiVersion", "")).rpartition("/")
    crd = load_crds(directory).get((group, obj.get("kind", "")))
    if crd is None:
        raise KeyError(f"no CRD for {obj.get('apiVersion')} {obj.get('kind')} in {directory}")
    if version not in crd.versions:
        raise KeyError(f"{crd.kind}: version {version!r} is not served (served: {sorted(crd.versions)})")
    return crd, crd.versions[version]


def check(obj: dict[str, Any], directory: Path = FIXTURES) -> Result:
    """Every violation of ``obj`` against its CRD; an unknown kind or an unserved version is one too."""
    result = Result()
    try:
        crd, schema = schema_of(obj, directory)
    except KeyError as exc:
        result.violations.append(Violation("apiVersion", str(exc.args[0])))
        return result
    _Walker(result).object_root(obj, schema, crd)
    return result


def validate(obj: dict[str, Any], directory: Path = FIXTURES) -> Result:
    """:func:`check`, raising :class:`CrdValidationError` when anything is wrong."""
    result = check(obj, directory)
    if result.violations:
        name = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        raise CrdValidationError(name, result.violations)
    return result


def check_value(value: Any, schema: Schema) -> list[Violation]:
    """One value against one schema node (the validator's own tests use this on small schemas)."""
    result = Result()
    _Walker(result).value(value, schema, ())
    return result.violations


class _Walker:
    def __init__(self, result: Result) -> None:
        self.result = result

    def error(self, path: PathParts, message: str) -> None:
        self.result.violations.append(Violation(_dotted(path), message))

    # --- the object and its metadata ---------------------------------------

    def object_root(self, obj: dict[str, Any], schema: Schema, crd: Crd) -> None:
        # apiVersion, kind and metadata are the API server's own at the root, whatever the schema declares
        # (Istio's declare none of them); metadata is ObjectMeta.
        self.metadata(obj.get("metadata"), ("metadata",), namespaced=crd.scope == "Namespaced")
        own = ("apiVersion", "kind", "metadata")
        rest = {k: v for k, v in obj.items() if k not in own}
        root = {**schema, "properties": {k: v for k, v in schema.get("properties", {}).items() if k not in own}}
        self.value(rest, root, ())

    def metadata(self, meta: Any, path: PathParts, namespaced: bool) -> None:
        if not isinstance(meta, dict):
            self.error(path, "metadata must be an object")
            return
        for key in sorted(set(meta) - _OBJECT_META):
            self.error((*path, key), "unknown field (not a field of ObjectMeta a manifest may set)")
        name = meta.get("name")
        if not isinstance(name, str) or not name:
            self.error((*path, "name"), "required")
        elif len(name) > 253 or not _DNS_SUBDOMAIN.search(name):
            self.error((*path, "name"), f"{name!r} is not a DNS subdomain (lower case, digits, '-', '.')")
        if "namespace" in meta and not namespaced:
            self.error((*path, "namespace"), "set on a cluster-scoped kind")
        for key in ("labels", "annotations"):
            values = meta.get(key, {})
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                self.error((*path, key), "must map names to strings")
        for key, value in (meta.get("labels") or {}).items():
            if isinstance(value, str) and (len(value) > 63 or not _LABEL_VALUE.search(value)):
                self.error((*path, "labels", key), f"{value!r} is not a label value")

    # --- values ------------------------------------------------------------

    def value(self, value: Any, schema: Schema, path: PathParts, declares_fields: bool = True) -> None:
        """``declares_fields`` is False inside anyOf/oneOf/allOf/not, which constrain but do not declare."""
        self.result.cel_rules_skipped += len(schema.get("x-kubernetes-validations", []))
        if value is None:
            if not schema.get("nullable") and declares_fields:
                self.error(path, "null is not allowed here (the server would drop it and use the default)")
            return
        if not self.type_matches(value, schema, path):
            return
        if isinstance(value, dict):
            self.mapping(value, schema, path, declares_fields)
        elif isinstance(value, list):
            self.sequence(value, schema, path, declares_fields)
        else:
            self.scalar(value, schema, path)
        if "enum" in schema and value not in schema["enum"]:
            self.error(path, f"{json.dumps(value)} is not one of {json.dumps(schema['enum'])}")
        self.combinators(value, schema, path)

    def type_matches(self, value: Any, schema: Schema, path: PathParts) -> bool:
        if schema.get("x-kubernetes-int-or-string"):
            ok = isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                self.error(path, f"expected an integer or a string, found {_kind(value)}")
            return ok
        expected = schema.get("type")
        if expected is None:
            return True
        ok = {
            "object": isinstance(value, dict),
            "array": isinstance(value, list),
            "string": isinstance(value, str),
            "boolean": isinstance(value, bool),
            "integer": isinstance(value, int) and not isinstance(value, bool),
            "number": isinstance(value, int | float) and not isinstance(value, bool),
        }.get(expected, False)
        if not ok:
            self.error(path, f"expected {expected}, found {_kind(value)}")
        return ok

    def mapping(self, value: dict[str, Any], schema: Schema, path: PathParts, declares_fields: bool) -> None:
        properties: dict[str, Schema] = schema.get("properties", {})
        additional = schema.get("additionalProperties")
        embedded = schema.get("x-kubernetes-embedded-resource")
        preserve = schema.get("x-kubernetes-preserve-unknown-fields")
        for key, item in value.items():
            if key in properties:
                self.value(item, properties[key], (*path, key), declares_fields)
            elif isinstance(additional, dict):
                self.value(item, additional, (*path, key), declares_fields)
            elif embedded and key in ("apiVersion", "kind", "metadata"):
                continue
            elif declares_fields and not (preserve or additional is True):
                self.error((*path, key), "unknown field" + _suggest(key, properties))
        for key in schema.get("required", []):
            if key not in value:
                self.error((*path, key), "required")
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            self.error(path, f"needs at least {schema['minProperties']} entries")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            self.error(path, f"takes at most {schema['maxProperties']} entries")

    def sequence(self, value: list[Any], schema: Schema, path: PathParts, declares_fields: bool) -> None:
        items = schema.get("items")
        if isinstance(items, dict):
            for index, item in enumerate(value):
                self.value(item, items, (*path, index), declares_fields)
        if "minItems" in schema and len(value) < schema["minItems"]:
            self.error(path, f"needs at least {schema['minItems']} items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            self.error(path, f"takes at most {schema['maxItems']} items")
        list_type = schema.get("x-kubernetes-list-type")
        if list_type == "set" or schema.get("uniqueItems"):
            seen = [json.dumps(v, sort_keys=True) for v in value]
            for index, encoded in enumerate(seen):
                if encoded in seen[:index]:
                    self.error((*path, index), f"duplicate item {encoded} in a set")
        elif list_type == "map":
            keys = schema.get("x-kubernetes-list-map-keys", [])
            props = (items or {}).get("properties", {})
            seen_keys: list[str] = []
            for index, item in enumerate(value):
                if not isinstance(item, dict):
                    continue
                key = json.dumps([item.get(k, props.get(k, {}).get("default")) for k in keys])
                if key in seen_keys:
                    duplicate = dict(zip(keys, json.loads(key), strict=True))
                    self.error((*path, index), f"duplicate entry for key {duplicate}")
                seen_keys.append(key)

    def scalar(self, value: Any, schema: Schema, path: PathParts) -> None:
        if isinstance(value, str):
            self.string(value, schema, path)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            self.number(value, schema, path)

    def string(self, value: str, schema: Schema, path: PathParts) -> None:
        if "minLength" in schema and len(value) < schema["minLength"]:
            self.error(path, f"shorter than {schema['minLength']} characters")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            self.error(path, f"longer than {schema['maxLength']} characters")
        if "pattern" in schema and not re2.search(schema["pattern"], value):
            self.error(path, f"{value!r} does not match {schema['pattern']!r}")
        problem = _format_problem(value, schema.get("format"))
        if problem:
            self.error(path, problem)

    def number(self, value: float, schema: Schema, path: PathParts) -> None:
        if "minimum" in schema:
            low = schema["minimum"]
            if value < low or (schema.get("exclusiveMinimum") and value == low):
                self.error(path, f"{value} is below the minimum {low}")
        if "maximum" in schema:
            high = schema["maximum"]
            if value > high or (schema.get("exclusiveMaximum") and value == high):
                self.error(path, f"{value} is above the maximum {high}")
        bounds = _INT_RANGES.get(schema.get("format", ""))
        if bounds and isinstance(value, int) and not bounds[0] <= value <= bounds[1]:
            self.error(path, f"{value} does not fit {schema['format']}")

    def combinators(self, value: Any, schema: Schema, path: PathParts) -> None:
        def fails(branch: Schema) -> list[Violation]:
            probe = Result()
            _Walker(probe).value(value, branch, path, declares_fields=False)
            return probe.violations

        for branch in schema.get("allOf", []):
            self.result.violations.extend(fails(branch))
        if "anyOf" in schema and all(fails(b) for b in schema["anyOf"]):
            self.error(path, f"matches none of the alternatives (anyOf) {_brief(schema['anyOf'])}")
        if "oneOf" in schema:
            matching = sum(1 for b in schema["oneOf"] if not fails(b))
            if matching != 1:
                self.error(path, f"matches {matching} of the exclusive alternatives (oneOf) {_brief(schema['oneOf'])}")
        if "not" in schema and not fails(schema["not"]):
            self.error(path, f"matches what is forbidden (not) {_brief([schema['not']])}")


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _brief(branches: list[Schema]) -> str:
    return json.dumps([{k: v for k, v in b.items() if k != "description"} for b in branches])[:200]


def _suggest(key: str, properties: dict[str, Schema]) -> str:
    by_case = {p.lower(): p for p in properties}
    close = ([by_case[key.lower()]] if key.lower() in by_case else
             [by_case[m] for m in difflib.get_close_matches(key.lower(), by_case, n=1, cutoff=0.85)])
    return f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(sorted(properties)) or 'none'})"


def _format_problem(value: str, fmt: str | None) -> str:
    if fmt == "byte":
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            return "not base64 (format byte)"
    elif fmt == "date-time":
        try:
            datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return "not an RFC 3339 date-time"
    elif fmt in ("ipv4", "ipv6"):
        try:
            address = ipaddress.ip_address(value)
        except ValueError:
            return f"not an {fmt} address"
        if address.version != int(fmt[-1]):
            return f"not an {fmt} address"
    return ""


def nodes(obj: dict[str, Any], directory: Path = FIXTURES) -> Iterator[tuple[PathParts, Any, Schema]]:
    """(path, value, schema) of every node of ``obj`` below its root that the CRD declares.

    For the tests that prove the validator strict: each node is a place where a
    misspelt field, a wrong enum or a wrong type must be refused.
    """
    _, schema = schema_of(obj, directory)

    def walk(value: Any, node: Schema, path: PathParts) -> Iterator[tuple[PathParts, Any, Schema]]:
        if path:
            yield path, value, node
        if isinstance(value, dict):
            properties = node.get("properties", {})
            additional = node.get("additionalProperties")
            for key, item in value.items():
                if key in properties:
                    yield from walk(item, properties[key], (*path, key))
                elif isinstance(additional, dict):
                    yield from walk(item, additional, (*path, key))
        elif isinstance(value, list) and isinstance(node.get("items"), dict):
            for index, item in enumerate(value):
                yield from walk(item, node["items"], (*path, index))

    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    yield from walk(body, schema, ())


def closed(schema: Schema) -> bool:
    """Does this object node refuse a field it does not declare?"""
    return (schema.get("type") == "object" and not schema.get("x-kubernetes-preserve-unknown-fields")
            and "additionalProperties" not in schema and not schema.get("x-kubernetes-embedded-resource"))


# --- protobuf messages in their JSON form (Istio's MeshConfig) -------------------------------------------
#
# Istio's mesh config is no Kubernetes object and has no CRD: it is the protobuf
# message istio.mesh.v1alpha1.MeshConfig, written in its JSON form (lowerCamelCase
# field names, durations as "1s", enums by name). The same strictness, against the
# .proto file of the pinned release: a field the message does not declare, a value
# of the wrong type or an unknown enum name is an error.

_SCALARS: dict[str, tuple[type, ...]] = {
    "string": (str,), "bool": (bool,), "bytes": (str,),
    **{t: (int,) for t in ("int32", "int64", "uint32", "uint64", "sint32", "sint64", "fixed32", "fixed64",
                           "sfixed32", "sfixed64")},
    "double": (int, float), "float": (int, float),
}
_FIELD = re2.compile(r"^(repeated\s+|optional\s+)?(map\s*<\s*\w+\s*,\s*[\w.]+\s*>|[\w.]+)\s+(\w+)\s*=\s*\d+")
_WRAPPERS = {f"google.protobuf.{name}Value": scalar for name, scalar in (
    ("Bool", "bool"), ("String", "string"), ("Bytes", "bytes"), ("Double", "double"), ("Float", "float"),
    ("Int32", "int32"), ("UInt32", "uint32"), ("Int64", "int64"), ("UInt64", "uint64"))}
_DURATION = re2.compile(r"^-?[0-9]+(\.[0-9]+)?s$")


@dataclass(frozen=True)
class ProtoField:
    type: str
    repeated: bool
    map_value: str | None
    scope: str
    """The message the field is declared in: where its type's name is looked up from."""


@dataclass
class Proto:
    messages: dict[str, dict[str, ProtoField]] = field(default_factory=dict)
    """Full name (Outer.Inner) -> JSON name -> field."""
    enums: dict[str, set[str]] = field(default_factory=dict)

    def resolve(self, name: str, scope: str) -> str:
        """A type name as written in a field, looked up from the innermost enclosing message outwards."""
        parts = scope.split(".") if scope else []
        for depth in range(len(parts), -1, -1):
            candidate = ".".join([*parts[:depth], name])
            if candidate in self.messages or candidate in self.enums:
                return candidate
        return name


def _json_name(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(p[:1].upper() + p[1:] for p in rest)


def parse_proto(*texts: str) -> Proto:
    """Messages, their fields (oneof members included) and enums of .proto files; packages are ignored."""
    proto = Proto()
    for text in texts:
        stack: list[tuple[str, str]] = []  # (kind, name)
        for raw in text.splitlines():
            line = raw.split("//", 1)[0].strip()
            if not line:
                continue
            opened = re2.search(r"^(message|enum|oneof)\s+(\w+)\s*\{", line)
            if opened:
                kind, name = opened.group(1), opened.group(2)
                stack.append((kind, name))
                scope = ".".join(n for k, n in stack if k == "message")
                if kind == "message":
                    proto.messages.setdefault(scope, {})
                elif kind == "enum":
                    proto.enums[".".join([*(n for k, n in stack[:-1] if k == "message"), name])] = set()
                if line.endswith("}"):  # `message Empty {}` opens and closes on one line
                    stack.pop()
                continue
            if line.startswith("}"):
                if stack:
                    stack.pop()
                continue
            if not stack:
                continue
            kind, name = stack[-1]
            if kind == "enum":
                value = re2.search(r"^(\w+)\s*=", line)
                if value:
                    scope = ".".join([*(n for k, n in stack[:-1] if k == "message"), name])
                    proto.enums[scope].add(value.group(1))
                continue
            matched = _FIELD.search(line)
            if matched and not line.startswith(("option", "reserved", "extensions")):
                scope = ".".join(n for k, n in stack if k == "message")
                declared = matched.group(2)
                map_value = None
                if declared.startswith("map"):
                    map_value = declared.split(",", 1)[1].rstrip(">").strip()
                proto.messages[scope][_json_name(matched.group(3))] = ProtoField(
                    declared, bool(matched.group(1) and "repeated" in matched.group(1)), map_value, scope)
    return proto


def check_proto_json(value: Any, message: str, proto: Proto, path: PathParts = ()) -> list[Violation]:
    """``value`` (parsed YAML/JSON) as the JSON form of ``message``."""
    out: list[Violation] = []

    def one(item: Any, type_name: str, scope: str, where: PathParts) -> None:
        if type_name in _SCALARS:
            ok = isinstance(item, _SCALARS[type_name]) and (type_name == "bool" or not isinstance(item, bool))
            if type_name in ("int64", "uint64", "sint64", "fixed64", "sfixed64") and isinstance(item, str):
                ok = item.lstrip("-").isdigit()
            if not ok:
                out.append(Violation(_dotted(where), f"expected {type_name}, found {_kind(item)}"))
            return
        if type_name == "google.protobuf.Duration":
            if not (isinstance(item, str) and _DURATION.search(item)):
                out.append(Violation(_dotted(where), f"expected a duration such as \"1s\", found {item!r}"))
            return
        if type_name in ("google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.Any"):
            return
        if type_name in _WRAPPERS:  # google.protobuf.BoolValue and the like: the bare value in JSON
            one(item, _WRAPPERS[type_name], scope, where)
            return
        resolved = proto.resolve(type_name, scope)
        if resolved in proto.enums:
            if item not in proto.enums[resolved]:
                out.append(Violation(_dotted(where), f"{item!r} is not one of {sorted(proto.enums[resolved])}"))
            return
        if resolved not in proto.messages:
            out.append(Violation(_dotted(where), f"unknown type {type_name} (not in the .proto files given)"))
            return
        out.extend(check_proto_json(item, resolved, proto, where))

    fields = proto.messages.get(message)
    if fields is None:
        return [Violation(_dotted(path), f"no message {message}")]
    if not isinstance(value, dict):
        return [Violation(_dotted(path), f"expected an object ({message}), found {_kind(value)}")]
    for key, item in value.items():
        declared = fields.get(key)
        if declared is None:
            known: dict[str, Schema] = {name: {} for name in fields}
            out.append(Violation(_dotted((*path, key)), f"unknown field of {message}" + _suggest(key, known)))
            continue
        where = (*path, key)
        if declared.map_value is not None:
            if not isinstance(item, dict):
                out.append(Violation(_dotted(where), f"expected a map, found {_kind(item)}"))
                continue
            for k, v in item.items():
                one(v, declared.map_value, declared.scope, (*where, k))
        elif declared.repeated:
            if not isinstance(item, list):
                out.append(Violation(_dotted(where), f"expected a list, found {_kind(item)}"))
                continue
            for index, element in enumerate(item):
                one(element, declared.type, declared.scope, (*where, index))
        else:
            one(item, declared.type, declared.scope, where)
    return out
