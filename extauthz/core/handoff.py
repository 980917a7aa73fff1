"""What the Check phase hands to the response phase: one typed, versioned contract.

The response phase must know which request a response answers, and for whom,
without trusting anything a client could write and without depending on
optional Envoy settings (``response_attributes``). The Check phase knows both,
verified, so it writes them once into Envoy dynamic metadata (namespace
``envoy.filters.http.ext_authz``, forwarded to ext_proc with
``metadata_options``); a client cannot write that namespace.

Only plain strings (and the integers of their compact form) travel: the
request's readings, the proxy, the decision id and each filter's resolved
variable values, never the whole claim set (a claim a protobuf Struct cannot
hold must not break an answer, and the response phase needs no more).

An allow that Envoy has not yet sent is memory a peer makes the sidecar hold,
and the path is the one part of the hand-off a peer sizes at will, so each of
its readings travels once and costs what it adds: the first whole, each
further one as an edit of the closest earlier reading (most readings differ
from another in a few characters: a trailing slash, a decoded ``%20``, a cut
``;jsessionid``). A filter's values equal to an earlier filter's travel as that
filter's index. The encoded hand-off has a bound (:data:`MAX_ENCODED_BYTES`):
a Check whose hand-off would exceed it is denied, never allowed without one.

Beside the hand-off, every Check answer, allow or denial, writes a small
:class:`CheckRecord` into the same namespace. Only the hand-off tells the
response phase what to filter; the record tells it that a Check decided this
exchange at all, and how. Without it, "no hand-off" cannot be told from "no
verified request" unless Envoy also sends ``response.code_details``, which most
Envoy configurations (Envoy Gateway's, Istio's, one written from Envoy's docs)
do not: the response phase had to block every response a filter might apply
to, Envoy's own denials included.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from enum import StrEnum
from types import MappingProxyType
from typing import Any

import orjson

VERSION = 2
_VERSION_TEXT = str(VERSION)

MAX_ENCODED_BYTES = 48 * 1024
"""The longest encoded hand-off a Check writes, and the response phase reads.

The HTTP transport sends the hand-off as one header of its answer, which Envoy
reads with at most 60 KiB of response headers by default; 48 KiB leaves the
rest for the decision id and the upstream mutations, so both transports answer
alike below the bound and above it (a denial, never an Envoy error). Envoy
takes at most 60 KiB of request headers, path included; with every further
reading an edit of a few bytes, the bound admits paths up to about 35 KiB.
"""

MAX_READINGS = 6
"""A path has at most three readings (as sent, decoded, parameters cut), each also without a trailing slash."""

_EMPTY: Mapping[str, str] = MappingProxyType({})


@dataclass(frozen=True)
class Handoff:
    decision_id: str
    proxy: str
    policy: str
    """Digest of the policy that decided: filter values are only valid for that policy."""
    methods: tuple[str, ...]
    """The request's own method, then any it claims through an override."""
    paths: tuple[str, ...]
    """Every reading of the path (as sent, decoded, parameters cut); a filter applies if one matches."""
    host: str
    filter_values: tuple[Mapping[str, str], ...] = ()
    """Per filter of the proxy, in file order: its variables as resolved at Check time."""
    version: int = VERSION

    def to_metadata(self) -> dict[str, Any]:
        """A JSON-shaped dict (strings, integers and lists) that the adapters encode as one string."""
        paths, values = self.paths, self.filter_values
        return {
            "v": str(self.version),
            "decisionId": self.decision_id,
            "proxy": self.proxy,
            "policy": self.policy,
            "methods": list(self.methods),
            "paths": list(paths) if len(paths) < 2 else _paths_out(paths),  # most requests: one reading
            "host": self.host,
            "filterValues": [dict(v) for v in values] if len(values) < 2 else _values_out(values),
        }

    def encoded(self) -> EncodedHandoff | None:
        """The fields with their one encoding, or None when that would exceed :data:`MAX_ENCODED_BYTES`.

        Base64 makes at least four characters of every three bytes of the
        first reading, so a path that alone exceeds the bound is refused before
        anything is encoded: a peer's longest paths cost a length comparison.
        """
        if self.paths and len(self.paths[0]) * 4 > MAX_ENCODED_BYTES * 3:
            return None
        fields = self.to_metadata()
        text = _encode(fields)
        return EncodedHandoff(fields, text) if len(text) <= MAX_ENCODED_BYTES else None

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any]) -> Handoff | None:
        """The hand-off, or None when it is absent, of another version or malformed (callers fail closed)."""
        if data.get("v") != _VERSION_TEXT:
            return None
        decision_id, proxy, policy, host = (data.get(k) for k in ("decisionId", "proxy", "policy", "host"))
        if not (isinstance(decision_id, str) and isinstance(proxy, str) and proxy and isinstance(policy, str)
                and isinstance(host, str)):
            return None
        methods, paths, values = _strings(data.get("methods")), _paths_in(data.get("paths")), \
            _values_in(data.get("filterValues"))
        if methods is None or paths is None or values is None:
            return None
        return cls(decision_id, proxy, policy, methods, paths, host, values)

    def values_for(self, index: int, policy_digest: str) -> Mapping[str, str]:
        """Filter ``index``'s values, or none at all if the policy changed since the Check.

        After a reload the index may name a different filter, so its old values
        are not used: the filter's operations then resolve towards showing less.
        """
        if policy_digest != self.policy or index >= len(self.filter_values):
            return _EMPTY
        return self.filter_values[index]


class EncodedHandoff(Mapping[str, Any]):
    """A hand-off's fields and their encoding, made once by the Check that decided.

    The Check encodes the hand-off to know its size before it allows; the
    adapters write this text as it is instead of encoding the fields again.
    """

    __slots__ = ("_fields", "text")

    def __init__(self, fields: Mapping[str, Any], text: str) -> None:
        self._fields = fields
        self.text = text

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)


def encode(fields: Mapping[str, Any]) -> str:
    """Base64url (unpadded) of the fields' compact JSON: plain ASCII, whatever the paths or values hold."""
    if type(fields) is EncodedHandoff:  # not isinstance: an ABC's check costs four times as much
        return fields.text
    return _encode(fields)


def _encode(fields: Mapping[str, Any]) -> str:
    return base64.urlsafe_b64encode(orjson.dumps(fields, default=dict)).rstrip(b"=").decode("ascii")


def decode(value: object) -> dict[str, Any] | None:
    """The fields of an encoded hand-off, or None when the value is not one (callers fail closed).

    A value over the bound was not written by a Check, so it is not read at all.
    """
    if not isinstance(value, str) or len(value) > MAX_ENCODED_BYTES:
        return None
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), altchars=b"-_", validate=True)
        decoded = orjson.loads(raw)
    except (binascii.Error, ValueError):
        return None
    return decoded if isinstance(decoded, dict) else None


def _paths_out(paths: tuple[str, ...]) -> list[Any]:
    """The first reading whole, each further one as ``[base, prefix, suffix, middle]``.

    ``base`` is the index of the earlier reading it shares most with:
    the reading is ``paths[base][:prefix] + middle + paths[base][len - suffix:]``.
    """
    out: list[Any] = [paths[0]]
    for i in range(1, len(paths)):
        reading = paths[i]
        best: list[Any] = []
        for base in range(i):
            origin = paths[base]
            if origin.startswith(reading):  # cut short (no trailing slash): nothing to spell, nothing to search
                best = [base, len(reading), 0, ""]
                break
            prefix = _common_prefix(origin, reading)
            suffix = _common_suffix(origin, reading, min(len(origin), len(reading)) - prefix)
            if not best or len(reading) - prefix - suffix < len(best[3]):
                best = [base, prefix, suffix, reading[prefix:len(reading) - suffix]]
        out.append(best)
    return out


def _common_prefix(a: str, b: str) -> int:
    """How many leading characters ``a`` and ``b`` share; compared in C, in halving pieces."""
    low, high = 0, min(len(a), len(b))
    while low < high:  # a[:low] == b[:low], and the answer is at most high
        middle = (low + high + 1) // 2
        if a.startswith(b[low:middle], low):
            low = middle
        else:
            high = middle - 1
    return low


def _common_suffix(a: str, b: str, limit: int) -> int:
    """How many trailing characters ``a`` and ``b`` share, at most ``limit``."""
    low, high = 0, limit
    while low < high:  # the last low characters agree, and the answer is at most high
        middle = (low + high + 1) // 2
        if a.endswith(b[len(b) - middle:len(b) - low], 0, len(a) - low):
            low = middle
        else:
            high = middle - 1
    return low


def _paths_in(value: object) -> tuple[str, ...] | None:
    """The readings back from :func:`_paths_out`'s form; None for anything it would not write."""
    if not isinstance(value, list) or not value or len(value) > MAX_READINGS or not isinstance(value[0], str):
        return None
    paths: list[str] = [value[0]]
    for edit in value[1:]:
        if not isinstance(edit, list) or len(edit) != 4:
            return None
        base, prefix, suffix, middle = edit
        if type(base) is not int or type(prefix) is not int or type(suffix) is not int \
                or not isinstance(middle, str) or not 0 <= base < len(paths):
            return None
        origin = paths[base]
        if prefix < 0 or suffix < 0 or prefix + suffix > len(origin):
            return None
        paths.append(origin[:prefix] + middle + origin[len(origin) - suffix:])
    return tuple(paths)


def _values_out(values: tuple[Mapping[str, str], ...]) -> list[Any]:
    """Each filter's values, or the index of an earlier filter whose values are the same."""
    out: list[Any] = []
    for i, entry in enumerate(values):
        earlier = next((j for j in range(i) if values[j] == entry), None) if entry else None
        out.append(dict(entry) if earlier is None else earlier)
    return out


def _values_in(value: object) -> tuple[Mapping[str, str], ...] | None:
    if not isinstance(value, list):
        return None
    out: list[Mapping[str, str]] = []
    for entry in value:
        if type(entry) is int and 0 <= entry < len(out):
            out.append(out[entry])
        elif isinstance(entry, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in entry.items()):
            out.append(MappingProxyType(entry))
        else:
            return None
    return tuple(out)


def _strings(value: object) -> tuple[str, ...] | None:
    """A non-empty list of strings as a tuple, else None."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None


class CheckOutcome(StrEnum):
    """What a Check decided, as far as the response phase is concerned."""

    ALLOWED = "a"
    """Allowed, and no filter may apply to its responses: they pass untouched."""
    FILTERED = "f"
    """Allowed, and a filter may apply: a hand-off was written beside the record and must be read."""
    DENIED = "d"
    """Denied: Envoy answers the client itself (status, ``www-authenticate``, JSON body); no upstream data."""


RECORD_VERSION = "1"


@dataclass(frozen=True, slots=True)
class CheckRecord:
    """That a Check decided this exchange, and how: ``1.<outcome>.<decision id>`` on the wire.

    It is written on every answer, so its cost is that of a few bytes: no
    JSON, no base64, nothing of the request. A FILTERED record without a
    readable hand-off is not taken as "nothing to filter" (the hand-off may be
    what Envoy failed to forward): the response phase then blocks.
    """

    outcome: CheckOutcome
    decision_id: str

    def encoded(self) -> str:
        return f"{RECORD_VERSION}.{self.outcome.value}.{self.decision_id}"

    @classmethod
    def of(cls, allowed: bool, handed_off: bool, decision_id: str) -> CheckRecord:
        """The record of a decision: denied, or allowed with or without a hand-off."""
        if not allowed:
            return cls(CheckOutcome.DENIED, decision_id)
        return cls(CheckOutcome.FILTERED if handed_off else CheckOutcome.ALLOWED, decision_id)

    @classmethod
    def decode(cls, value: object) -> CheckRecord | None:
        """The record, or None for anything a Check of this version would not write (callers fail closed)."""
        if not isinstance(value, str) or len(value) > _MAX_RECORD_LENGTH:
            return None
        version, _, rest = value.partition(".")
        outcome, _, decision_id = rest.partition(".")
        if version != RECORD_VERSION or not decision_id:
            return None
        try:
            return cls(CheckOutcome(outcome), decision_id)
        except ValueError:
            return None


_MAX_RECORD_LENGTH = 128
"""Far above what a Check writes (a 36-character decision id and four more): anything longer is not a record."""
