"""The ext_proc adapter: Envoy's ProcessingRequest stream in, ProcessingResponses out.

Thin like the ext_authz adapter: protobufs become a plain
:class:`~extauthz.filtering.scope.ResponseHead` and bytes, the pure modules in
:mod:`extauthz.filtering` decide and filter, and the outcome becomes protobufs.

Envoy opens one stream per HTTP exchange at the response headers (request
headers are skipped in ``envoy/envoy.yaml``). For a response no filter applies
to, the headers answer carries no mode override, so Envoy streams the body
without buffering it. For one a filter applies to, the answer asks Envoy
to hold the headers and send the whole body:

* BUFFERED when the upstream declared a ``content-length`` (already checked
  against the limit, so it fits). The body answer replaces the body and sets
  the new ``content-length`` in the same message; Envoy checks that the two
  agree.
* BUFFERED_PARTIAL for a chunked body of unknown size. Envoy sends it whole,
  or, when it outgrows Envoy's buffer, only the first part with
  ``end_of_stream`` false, which is answered with a 502 (in plain BUFFERED mode
  Envoy would answer a text/plain 500 itself). In this mode Envoy 1.40 rejects
  a ``content-length`` in the body answer, so the response stays chunked.

Every failure, including an exception in this module, becomes a 502 with a
JSON error (an ImmediateResponse), so the upstream's bytes are never passed on
unfiltered.

Envoy configurations other than the shipped ones are served too (Envoy
Gateway's, Istio's, one written from Envoy's docs): without the shipped
matcher every response comes here, Envoy's own replies included, and the
Check's record (:class:`~extauthz.core.handoff.CheckRecord`) tells what may
pass. A configuration that sends only the body (``response_header_mode:
SKIP``, body BUFFERED) is served from the body message. What such a
configuration still lacks is said in one rate-limited warning naming the Envoy
setting, not in a 502 per request alone.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any

import grpc
import structlog
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as pb
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc
from envoy.type.v3 import http_status_pb2
from google.protobuf import struct_pb2

from extauthz.core.decision import error_body
from extauthz.core.handoff import CheckRecord, Handoff
from extauthz.filtering.codec import BlockCode, Unfilterable
from extauthz.filtering.pipeline import filter_body
from extauthz.filtering.scope import REPRESENTATION_HEADERS, Action, ResponseHead, ResponsePlan, plan_response
from extauthz.observability import metrics
from extauthz.observability.logging import log_info
from extauthz.policy.model import Policy
from extauthz.server.handoff_header import HANDOFF_HEADER, RECORD_HEADER, decode_handoff
from extauthz.server.headers import METADATA_NAMESPACE, header_map

if TYPE_CHECKING:
    from extauthz.server.shadow import Shadow

log = structlog.get_logger("extauthz.extproc")

ATTRIBUTES_NAMESPACE = "envoy.filters.http.ext_proc"
OVERWRITE = base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD
BUFFER_SIZED_BODY = processing_mode_pb2.ProcessingMode(
    response_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED
)
BUFFER_CHUNKED_BODY = processing_mode_pb2.ProcessingMode(
    response_body_mode=processing_mode_pb2.ProcessingMode.BUFFERED_PARTIAL
)
# Bodies above this are filtered on a worker thread so Checks keep flowing meanwhile.
_OFFLOAD_BYTES = 64 * 1024

# Safe for any caller to read: a stable code, a fixed sentence, the decision id.
_MESSAGES: dict[BlockCode, str] = {
    BlockCode.NOT_JSON: "the response could not be filtered for this caller (not JSON)",
    BlockCode.UNSUPPORTED_ENCODING: "the response could not be filtered for this caller (unsupported content-encoding)",
    BlockCode.BAD_ENCODING: "the response could not be filtered for this caller (undecodable content-encoding)",
    BlockCode.TOO_LARGE: "the response is too large to be filtered for this caller",
    BlockCode.INVALID_JSON: "the response could not be filtered for this caller (invalid JSON)",
    BlockCode.NO_IDENTITY: "the response could not be filtered: no verified identity",
    BlockCode.PARTIAL_CONTENT: "a partial response cannot be filtered for this caller; request the whole resource",
    BlockCode.FILTER_ERROR: "the response could not be filtered for this caller",
}


def _plain(value: struct_pb2.Value) -> Any:
    """A Struct value as plain Python, as ``json_format.MessageToDict`` reads it, at a tenth of its cost."""
    kind = value.WhichOneof("kind")
    if kind == "string_value":
        return value.string_value
    if kind == "struct_value":
        return _plain_struct(value.struct_value)
    if kind == "list_value":
        return [_plain(item) for item in value.list_value.values]
    if kind == "number_value":
        return value.number_value
    if kind == "bool_value":
        return value.bool_value
    return None


def _plain_struct(struct: struct_pb2.Struct) -> dict[str, Any]:
    return {name: _plain(value) for name, value in struct.fields.items()}


def _attributes(message: pb.ProcessingRequest) -> dict[str, Any]:
    if ATTRIBUTES_NAMESPACE not in message.attributes:
        return {}
    return _plain_struct(message.attributes[ATTRIBUTES_NAMESPACE])


WARNING_INTERVAL_SECONDS = 600.0
"""A configuration warning is logged at most this often (per process): once is enough to act on."""


class _ConfigWarnings:
    """What the ext_proc messages tell about Envoy's configuration, said once in a while, never per request."""

    def __init__(self) -> None:
        self.namespace_seen = False
        """Some message carried the ext_authz namespace: Envoy forwards it (its absence then means no Check)."""
        self._last: dict[str, float] = {}

    def said(self) -> list[str]:
        """The warnings logged so far (their event names), for a status page to show beside the log."""
        names = {"namespace": "extproc_metadata_not_forwarded", "body_only": "extproc_response_headers_not_sent"}
        return [names[kind] for kind in self._last if kind != "namespace" or not self.namespace_seen]

    def due(self, kind: str) -> bool:
        now = time.monotonic()
        last = self._last.get(kind)
        if last is not None and now - last < WARNING_INTERVAL_SECONDS:
            return False
        self._last[kind] = now
        return True

    def no_namespace(self) -> None:
        if not self.namespace_seen and self.due("namespace"):
            log.warning("extproc_metadata_not_forwarded", namespace=METADATA_NAMESPACE,
                        setting=f"metadata_options.forwarding_namespaces.untyped: [{METADATA_NAMESPACE}]",
                        gateway_setting=f"EnvoyExtensionPolicy extProc.metadata.accessibleNamespaces: "
                                        f"[{METADATA_NAMESPACE}]",
                        hint="no ext_proc message so far carried the Check's dynamic metadata: without it every "
                             "response a filter may apply to is blocked (502 no_identity), Envoy's own denials "
                             "included; add the setting to the ext_proc filter (over the HTTP ext_authz "
                             "transport, also dynamic_metadata_from_headers: [x-extauthz-handoff, "
                             "x-extauthz-record]), or ext_authz did not run")

    def body_only(self) -> None:
        if self.due("body_only"):
            log.warning("extproc_response_headers_not_sent",
                        setting="processing_mode.response_header_mode: SEND",
                        gateway_setting="EnvoyExtensionPolicy extProc.processingMode.response: {}",
                        hint="Envoy sends response bodies without their headers: filtered bodies are read as "
                             "uncompressed JSON whatever their status (a compressed or non-JSON body is blocked), "
                             "and every body is buffered, filtered or not")


config_warnings = _ConfigWarnings()


def to_record(message: pb.ProcessingRequest) -> CheckRecord | None:
    """The Check's record of this exchange, if Envoy forwarded one (the same namespace as the hand-off)."""
    namespaces = message.metadata_context.filter_metadata
    if METADATA_NAMESPACE not in namespaces:
        return None
    struct: struct_pb2.Struct = namespaces[METADATA_NAMESPACE]
    if RECORD_HEADER not in struct.fields:
        return None
    return CheckRecord.decode(struct.fields[RECORD_HEADER].string_value)


def to_handoff(message: pb.ProcessingRequest) -> Handoff | None:
    """The Check phase's verified view of this exchange's request, if Envoy forwarded it.

    Both transports write it as one string under the hand-off header's name
    (:mod:`extauthz.server.handoff_header`): the gRPC Check into its dynamic
    metadata, the HTTP Check as a header Envoy copies there. Only the Check's
    answer writes this namespace, so it cannot come from a client. A string no
    Check of this version would write (malformed, over the bound, an older
    format) is no hand-off: what a filter may apply to is then blocked.
    """
    namespaces = message.metadata_context.filter_metadata
    if METADATA_NAMESPACE not in namespaces:
        config_warnings.no_namespace()
        return None
    config_warnings.namespace_seen = True
    struct: struct_pb2.Struct = namespaces[METADATA_NAMESPACE]
    if HANDOFF_HEADER not in struct.fields:
        return None
    fields = decode_handoff(struct.fields[HANDOFF_HEADER].string_value)
    return Handoff.from_metadata(fields) if fields is not None else None


def to_head(message: pb.ProcessingRequest) -> ResponseHead:
    """The response as Envoy describes it: status and headers, plus the request attributes it may send.

    For a body message (Envoy sends no response headers) only the attributes are known.
    """
    described = message.WhichOneof("request") == "response_headers"
    headers = header_map(message.response_headers.headers) if described else {}
    attributes = _attributes(message)
    target = str(attributes.get("request.path") or "")
    details = attributes.get("response.code_details")
    return ResponseHead(
        status=int(headers.get(":status", "0") or 0),
        headers=headers,
        end_of_stream=message.response_headers.end_of_stream,
        # Absent details: most Envoy configs send none. The response is then upstream data (fail closed),
        # unless the Check's record says otherwise.
        from_upstream=details is None or details == "via_upstream",
        method=str(attributes.get("request.method") or "").upper(),
        path=target.split("?", 1)[0],
        described=described,
    )


def _set(name: str, value: str) -> base_pb2.HeaderValueOption:
    # ext_proc reads raw_value; OVERWRITE replaces the upstream's value instead of adding a second one.
    return base_pb2.HeaderValueOption(
        header=base_pb2.HeaderValue(key=name, raw_value=value.encode()), append_action=OVERWRITE
    )


# A filtered response is one caller's view: no shared cache may hand it to another caller.
_PRIVATE = _set("cache-control", "private, no-store")


def blocked(code: BlockCode, decision_id: str) -> pb.ProcessingResponse:
    """A 502 with a small JSON body in place of the whole upstream response."""
    body = error_body(code, _MESSAGES[code], decision_id or str(uuid.uuid4()))
    return pb.ProcessingResponse(
        immediate_response=pb.ImmediateResponse(
            status=http_status_pb2.HttpStatus(code=http_status_pb2.BadGateway),
            headers=pb.HeaderMutation(set_headers=[
                _set("content-type", "application/json"),
                _set("cache-control", "no-store"),
            ]),
            body=body,
            details=f"extauthz_response_blocked_{code}",
        )
    )


def _continue(phase: str) -> pb.ProcessingResponse:
    """The empty answer for a phase we do not change."""
    if phase == "response_body":
        return pb.ProcessingResponse(response_body=pb.BodyResponse())
    if phase in ("request_headers", "response_headers"):
        return pb.ProcessingResponse(**{phase: pb.HeadersResponse()})
    if phase == "request_body":
        return pb.ProcessingResponse(request_body=pb.BodyResponse())
    return pb.ProcessingResponse(**{phase: pb.TrailersResponse()})


class _Exchange:
    """The state of one stream (one HTTP exchange): the plan made on the response headers."""

    def __init__(self, policy: Policy, shadow: Shadow | None = None) -> None:
        self.policy = policy
        self.shadow = shadow
        """Shown each filtered body once answered: a shadow policy may compare its own filters' view of it."""
        self.head: ResponseHead | None = None
        self.plan = ResponsePlan(Action.PASS)
        self.body_seen = False
        self.headers_seen = False
        self.done = False
        """Nothing more to answer: the response is passed, blocked, or its body answered."""

    async def answer(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        phase = message.WhichOneof("request") or ""
        if phase == "response_headers":
            self.headers_seen = True
            answer = self._on_headers(message)
            self.done = self.plan.action is not Action.BUFFER
            return answer
        if phase == "response_body" and not self.headers_seen:
            # Envoy sends no response headers (response_header_mode: SKIP): the plan is made on the body.
            return await self._on_body_alone(message)
        if phase == "response_body" and self.plan.action is Action.BUFFER:
            self.body_seen = self.done = True
            return await self._on_body(message.response_body)
        return _continue(phase)

    async def _on_body_alone(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """A response body whose headers were never sent here: decided and, if a filter applies, filtered now."""
        self.headers_seen = True  # one plan per exchange: later chunks (STREAMED) follow it
        answer = self._on_headers(message)
        if self.plan.action is Action.BUFFER:
            config_warnings.body_only()
            self.body_seen = self.done = True
            return await self._on_body(message.response_body)
        self.done = True
        return answer if self.plan.action is Action.BLOCK else _continue("response_body")

    def _on_headers(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        self.head = to_head(message)
        self.plan = plan_response(self.policy, to_handoff(message), self.head, to_record(message))
        action = self.plan.action
        if action is Action.BUFFER:
            mode = BUFFER_CHUNKED_BODY if self.plan.declared_length is None else BUFFER_SIZED_BODY
            return pb.ProcessingResponse(response_headers=pb.HeadersResponse(), mode_override=mode)
        if action is Action.BLOCK:
            code = self.plan.code or BlockCode.FILTER_ERROR
            self._record_block(code, self.plan.detail, 0)
            return blocked(code, self.plan.decision_id)
        if action is Action.STRIP_LENGTH:
            metrics.child(metrics.filter_outcomes, self.plan.proxy, "filtered", "").inc()
            mutation = pb.HeaderMutation(set_headers=[_PRIVATE],
                                         remove_headers=["content-length", *REPRESENTATION_HEADERS])
            return pb.ProcessingResponse(
                response_headers=pb.HeadersResponse(response=pb.CommonResponse(header_mutation=mutation))
            )
        if self.plan.proxy:
            metrics.child(metrics.filter_outcomes, self.plan.proxy, "passed", "").inc()
        return _continue("response_headers")

    async def _on_body(self, body: pb.HttpBody) -> pb.ProcessingResponse:
        data = bytes(body.body)
        try:
            if len(data) > _OFFLOAD_BYTES:
                result = await asyncio.to_thread(filter_body, self.plan, data, body.end_of_stream)
            else:
                result = filter_body(self.plan, data, body.end_of_stream)
        except Unfilterable as exc:
            self._record_block(exc.code, exc.detail, len(data))
            return blocked(exc.code, self.plan.decision_id)
        if self.shadow is not None and self.head is not None:
            self.shadow.compare_response(self.plan, self.head, data, body.end_of_stream)
        proxy = self.plan.proxy
        metrics.child(metrics.filtered_bytes, proxy, "upstream").inc(result.decoded_bytes)
        metrics.child(metrics.filtered_bytes, proxy, "client").inc(len(result.body))
        metrics.child(metrics.filter_outcomes, proxy, "filtered", "").inc()
        log_info("response_filtered", {
            "decision_id": self.plan.decision_id, "proxy": proxy, "upstream_bytes": len(data),
            "decoded_bytes": result.decoded_bytes, "client_bytes": len(result.body),
            "filters": [b.filter.index for b in self.plan.filters],
            "unresolved_operations": {b.filter.index: list(b.unresolved) for b in self.plan.filters if b.unresolved}
            or None})
        removed = [h for h in REPRESENTATION_HEADERS if h != "content-encoding" or self.plan.encodings]
        if self.plan.declared_length is None:
            mutation = pb.HeaderMutation(set_headers=[_PRIVATE], remove_headers=["content-length", *removed])
        else:
            mutation = pb.HeaderMutation(
                set_headers=[_set("content-length", str(len(result.body))), _PRIVATE], remove_headers=removed
            )
        return pb.ProcessingResponse(response_body=pb.BodyResponse(response=pb.CommonResponse(
            header_mutation=mutation, body_mutation=pb.BodyMutation(body=result.body),
        )))

    def _record_block(self, code: BlockCode, detail: str, size: int) -> None:
        metrics.child(metrics.filter_outcomes, self.plan.proxy, "blocked", code).inc()
        log.warning("response_blocked", decision_id=self.plan.decision_id, proxy=self.plan.proxy,
                    code=code, detail=detail, upstream_bytes=size or None)

    async def respond(self, message: pb.ProcessingRequest) -> pb.ProcessingResponse:
        """:meth:`answer`, timed, and failing closed: an error in here never lets the body through unfiltered."""
        started = time.perf_counter()
        phase = message.WhichOneof("request") or "unknown"
        try:
            response = await self.answer(message)
        except Exception as exc:
            log.exception("extproc_failed", phase=phase, error=f"{type(exc).__name__}: {exc}",
                          decision_id=self.plan.decision_id)
            metrics.child(metrics.filter_outcomes, self.plan.proxy, "blocked", BlockCode.FILTER_ERROR).inc()
            response = blocked(BlockCode.FILTER_ERROR, self.plan.decision_id)
        metrics.child(metrics.extproc_latency, phase).observe(time.perf_counter() - started)
        return response

    def ended(self) -> None:
        """Envoy closed its side of the stream before :attr:`done`."""
        if self.plan.action is Action.BUFFER and not self.body_seen:
            # Either the exchange was cut short (client or upstream reset), or Envoy
            # ignored the mode override (allow_mode_override off) and streamed the body.
            log.warning("filtered_body_not_received", decision_id=self.plan.decision_id, proxy=self.plan.proxy,
                        hint="if this repeats, check allow_mode_override: true on the ext_proc filter")
            metrics.child(metrics.filter_outcomes, self.plan.proxy, "body_not_received", "").inc()


class ProcessingStream:
    """One ext_proc stream with messages as bytes, for the lean gRPC server (:mod:`extauthz.server.grpc_lean`)."""

    __slots__ = ("_exchange",)

    def __init__(self, policy: Policy, shadow: Shadow | None = None) -> None:
        self._exchange = _Exchange(policy, shadow)

    @property
    def done(self) -> bool:
        return self._exchange.done

    async def answer(self, message: bytes) -> bytes:
        response = await self._exchange.respond(pb.ProcessingRequest.FromString(message))
        return bytes(response.SerializeToString())

    def ended(self) -> None:
        self._exchange.ended()


class ExternalProcessorServicer(external_processor_pb2_grpc.ExternalProcessorServicer):  # type: ignore[misc]
    """``envoy.service.ext_proc.v3.ExternalProcessor``; the policy is looked up once per stream (hot reload)."""

    def __init__(self, policy: Callable[[], Policy], shadow: Shadow | None = None) -> None:
        self._policy = policy
        self._shadow = shadow

    def open_stream(self) -> ProcessingStream:
        """A stream for the lean gRPC server: the same exchange as :meth:`Process`, on bytes."""
        return ProcessingStream(self._policy(), self._shadow)

    async def Process(  # noqa: N802 - gRPC method name
        self,
        request_iterator: AsyncIterator[pb.ProcessingRequest],
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> AsyncIterator[pb.ProcessingResponse]:
        exchange = _Exchange(self._policy(), self._shadow)
        async for message in request_iterator:
            yield await exchange.respond(message)
            if exchange.done:
                # End the call with OK now rather than when Envoy closes its side: Envoy has what it needs, and
                # a status sent after Envoy reset the stream leaks grpc.aio's batch (~100 bytes per stream).
                return
        exchange.ended()
