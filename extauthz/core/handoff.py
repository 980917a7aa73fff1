"""What the Check phase hands to the response phase: one typed, versioned contract.

The response phase must know which request a response answers, and for whom,
without trusting anything a client could write and without depending on
optional Envoy settings (``response_attributes``). The Check phase knows both,
verified, so it writes them once into Envoy dynamic metadata (namespace
``envoy.filters.http.ext_authz``, forwarded to ext_proc with
``metadata_options``); a client cannot write that namespace.

Only plain strings travel: the request's readings, the proxy, the decision id
and each filter's resolved variable values, never the whole claim set (a claim
a protobuf Struct cannot hold must not break an answer, and the response phase
needs no more).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

VERSION = 1

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
        """A JSON-shaped dict (strings and lists only) that the adapters encode as one string."""
        return {
            "v": str(self.version),
            "decisionId": self.decision_id,
            "proxy": self.proxy,
            "policy": self.policy,
            "methods": list(self.methods),
            "paths": list(self.paths),
            "host": self.host,
            "filterValues": [dict(values) for values in self.filter_values],
        }

    @classmethod
    def from_metadata(cls, data: Mapping[str, Any]) -> Handoff | None:
        """The hand-off, or None when it is absent, of another version or malformed (callers fail closed)."""
        if data.get("v") != str(VERSION):
            return None
        text = {k: data.get(k) for k in ("decisionId", "proxy", "policy", "host")}
        methods, paths, values = _strings(data.get("methods")), _strings(data.get("paths")), data.get("filterValues")
        if not all(isinstance(v, str) for v in text.values()) or not text["proxy"] or not methods or not paths \
                or not isinstance(values, list) or not all(isinstance(v, Mapping) for v in values):
            return None
        return cls(
            decision_id=str(text["decisionId"]),
            proxy=str(text["proxy"]),
            policy=str(text["policy"]),
            methods=methods,
            paths=paths,
            host=str(text["host"]),
            filter_values=tuple(
                MappingProxyType({str(k): v for k, v in entry.items() if isinstance(v, str)}) for entry in values
            ),
        )

    def values_for(self, index: int, policy_digest: str) -> Mapping[str, str]:
        """Filter ``index``'s values, or none at all if the policy changed since the Check.

        After a reload the index may name a different filter, so its old values
        are not used: the filter's operations then resolve towards showing less.
        """
        if policy_digest != self.policy or index >= len(self.filter_values):
            return _EMPTY
        return self.filter_values[index]


def _strings(value: object) -> tuple[str, ...] | None:
    """A non-empty list of strings as a tuple, else None."""
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    return None
