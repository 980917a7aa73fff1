"""Decide at response headers what happens to a body: stream it, buffer and filter it, or block it.

Deciding on headers is what keeps buffering rare: only a response that a
filter applies to is buffered (the adapter asks Envoy for the body with a
``mode_override``); everything else streams through untouched. Responses that
a filter applies to but that could never be filtered (not JSON, an unknown
content-encoding, a declared length over the limit) are blocked here, before a
single body byte is buffered.

Identity and the request come only from the Check phase (the :class:`Handoff`
in ext_authz dynamic metadata, which a client cannot write), never from
response or request headers. Beside it, the Check's :class:`CheckRecord` tells
the three exchanges without a hand-off apart: a request the Check allowed and
no filter applies to (passed untouched), Envoy's own reply to a denied Check
(passed untouched: its status, ``www-authenticate`` and JSON body are the
sidecar's), and one no Check decided (blocked wherever a filter may apply).
A filter applies to a request when its methods cover the method (HEAD and
OPTIONS read as GET) and its path scope matches any reading of the path, with
or without a trailing slash. A partial response (206, ``content-range``) to
such a request is blocked: a fragment cannot be filtered as a document.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum
from types import MappingProxyType

from extauthz.core.handoff import CheckOutcome, CheckRecord, Handoff
from extauthz.core.scope import request_in_scope
from extauthz.filtering.codec import BlockCode, content_encodings, unsupported
from extauthz.filtering.engine import BoundFilter, bind
from extauthz.policy.model import Policy

_EMPTY: Mapping[str, str] = MappingProxyType({})

# Headers that describe the upstream's bytes and would be wrong (or tell-tale) after filtering.
REPRESENTATION_HEADERS = ("content-encoding", "etag", "content-md5", "digest", "content-digest", "repr-digest")


@dataclass(frozen=True)
class ResponseHead:
    """What the response-headers message tells about one exchange (all from Envoy, none from the client).

    The request is known from the Check's :class:`Handoff`; ``method`` and
    ``path`` here are Envoy's optional request attributes, used only to decide
    whether a response with no hand-off could be one a filter applies to.
    """

    status: int
    headers: Mapping[str, str] = field(default_factory=lambda: _EMPTY)
    """Lower-case names."""
    end_of_stream: bool = False
    from_upstream: bool = True
    """False for a reply Envoy generated itself (a denial, an error): it holds no upstream data."""
    method: str = ""
    path: str = ""
    """Empty when Envoy did not send request attributes."""
    described: bool = True
    """False when Envoy sent the body without the response headers (``response_header_mode: SKIP``): the
    status, type and encoding are unknown, so the body is read as identity-encoded JSON and every filter's
    status scope as met (showing less), and a body that is not such JSON is blocked."""

    @property
    def partial(self) -> bool:
        """A fragment of a representation: filtering it as a document would misread it."""
        return self.status == 206 or "content-range" in self.headers


class Action(StrEnum):
    PASS = "pass"  # noqa: S105 - an action, not a password
    """Not ours to filter: headers and body stream through unbuffered."""
    BUFFER = "buffer"
    """Ask Envoy for the whole body, then filter it."""
    BLOCK = "block"
    """A filter applies but the response cannot be filtered: 502, nothing of it reaches the client."""
    STRIP_LENGTH = "strip_length"
    """A body-less response (HEAD) whose content-length would tell the unfiltered size."""


@dataclass(frozen=True)
class ResponsePlan:
    action: Action
    proxy: str = ""
    decision_id: str = ""
    filters: tuple[BoundFilter, ...] = ()
    encodings: tuple[str, ...] = ()
    limit: int = 0
    declared_length: int | None = None
    """The upstream's content-length (already checked against the limit), None for chunked bodies."""
    code: BlockCode | None = None
    """Why a BLOCK plan blocks."""
    detail: str = ""


def is_json(content_type: str | None) -> bool:
    """``application/json`` or any ``+json`` media type, parameters ignored."""
    if not content_type:
        return False
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def plan_response(
    policy: Policy, handoff: Handoff | None, head: ResponseHead, record: CheckRecord | None = None,
) -> ResponsePlan:
    """What to do with this response, decided on its headers alone (on its body when Envoy sends no headers).

    ``record`` is the Check's record of this exchange, if Envoy forwarded one.
    """
    if not head.from_upstream:
        return ResponsePlan(Action.PASS)
    if handoff is None and record is not None:
        if record.outcome is not CheckOutcome.FILTERED:
            # Allowed with no filter in scope, or denied (Envoy's own reply, nothing of the upstream).
            return ResponsePlan(Action.PASS, decision_id=record.decision_id)
        # The Check wrote a hand-off beside this record; Envoy did not pass it on (or it was damaged).
        return ResponsePlan(Action.BLOCK, decision_id=record.decision_id, code=BlockCode.NO_IDENTITY,
                            detail="the Check handed this request to the response phase, but the hand-off "
                                   "did not arrive (is x-extauthz-handoff in dynamic_metadata_from_headers?)")
    proxy = policy.proxy_named(handoff.proxy) if handoff is not None else None
    if proxy is None or handoff is None:
        return _without_handoff(policy, handoff, head)
    filters: list[BoundFilter] = []
    for flt in proxy.filters:
        values = handoff.values_for(flt.index, policy.digest)
        if not request_in_scope(flt, handoff.methods, handoff.paths, values):
            continue
        if head.partial and head.described:
            # Whatever the status scope says: a fragment cannot be filtered as a document.
            return ResponsePlan(Action.BLOCK, proxy.name, handoff.decision_id, code=BlockCode.PARTIAL_CONTENT,
                        detail=f"a {head.status} partial response to a filtered request")
        if flt.statuses is None or head.status in flt.statuses or not head.described:
            filters.append(bind(flt, values))
    base = ResponsePlan(Action.PASS, proxy.name, handoff.decision_id)
    if not filters:
        return base
    limit = policy.server.max_body_bytes
    if not head.described:
        # Only the body is known: filtered as identity-encoded JSON, anything else fails to parse (blocked).
        return ResponsePlan(Action.BUFFER, proxy.name, handoff.decision_id, tuple(filters), (), limit, None)
    if head.end_of_stream:
        if "content-length" in head.headers:  # HEAD, or a body-less answer: the length would tell
            return ResponsePlan(Action.STRIP_LENGTH, proxy.name, handoff.decision_id)
        return base
    encodings = content_encodings(head.headers.get("content-encoding"))
    bad = unsupported(encodings)
    if bad is not None:
        return ResponsePlan(Action.BLOCK, proxy.name, handoff.decision_id, code=BlockCode.UNSUPPORTED_ENCODING,
                    detail=f"content-encoding {bad!r} cannot be decoded")
    if not is_json(head.headers.get("content-type")):
        return ResponsePlan(Action.BLOCK, proxy.name, handoff.decision_id, code=BlockCode.NOT_JSON,
                    detail=f"content-type {head.headers.get('content-type')!r} is not JSON")
    declared = head.headers.get("content-length", "").strip()
    length = int(declared) if declared.isdigit() else None
    if length is not None and length > limit:
        return ResponsePlan(Action.BLOCK, proxy.name, handoff.decision_id, code=BlockCode.TOO_LARGE,
                    detail=f"content-length {declared} exceeds the limit of {limit}")
    return ResponsePlan(Action.BUFFER, proxy.name, handoff.decision_id, tuple(filters), encodings, limit, length)


def _without_handoff(policy: Policy, handoff: Handoff | None, head: ResponseHead) -> ResponsePlan:
    """No verified request for this exchange (ext_authz did not run, or its proxy is gone after a reload).

    Any filter that might apply blocks the response. Envoy's request
    attributes narrow "might" when they are configured (the path alone
    already does: an unknown method is taken to be in every filter's method
    scope); without them every filter might.
    """
    proxy, decision_id = (handoff.proxy, handoff.decision_id) if handoff is not None else ("", "")
    paths = (head.path,) if head.path else ()
    for flt in (f for p in policy.proxies for f in p.filters):
        if not paths or request_in_scope(
                flt if head.method else replace(flt, methods=None), (head.method,), paths, _EMPTY):
            return ResponsePlan(Action.BLOCK, proxy, decision_id, code=BlockCode.NO_IDENTITY,
                        detail="no verified request for a response a filter may apply to")
    return ResponsePlan(Action.PASS)
