"""The HTTP ext_authz adapter: Envoy's HTTP check request in, an HTTP answer out.

Envoy's ext_authz filter can ask an HTTP service instead of a gRPC one
(``http_service``, shipped as ``envoy/envoy-http.yaml``). Python's gRPC server
costs far more per call than a few hundred bytes of HTTP/1.1 parsed by hand, so
this transport is the cheaper way to run the same decision core: the check
request becomes the same plain :class:`~extauthz.core.request.HttpRequest` the
gRPC adapter builds, :meth:`Authorizer.check` decides, and the
:class:`~extauthz.core.decision.Decision` becomes an HTTP answer. Timing,
counting and logging are shared with the gRPC adapter (:mod:`extauthz.server.checks`).

What Envoy 1.40 sends (``ext_authz_http_impl.cc``, checked against the binary):
the original method and path with its query string on the request line, the
original ``:authority`` as ``host``, the headers ``allowed_headers`` lets
through (all of them in the shipped config), ``content-length: 0`` in place of
the original one, ``x-envoy-internal`` and ``x-envoy-expected-rq-timeout-ms``
for its own hop, and the ``headers_to_add`` of the config. The shipped config
adds, as :data:`CHECK_CONTEXT`, what the gRPC CheckRequest carries and HTTP
cannot: the route's proxy (gRPC's per-route ``context_extensions``, here route
metadata), the original ``:scheme`` and ``content-length``. Its value always
starts with ``proxy=``, so Envoy writes it on every check and a client's copy
is always replaced, even on a route that names no proxy.

How an answer reads to Envoy:

* ``200``: allow. Envoy copies the headers ``allowed_upstream_headers`` matches
  onto the upstream request (the shipped config matches every name and its
  ``decoder_header_mutation_rules`` refuse this answer's own headers), removes
  the request headers listed in ``x-envoy-auth-headers-to-remove`` (after
  setting, so a header is never both), copies :data:`DECISION_ID` to the client
  (``allowed_client_headers_on_success``) and the hand-off and record headers
  into dynamic metadata (``dynamic_metadata_from_headers``) for the response phase.
* ``4xx``: deny; Envoy answers the client with this status, the headers
  ``allowed_client_headers`` names and this body: the same answer as over gRPC.
  The record header goes into dynamic metadata here too (Envoy 1.40 copies
  ``dynamic_metadata_from_headers`` from denials as from allows), so the
  response phase passes Envoy's denial untouched; ``allowed_client_headers``
  should leave it out (an empty list there sends every answer header to the
  client: harmless, it holds the decision id the client gets anyway).
* ``5xx``: Envoy treats it as an error of the auth service, not a denial, and
  answers ``status_on_error`` (503) itself: a 500 or 503 decision reaches the
  client as the config's 503 ``authorization_unavailable``, still never the
  upstream.

Envoy's HTTP client cannot remove query parameters. A token in the query string
that gRPC would strip (docs/policy.md) therefore cannot be kept from the
upstream here, so such a request is denied (:data:`Code.QUERY_TOKEN_REFUSED`, 400)
rather than allowed with the token in its URL.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import cast

import structlog

from extauthz.core.authorizer import Authorizer
from extauthz.core.decision import Code, Decision, new_decision_id
from extauthz.core.handoff import CheckOutcome, CheckRecord
from extauthz.core.request import HttpRequest
from extauthz.eager import run_eagerly
from extauthz.server.checks import NO_REQUEST, failed, record
from extauthz.server.handoff_header import HANDOFF_HEADER, RECORD_HEADER, encode_handoff, record_of
from extauthz.server.http1 import (
    MAX_HEAD_BYTES,
    HeadError,
    RequestHead,
    clean_lines,
    parse_head,
    response,
    safe_fields,
)
from extauthz.server.listener import Listener, close_after_error
from extauthz.server.validation import parse_http_address

log = structlog.get_logger("extauthz.http_authz")

CHECK_CONTEXT = "x-extauthz-check"
"""Set by Envoy's ``headers_to_add``: ``proxy=<route metadata extauthz.proxy>;scheme=<:scheme>;length=<length>``."""
_CHECK_CONTEXT_VALUE = re.compile(r"proxy=([^;]*);scheme=([A-Za-z0-9+.\-]*);length=([0-9]*)")
DECISION_ID = "x-extauthz-decision-id"
REMOVE_HEADERS = "x-envoy-auth-headers-to-remove"
"""Envoy's HTTP client reads the request headers to remove on allow from this answer header."""

MAX_CONNECTIONS = 1024
"""Envoy's default circuit breaker lets a cluster open 1,024 connections; what each may hold is bounded below."""
HEAD_TIMEOUT_SECONDS = 10.0
"""How long a request head may take from its first byte to its last (however it trickles in), and how long a
closing connection's peer gets to read the last answer; Envoy writes a head at once and reads at once."""
IDLE_TIMEOUT_SECONDS = 300.0
"""A connection on which no request starts for this long, none in progress, is closed (docs/transports.md:
Envoy reconnects; the limit is minutes so that closing races with Envoy reusing the connection only rarely)."""
MAX_ANSWERS_PER_TURN = 16
"""Pipelined checks answered at once before the loop runs others: one connection's pile never starves the rest."""

# Headers Envoy's HTTP client writes for its own hop (the gRPC CheckRequest has none of them).
_HOP_HEADERS = ("host", "content-length", "connection", "x-envoy-internal", "x-envoy-expected-rq-timeout-ms")
# This transport's own answer headers: a header of the policy by one of these names could forge them.
_RESERVED = frozenset({"content-length", "content-type", "connection", "keep-alive", "transfer-encoding",
                       DECISION_ID, HANDOFF_HEADER, RECORD_HEADER, REMOVE_HEADERS})
_NO_CONTEXT: Mapping[str, str] = MappingProxyType({})


def to_request(head: RequestHead) -> HttpRequest:
    """The check request as the decision core reads it, header for header as over gRPC.

    Raises :class:`HeadError` when :data:`CHECK_CONTEXT` is not as the shipped
    config writes it (a proxy name it cannot carry, say): a route's proxy is
    never guessed.
    """
    headers = head.headers  # read once, so the hop's own headers are taken out in place
    host = headers.get("host", "")
    for name in _HOP_HEADERS:
        headers.pop(name, None)
    context = _NO_CONTEXT
    check = headers.pop(CHECK_CONTEXT, None)
    if check is not None:
        parsed = _CHECK_CONTEXT_VALUE.fullmatch(check)
        if parsed is None:
            raise HeadError(f"{CHECK_CONTEXT} is not proxy=...;scheme=...;length=...")
        proxy, scheme, length = parsed.groups()
        if proxy:
            context = {"proxy": proxy}
        if scheme:
            headers[":scheme"] = scheme
        if length:
            headers["content-length"] = length
    headers[":authority"] = host
    headers[":method"] = head.method
    headers[":path"] = head.target
    path, _, query = head.target.partition("?")
    return HttpRequest(method=head.method.upper(), path=path, host=host, query_string=query, headers=headers,
                       context=context, request_id=headers.get("x-request-id", ""))


def refuse_query_removal(decision: Decision) -> Decision:
    """An allow that needs a query parameter removed becomes a denial: this transport cannot remove it."""
    if not decision.allowed or not decision.mutations.remove_query_params:
        return decision
    names = ", ".join(decision.mutations.remove_query_params)
    return Decision(False, 400, Code.QUERY_TOKEN_REFUSED,
                    f"allowed ({decision.reason}), but the query parameters {names} would have to be removed "
                    "and the HTTP transport cannot remove query parameters", decision.decision_id,
                    decision.proxy, decision.rule, decision.claims, policy=decision.policy)


def to_response(decision: Decision, head_only: bool = False, close: bool = False) -> bytes:
    """The answer Envoy's HTTP client turns into the same outcome as the gRPC CheckResponse.

    Raises ValueError when a header cannot be written as is (a policy value
    with a line break, a name this transport reserves): the caller denies.
    """
    if decision.allowed:
        return _allow(decision, close)
    # Never 200 (an allow) nor anything Envoy reads as other than a denial or an error.
    status = decision.status if 400 <= decision.status <= 599 else 403
    fields = [("content-type", "application/json"), (DECISION_ID, decision.decision_id),
              (RECORD_HEADER, record_of(decision))]
    if decision.www_authenticate:
        fields.append(("www-authenticate", decision.www_authenticate))
    if not safe_fields([n for n, _ in fields], [v for _, v in fields]):
        raise ValueError("a denial header cannot be written to an HTTP/1.1 answer as is")
    return response(status, fields, decision.body(), head_only=head_only, close=close)


def _allow(decision: Decision, close: bool) -> bytes:
    """A 200 written in one pass (the hot path); every header checked before it is sent."""
    m = decision.mutations
    decision_id = decision.decision_id
    parts = ["HTTP/1.1 200 OK\r\ncontent-length: 0\r\n", DECISION_ID, ": ", decision_id]
    lines = 4
    if decision.metadata:
        parts += ("\r\n", HANDOFF_HEADER, ": ", encode_handoff(decision.metadata), _FILTERED_RECORD, decision_id)
        lines += 1
    else:
        parts += (_ALLOWED_RECORD, decision_id)
    if m.remove_headers:
        if not _removable(m.remove_headers):
            raise ValueError(f"cannot ask Envoy to remove {m.remove_headers}")
        parts += ("\r\n", REMOVE_HEADERS, ": ", ", ".join(m.remove_headers))
        lines += 1
    if m.set_headers:
        if not _settable(tuple([name for name, _ in m.set_headers])):
            raise ValueError(f"the HTTP transport cannot set the upstream headers {[n for n, _ in m.set_headers]}")
        for name, value in m.set_headers:
            parts += ("\r\n", name, ": ", value)
        lines += len(m.set_headers)
    if close:
        parts.append("\r\nconnection: close")
        lines += 1
    parts.append("\r\n\r\n")
    head = "".join(parts).encode()
    # A value with a line break or another control character would split or corrupt the answer.
    if head.count(b"\r\n") != lines + 1 or not clean_lines(head):
        raise ValueError("an upstream header value cannot be written to an HTTP/1.1 answer as is")
    return head


_ALLOWED_RECORD = f"\r\n{RECORD_HEADER}: {CheckRecord(CheckOutcome.ALLOWED, '').encoded()}"
_FILTERED_RECORD = f"\r\n{RECORD_HEADER}: {CheckRecord(CheckOutcome.FILTERED, '').encoded()}"
"""The record's line up to its decision id, which ends it."""


@functools.lru_cache(maxsize=1024)
def _settable(names: tuple[str, ...]) -> bool:
    """Header names a policy sets: tokens, none of this transport's own (cached: they repeat per proxy)."""
    return safe_fields(names, ()) and not _RESERVED.intersection(names)


@functools.lru_cache(maxsize=1024)
def _removable(names: tuple[str, ...]) -> bool:
    return safe_fields(names, ())


_REFUSED = response(400, [("content-type", "application/json")], close=True)
"""The last resort when even a denial cannot be written (a bare 400, no allow)."""


def refused(reason: str) -> Decision:
    return Decision(False, 400, Code.BAD_REQUEST, f"malformed check request: {reason}", new_decision_id())


class HttpAuthorizationServer(Listener["_CheckConnection"]):
    """Envoy's ext_authz ``http_service`` on ``address``; the authorizer is looked up per request (hot reload)."""

    def __init__(self, authorizer: Callable[[], Authorizer], address: str, reuse_port: bool = False) -> None:
        super().__init__(address, parse_http_address(address), reuse_port, MAX_CONNECTIONS)
        self._authorizer = authorizer

    def connection(self) -> _CheckConnection:
        return _CheckConnection(self)

    async def start(self) -> None:
        await super().start()
        log.info("http_authz_listening", address=self.address, port=self.port)

    async def answer(self, head: RequestHead, started: float) -> tuple[bytes, bool]:
        """Decide one check request (the same pipeline, metrics and log line as the gRPC Check).

        Returns the answer and whether the connection closes after it: the peer
        asked to, or the server began stopping while the check ran.
        """
        head_only = head.method == "HEAD"
        request = NO_REQUEST
        try:
            request = to_request(head)
            decision = refuse_query_removal(await self._authorizer().check(request))
            close = head.close or self.stopping
            payload = to_response(decision, head_only, close)
        except HeadError as exc:
            decision, close = refused(str(exc)), True
            payload = to_response(decision, head_only, close)
        except Exception as exc:  # noqa: BLE001 - logged by failed(): any error denies
            decision = failed(exc)
            close = head.close or self.stopping
            payload = to_response(decision, head_only, close)
        record(decision, request, started)
        return payload, close


class _CheckConnection(asyncio.Protocol):
    """One connection from Envoy: one check at a time, in order (pipelined requests wait their turn).

    Envoy never pipelines, but nothing a peer sends may cost unbounded memory,
    stack or time: pipelined heads wait as bytes in the buffer, which is read
    only while it holds less than one head's worth (:data:`MAX_HEAD_BYTES`), so
    it never holds much more than that plus one read; they are answered in a
    loop, :data:`MAX_ANSWERS_PER_TURN` per turn of the event loop; and answers
    the peer does not read stop the answering (and so the reading) until it does.
    One timer per connection keeps its time limits: it is re-armed when it fires,
    from timestamps, so a request costs no timer call.
    """

    def __init__(self, server: HttpAuthorizationServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer: bytes | bytearray = b""
        """What has arrived and is not yet answered: usually one whole head, received in one piece."""
        self._scanned = 0
        """How much of the buffer holds no head end, so a head arriving in pieces is searched once."""
        self.busy = False
        self._reading = True
        self._writable = True
        """False while the peer leaves answers unread (the transport's buffer is over its high-water mark)."""
        self._turn: asyncio.Handle | None = None
        """The next batch of pipelined checks, waiting for the loop's next turn."""
        self._task: asyncio.Task[None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        """When the timer fires (``time.perf_counter``, the clock of the timestamps below)."""
        self._active = 0.0
        """When the last request started, or a check that waited was answered."""
        self._head_since: float | None = None
        """When the incomplete head now at the front of the buffer was first seen."""
        self._closing_since: float | None = None
        self._served = False
        self._lingering = False
        """Refused: the answer is out and the write side closed; nothing more is read as a request."""

    @property
    def buffered(self) -> int:
        """Bytes this connection holds: requests received and not yet answered, answers not yet sent."""
        written = self._transport.get_write_buffer_size() if self._transport is not None else 0
        return len(self._buffer) + written

    @property
    def reading(self) -> bool:
        """Whether the connection takes more bytes from the peer now."""
        return self._reading

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._server.admit(self)
        self._transport = cast(asyncio.Transport, transport)  # a stream transport (uvloop's too)
        self._active = time.perf_counter()
        self._arm(IDLE_TIMEOUT_SECONDS)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        if self._task is not None:  # nobody is left to answer: the check still waiting is cancelled
            self._task.cancel()
            self._task = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._turn is not None:
            self._turn.cancel()
            self._turn = None
        self._buffer, self._scanned = b"", 0

    @property
    def last_active(self) -> float:
        """When a request last started here; never (0) before the first check request."""
        return self._active if self._served else 0.0

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            return  # refused: what still comes is read and dropped until the close
        if not self._buffer:
            self._buffer = data  # the common case: a whole head in one read, used without a copy
        else:
            if isinstance(self._buffer, bytes):
                self._buffer = bytearray(self._buffer)
            self._buffer += data
        if not self.busy and self._turn is None and self._writable:
            self._serve()
        elif len(self._buffer) > MAX_HEAD_BYTES:
            self._pause_reading()  # a pipelining peer waits for answers before it sends more

    def pause_writing(self) -> None:
        self._writable = False

    def resume_writing(self) -> None:
        self._writable = True
        if not self.busy and self._turn is None and self._buffer:
            # Next turn: a transport may call this from inside a write, and serving never nests.
            self._turn = asyncio.get_running_loop().call_soon(self._serve)

    def _serve(self) -> None:
        """Answer the complete heads in the buffer in order, as many as one turn of the loop may take.

        A loop, not a recursion: a check answered at once is followed by the
        next one here, however many are pipelined. One that waits becomes a task,
        and the heads behind it are served from the loop once it is answered.
        """
        self._turn = None
        transport = self._transport
        if transport is None or transport.is_closing() or self.busy or not self._writable:
            return
        buffer, start, scanned = self._buffer, 0, self._scanned
        complete = True  # the buffer holds nothing but whole heads (none at all, at first)
        for _ in range(MAX_ANSWERS_PER_TURN):
            end = buffer.find(b"\r\n\r\n", scanned)
            if end < 0:
                complete = start == len(buffer)
                scanned = max(start, len(buffer) - 3)
                break
            raw, start = bytes(buffer[start:end]), end + 4
            scanned = start
            self._active = started = time.perf_counter()
            try:
                head = parse_head(raw)
            except HeadError as exc:
                self._refuse(str(exc), started)
                return
            self.busy = self._served = True
            # Run the check at once: with a cached token and no relationship lookup it never waits, and then
            # answering here saves a task and a turn of the loop per check. Only a check that waits becomes a task.
            task = run_eagerly(self._answer(head, started))
            if task is not None:
                self._task = task
                break
            if start == len(buffer):  # the common case: one head, answered
                break
            if transport.is_closing():  # the answer said it was the last
                return
            if not self._writable:  # resume_writing() serves the rest
                break
        else:
            if start < len(buffer):
                self._turn = asyncio.get_running_loop().call_soon(self._serve)
        if start:
            buffer = buffer[start:]
            self._buffer = buffer
        self._scanned = scanned - start
        if complete:
            self._head_since = None
        elif self._head_since is None:
            self._head_since = now = time.perf_counter()
            self._fire_by(now + HEAD_TIMEOUT_SECONDS)
        if len(buffer) <= MAX_HEAD_BYTES:
            if not self._reading and not transport.is_closing():
                self._reading = True
                transport.resume_reading()
        elif complete or self.busy or self._turn is not None or not self._writable:
            self._pause_reading()
        else:
            self._refuse(f"request head over {MAX_HEAD_BYTES} bytes")

    async def _answer(self, head: RequestHead, started: float) -> None:
        try:
            payload, close = await self._server.answer(head, started)
        except BaseException:  # cancelled at shutdown: no answer, and no half-answered connection left open
            if self._transport is not None:
                self._transport.abort()
            raise
        self.busy = False
        waited, self._task = self._task is not None, None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(payload)
        if close or self._server.stopping:
            self._close()
        elif waited:
            self._active = time.perf_counter()
            if self._buffer:
                # From the loop, not from this task: the next check runs at once outside any task, as
                # every other does (run inside this ending task, it would take it for its own: eager.py).
                self._turn = asyncio.get_running_loop().call_soon(self._serve)

    def _refuse(self, reason: str, started: float | None = None) -> None:
        """A 400 denial for what is not a check request, then close: nothing after it is read."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        decision = refused(reason)
        record(decision, NO_REQUEST, started if started is not None else time.perf_counter())
        try:
            payload = to_response(decision, close=True)
        except ValueError:
            payload = _REFUSED
        self._buffer, self._scanned = b"", 0
        transport.write(payload)
        self._lingering = True
        close_after_error(transport)

    def _close(self) -> None:
        """Close after what is written is sent; a peer that does not read it is dropped after a while."""
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.close()
        self._closing_since = now = time.perf_counter()
        self._fire_by(now + HEAD_TIMEOUT_SECONDS)

    def _pause_reading(self) -> None:
        if self._reading and self._transport is not None:
            self._reading = False
            self._transport.pause_reading()

    def _arm(self, delay: float) -> None:
        self._due = time.perf_counter() + delay
        self._timer = asyncio.get_running_loop().call_later(delay, self._on_timer)

    def _fire_by(self, when: float) -> None:
        """Make the timer fire no later than ``when`` (it only moves earlier: later limits are kept on firing)."""
        if self._timer is None or self._due > when:
            if self._timer is not None:
                self._timer.cancel()
            self._arm(max(0.0, when - time.perf_counter()))

    def _on_timer(self) -> None:
        """Enforce whichever limit applies now, or wait for the nearest one."""
        self._timer = None
        transport = self._transport
        if transport is None:
            return
        now = time.perf_counter()
        if transport.is_closing():
            since = now if self._closing_since is None else self._closing_since
            if now - since >= HEAD_TIMEOUT_SECONDS:
                transport.abort()  # the peer never read its last answer
            else:
                self._arm(since + HEAD_TIMEOUT_SECONDS - now)
        elif self._head_since is not None:
            left = self._head_since + HEAD_TIMEOUT_SECONDS - now
            if left <= 0:
                self._refuse(f"incomplete request head after {HEAD_TIMEOUT_SECONDS:g} s")
            else:
                self._arm(left)
        elif self.busy or self._turn is not None:
            self._arm(IDLE_TIMEOUT_SECONDS)
        elif now - self._active >= IDLE_TIMEOUT_SECONDS:
            log.debug("http_connection_idle", seconds=IDLE_TIMEOUT_SECONDS)
            if self._writable:
                self._close()
            else:
                transport.abort()  # the peer has not read its answers for all that time
        else:
            self._arm(self._active + IDLE_TIMEOUT_SECONDS - now)

    def quiesce(self) -> None:
        """HTTP/1.1 cannot say "no more" ahead of an answer: an idle connection closes, a busy one after its answer."""
        if not self.busy:
            self._close()

    def evict(self) -> None:
        """Its place is needed (the listener's cap): HTTP/1.1 has no word for it, the connection just ends."""
        self.abort()

    def abort(self) -> None:
        """Past the shutdown grace: drop the connection and the check still running on it."""
        if self._transport is not None:
            self._transport.abort()
        if self._task is not None:
            self._task.cancel()
