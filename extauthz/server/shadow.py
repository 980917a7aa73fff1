"""The shadow policy: a candidate evaluated beside the active policy on live traffic, never deciding.

``server.shadow.file`` names the candidate (for instance a second key of the
policy's ConfigMap). It is loaded with every check the active policy gets,
watched and reloaded on its own, and a candidate that does not load is
reported and never touches the active policy; an active reload keeps the
candidate (rebound to the new runtime).

**Never in the way of an answer.** The active authorizer shows each decision
to :meth:`Shadow.observe`, which only queues it; the queue is worked off in a
later turn of the event loop, after the answer has been written. A Check the
candidate cannot decide without waiting (keys, relationship lookups) goes on in
a task of its own. At most :data:`MAX_PENDING` evaluations wait at once; past
that they are skipped and counted (``extauthz_shadow_skipped_total{reason="busy"}``).

**Shared, not doubled.** The candidate reads the active verifier's cache of
verified tokens for every provider it declares identically and borrows that
provider's key set (no second JWKS fetch); a provider it changes gets its own.
Relationship conditions go through the active resolver's connection pool,
caches and in-flight calls, with a budget: one backend call per Check
(:data:`~extauthz.core.shadow.EXTRA_BACKEND_CALLS`); a Check that needs more is
recorded as ``undecided`` rather than waited for.

**What is recorded.** Every evaluation counts in
``extauthz_shadow_decisions_total{proxy, active, shadow}`` (the two codes), so
the agreement rate is a PromQL division; each difference is one
``shadow_diff`` log line. A Check that a filter covers under one policy only is
a ``scope`` difference of the response phase. A sample of filtered responses
(``responseSampleRate``) is also filtered by the candidate, off the answer's
path, and a different body is counted and logged (``shadow_response_diff``).
With ``serve --workers``, a response whose Check went to another worker has no
candidate hand-off there and is not compared.
"""

from __future__ import annotations

import asyncio
import collections
import functools
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import httpx
import structlog

from extauthz.core.authorizer import FILTERED, Authorizer, Verified
from extauthz.core.claims import ANONYMOUS, Claims
from extauthz.core.decision import Decision
from extauthz.core.handoff import Handoff
from extauthz.core.request import HttpRequest
from extauthz.core.rules import NoRelationships, RelationshipResolver
from extauthz.core.shadow import SHADOW_BUDGET, UNDECIDED, CallBudget, Outcome, differ
from extauthz.eager import run_for_value
from extauthz.filtering.codec import Unfilterable, decode, parse
from extauthz.filtering.engine import apply_filters
from extauthz.filtering.scope import Action, ResponseHead, ResponsePlan, plan_response
from extauthz.identity.verifier import TokenCache, Verifier
from extauthz.observability import metrics
from extauthz.observability.logging import log_info
from extauthz.policy.errors import PolicyError
from extauthz.policy.model import Policy, Proxy, ShadowSettings, TokenSource
from extauthz.server.reload import PolicyWatcher, ReloadOutcome, ReloadReport, now
from extauthz.server.validation import load_for_serving

if TYPE_CHECKING:
    from extauthz.server.runtime import Runtime

log = structlog.get_logger("extauthz.shadow")

MAX_PENDING = 256
"""Shadow evaluations queued or waiting at once; each holds one request and its active decision."""
MAX_HELD_BYTES = 16 << 20
"""Response bodies held for comparison at once (each up to ``server.maxBodyBytes``); past it, skipped as busy."""
MAX_SAMPLED_HANDOFFS = 1024
"""Candidate hand-offs kept for the response phase (oldest dropped): responses usually follow within seconds."""
_CLOSING = "close-shadow-candidate"
DRAIN_SECONDS = 0.002
"""How long queued evaluations wait to be worked off together: one turn of the loop per batch, not per Check."""
RETIRE_SECONDS = 30.0
"""A replaced candidate is closed this long after: evaluations that waited for a backend may still use it."""
_OFFLOAD_BYTES = 64 * 1024
"""Bodies above this are filtered by the candidate on a worker thread, as the active filter does."""


class CandidateVerifier:
    """The candidate's token check: the active cache where the provider is the same, else its own verifier.

    A token the active verifier has verified for a provider the candidate declares
    identically is valid for the candidate too (same issuer, audiences, keys,
    limits): reading the cache costs a hash, never a second signature check. The
    read is :meth:`~extauthz.identity.verifier.TokenCache.peek`, so the cache's
    hit-rate metric and eviction order stay the active policy's.
    """

    def __init__(self, active: TokenCache, own: Verifier, same: frozenset[str]) -> None:
        self._active = active
        self._own = own
        self._same = same

    async def verify(self, token: str, trusted: Iterable[str]) -> Claims:
        trusted = tuple(trusted)
        claims = self._active.peek(TokenCache.key(token))
        if claims is not None and claims.provider in trusted and claims.provider in self._same:
            return claims
        return await self._own.verify(token, trusted)


@dataclass(eq=False)  # identity: a retired candidate is a key until it is closed
class Candidate:
    """A loaded candidate policy bound to one active runtime: its authorizer and what it owns."""

    policy: Policy
    authorizer: Authorizer
    verifier: Verifier
    relationships: RelationshipResolver
    reuse: Mapping[tuple[str, str], frozenset[str]]
    """(active proxy, provider) -> the candidate's proxies that find the same token and trust that provider,
    declared identically: the active policy's verified claims hold for them as they are."""

    @property
    def relationships_used(self) -> bool:
        return not isinstance(self.relationships, NoRelationships)

    def verified(self, active: Decision) -> Verified | None:
        claims = active.claims
        if claims is ANONYMOUS:
            return None
        proxies = self.reuse.get((active.proxy, claims.provider))
        return Verified(claims, proxies) if proxies else None

    @classmethod
    async def bind(cls, policy: Policy, runtime: Runtime, http: httpx.AsyncClient, sample_rate: float) -> Candidate:
        active = runtime.policy
        same = {name: runtime.verifier.keysets[name] for name, provider in policy.providers.items()
                if active.providers.get(name) == provider}
        settings = policy.server
        own = Verifier(policy.providers, http, TokenCache(settings.token_cache_size, settings.token_cache_ttl_seconds),
                       metrics.record_jwks_fetch, borrowed=same)
        await own.start()
        try:
            if not own.ready:
                missing = [n for n, k in own.keysets.items() if not k.ready]
                raise ShadowUnavailable(f"provider(s) {', '.join(missing)} of the candidate have no signing keys")
            relationships = await _relationships(policy, runtime)
        except BaseException:
            await own.close()
            raise
        verifier = CandidateVerifier(runtime.verifier.cache, own, frozenset(same))
        authorizer = Authorizer(policy, verifier, relationships, judge_only=_Sampler(sample_rate))
        return cls(policy, authorizer, own, relationships, _reuse(active, policy, frozenset(same)))

    async def close(self) -> None:
        await self.verifier.close()
        await self.relationships.aclose()


def _reuse(active: Policy, candidate: Policy, same: frozenset[str]) -> Mapping[tuple[str, str], frozenset[str]]:
    """Where the active policy's verified claims hold for the candidate's proxies (see :attr:`Candidate.reuse`)."""

    def sources(policy: Policy, proxy: Proxy) -> tuple[TokenSource, ...]:
        return tuple(s for name in proxy.providers for s in policy.providers[name].sources)

    found: dict[tuple[str, str], frozenset[str]] = {}
    for theirs in active.proxies:
        for provider in set(theirs.providers) & same:
            found[(theirs.name, provider)] = frozenset(
                mine.name for mine in candidate.proxies
                if provider in mine.providers and sources(candidate, mine) == sources(active, theirs))
    return MappingProxyType(found)


async def _relationships(policy: Policy, runtime: Runtime) -> RelationshipResolver:
    """The candidate's resolver, over the active one's pool and caches when the active policy has backends too."""
    if not policy.openfga and not policy.authzen:
        return NoRelationships()
    from extauthz.relationships import build_resolver
    from extauthz.relationships.resolver import Relationships

    active = runtime.authorizer.relationships
    if isinstance(active, Relationships):
        return Relationships.beside(active, policy)
    return await build_resolver(policy)


class _Sampler:
    """Exactly ``rate`` of the Checks a candidate's filter applies to, evenly spread (no randomness to explain)."""

    __slots__ = ("_credit", "_rate")

    def __init__(self, rate: float) -> None:
        self._rate = rate
        self._credit = 0.0

    def __call__(self) -> bool:
        self._credit += self._rate
        if self._credit >= 1.0:
            self._credit -= 1.0
            return True
        return False


class ShadowUnavailable(Exception):
    """The candidate is valid but cannot run yet (its own provider's keys could not be loaded)."""


@dataclass(frozen=True)
class _Sample:
    """What the candidate would hand its response phase for one sampled Check."""

    handoff: Handoff
    candidate: Candidate


class _Counts:
    __slots__ = ("checks", "differences", "response_differences", "responses", "skipped", "undecided")

    def __init__(self) -> None:
        self.checks = self.differences = self.undecided = self.skipped = 0
        self.responses = self.response_differences = 0


class Shadow:
    """One process's shadow policy: the loaded candidate, its evaluations, what they found."""

    def __init__(self, http: httpx.AsyncClient) -> None:
        self._http = http
        self.settings: ShadowSettings | None = None
        self.candidate: Candidate | None = None
        self.loaded_at = ""
        self.last_reload: ReloadReport | None = None
        self.counts = _Counts()
        self._queue: collections.deque[tuple[Candidate, HttpRequest, Decision]] = collections.deque()
        self._tally: dict[tuple[str, str, str], int] = {}
        self._held_bytes = 0
        self._draining = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._samples: collections.OrderedDict[str, _Sample] = collections.OrderedDict()
        self._retired: dict[Candidate, asyncio.TimerHandle] = {}
        self._watch_interval = 0.0
        self._reload_callback: Callable[[], Awaitable[ReloadOutcome]] | None = None
        self._watcher: PolicyWatcher | None = None

    @property
    def digest(self) -> str:
        return self.candidate.policy.digest if self.candidate is not None else ""

    # --- loading -----------------------------------------------------------------------------------

    async def configure(self, settings: ShadowSettings | None, runtime: Runtime) -> None:
        """Follow the active policy's ``server.shadow`` with ``runtime`` about to serve; never raises.

        The same file keeps the candidate already loaded (rebound to the new
        runtime); another file, or none, replaces it.
        """
        same_file = (settings is not None and self.settings is not None and settings.file == self.settings.file
                     and self.candidate is not None)
        self.settings = settings
        if settings is None:
            if self.candidate is not None:
                self._retire(self.candidate)
                self.candidate = None
                metrics.shadow_info.clear()
            await self._stop_watching()
            return
        dropped = False
        if same_file:
            assert self.candidate is not None
            if not (await self._install(self.candidate.policy, runtime)).ok:
                dropped = True
                # Bound to a runtime about to be replaced, it would judge nothing: off until the watcher loads
                # it again for the new one (the failure is shown on /readyz meanwhile).
                self._retire(self.candidate)
                self.candidate = None
        else:
            await self._load(runtime)
        self._watch()
        if dropped and self._watcher is not None:
            self._watcher.recheck()

    async def reload(self, runtime: Runtime) -> ReloadOutcome:
        """The candidate file changed: load it for ``runtime``; a failure keeps the candidate that runs."""
        if self.settings is None:
            return ReloadOutcome.UNCHANGED
        return await self._load(runtime)

    async def _load(self, runtime: Runtime) -> ReloadOutcome:
        assert self.settings is not None
        path = self.settings.file
        try:
            policy = await asyncio.to_thread(load_for_serving, path, shape_in_child=True)
        except PolicyError as exc:
            return self._refused(ReloadOutcome.INVALID, "", [str(i) for i in exc.issues])
        if self.candidate is not None and policy.digest == self.candidate.policy.digest:
            if self.last_reload is not None and not self.last_reload.outcome.ok:
                self.last_reload = ReloadReport(ReloadOutcome.UNCHANGED, now(), policy.digest)
                metrics.shadow_rejected.set(0)
            return ReloadOutcome.UNCHANGED
        outcome = await self._install(policy, runtime)
        if outcome is ReloadOutcome.RELOADED:
            log.info("shadow_policy_loaded", file=path, digest=policy.digest, active=runtime.policy.digest,
                     note="evaluated beside the active policy; the active policy decides"
                     + ("; its server settings are not used" if policy.server.shadow or policy.server.tls else ""))
        return outcome

    async def _install(self, policy: Policy, runtime: Runtime) -> ReloadOutcome:
        assert self.settings is not None
        try:
            candidate = await Candidate.bind(policy, runtime, self._http, self.settings.response_sample_rate)
        except ShadowUnavailable as exc:
            return self._refused(ReloadOutcome.UNAVAILABLE, policy.digest, [str(exc)])
        except Exception as exc:  # noqa: BLE001 - a candidate that cannot be built never affects the active one
            return self._refused(ReloadOutcome.INVALID, policy.digest, [f"{type(exc).__name__}: {exc}"])
        old, self.candidate = self.candidate, candidate
        runtime.authorizer.observer = self.observe
        if old is not None and old.policy.digest == policy.digest:
            self._retire(old)
            return ReloadOutcome.UNCHANGED  # rebound for a new active runtime: not a new candidate
        self._retire(old)
        self.loaded_at = now()
        self.last_reload = ReloadReport(ReloadOutcome.RELOADED, self.loaded_at, policy.digest)
        if old is not None:
            metrics.shadow_info.clear()
        metrics.shadow_info.labels(policy.digest).set(1)
        metrics.shadow_rejected.set(0)
        metrics.shadow_reloads.labels("ok").inc()
        return ReloadOutcome.RELOADED

    def _refused(self, outcome: ReloadOutcome, digest: str, errors: list[str]) -> ReloadOutcome:
        assert self.settings is not None
        self.last_reload = ReloadReport(outcome, now(), digest, tuple(errors))
        metrics.shadow_reloads.labels(outcome.value).inc()
        metrics.shadow_rejected.set(1)
        log.error("shadow_policy_rejected", file=self.settings.file, result=outcome.value, errors=errors,
                  rejected_digest=digest or None, keeping_digest=self.digest or None,
                  detail="the active policy is not affected")
        return outcome

    def _retire(self, old: Candidate | None) -> None:
        """Close a replaced candidate once the evaluations that may still use it are done (or at shutdown)."""
        if old is not None:
            self._retired[old] = asyncio.get_running_loop().call_later(RETIRE_SECONDS, self._close_retired, old)

    def _close_retired(self, old: Candidate) -> None:
        self._retired.pop(old, None)
        self._spawn(old.close(), _CLOSING)

    def watch(self, interval: float, reload: Callable[[], Awaitable[ReloadOutcome]]) -> None:
        """Poll the candidate file every ``interval`` seconds (0: never); ``reload`` is the holder's, under its lock."""
        self._watch_interval = interval
        self._reload_callback = reload
        self._watch()

    def _watch(self) -> None:
        if self._watch_interval <= 0 or self.settings is None or self._reload_callback is None:
            return
        path = Path(self.settings.file)
        if self._watcher is not None and self._watcher.path == path:
            return
        if self._watcher is not None:
            self._spawn(self._watcher.stop())
        self._watcher = PolicyWatcher(path, self._reload_callback, lambda: self.digest, self._watch_interval,
                                      name="shadow-policy-watcher")
        self._watcher.start()

    async def _stop_watching(self) -> None:
        if self._watcher is not None:
            watcher, self._watcher = self._watcher, None
            await watcher.stop()

    # --- the Check phase ---------------------------------------------------------------------------

    def observe(self, request: HttpRequest, decision: Decision) -> None:
        """The active authorizer's observer: queue the candidate's evaluation for after the answer."""
        candidate = self.candidate
        if candidate is None:
            return
        if len(self._queue) + len(self._tasks) >= MAX_PENDING:
            self.counts.skipped += 1
            metrics.child(metrics.shadow_skipped, "busy").inc()
            return
        self._queue.append((candidate, request, decision))
        if not self._draining:
            self._draining = True
            asyncio.get_running_loop().call_later(DRAIN_SECONDS, self._drain)

    def _drain(self) -> None:
        """Evaluate what was queued, each up to its end or its first wait (which continues as a task).

        Most evaluations never wait, so no task or coroutine wrapper is made for
        them; their counts reach Prometheus once per batch (:meth:`_flush`).
        """
        self._draining = False
        queue = self._queue
        while queue:
            candidate, request, active = queue.popleft()
            budget = CallBudget() if candidate.relationships_used else None
            reset = SHADOW_BUDGET.set(budget) if budget is not None else None
            try:
                result = run_for_value(candidate.authorizer.judge(request, active.decision_id,
                                                                  candidate.verified(active)))
            except Exception as exc:  # noqa: BLE001 - the candidate's failure is counted, never raised into serving
                self._failed(active, exc)
                continue
            finally:
                if reset is not None:
                    SHADOW_BUDGET.reset(reset)
            if isinstance(result, asyncio.Task):
                self._tasks.add(result)
                result.add_done_callback(self._tasks.discard)
                result.add_done_callback(functools.partial(self._finished, candidate, request, active, budget))
            else:
                self._record(candidate, request, active, None if budget is not None and budget.exceeded else result)
        self._flush()

    def _finished(self, candidate: Candidate, request: HttpRequest, active: Decision, budget: CallBudget | None,
                  task: asyncio.Task[Decision]) -> None:
        """An evaluation that had to wait (keys, a relationship backend) has ended."""
        if task.cancelled():
            return
        error = task.exception()
        if isinstance(error, Exception):
            self._failed(active, error)
            return
        self._record(candidate, request, active, None if budget is not None and budget.exceeded else task.result())
        self._flush()

    def _failed(self, active: Decision, exc: BaseException) -> None:
        self.counts.skipped += 1
        metrics.child(metrics.shadow_skipped, "error").inc()
        log.error("shadow_check_failed", decision_id=active.decision_id, error=f"{type(exc).__name__}: {exc}")

    def _flush(self) -> None:
        """The decision counts of the batch into Prometheus: one increment per pair of codes, not per Check."""
        for (proxy, theirs, mine), n in self._tally.items():
            metrics.child(metrics.shadow_decisions, proxy, theirs, mine).inc(n)
        self._tally.clear()

    def _record(self, candidate: Candidate, request: HttpRequest, active: Decision, shadow: Decision | None) -> None:
        """Count one evaluation; only a difference costs more than a counter (most Checks agree)."""
        counts = self.counts
        counts.checks += 1
        key = (active.proxy, active.code, shadow.code if shadow is not None else UNDECIDED)
        self._tally[key] = self._tally.get(key, 0) + 1
        if shadow is None:
            counts.undecided += 1
            return
        if differ(active, shadow):
            counts.differences += 1
            metrics.child(metrics.shadow_differences, active.proxy, active.code, shadow.code).inc()
            log_info("shadow_diff", {
                "decision_id": active.decision_id, "proxy": active.proxy or shadow.proxy,
                "method": request.method, "path": request.path, "sub": active.sub or shadow.sub,
                "active": _described(Outcome.of(active)), "shadow": _described(Outcome.of(shadow)),
                "active_policy": active.policy, "shadow_policy": candidate.policy.digest})
        elif bool(active.metadata) != bool(shadow.metadata):
            counts.response_differences += 1
            metrics.child(metrics.shadow_responses, active.proxy, "scope").inc()
            log_info("shadow_response_diff", {
                "decision_id": active.decision_id, "proxy": active.proxy, "method": request.method,
                "path": request.path, "sub": active.sub, "kind": "scope",
                "detail": "a response filter applies under the " + ("candidate" if shadow.metadata else "active")
                          + " policy only"})
        elif active.metadata and shadow.metadata is not FILTERED:  # a sampled hand-off, for the response phase
            handoff = Handoff.from_metadata(shadow.metadata)
            if handoff is not None:
                self._samples[active.decision_id] = _Sample(handoff, candidate)
                if len(self._samples) > MAX_SAMPLED_HANDOFFS:
                    self._samples.popitem(last=False)

    # --- the response phase ------------------------------------------------------------------------

    def compare_response(self, plan: ResponsePlan, head: ResponseHead, body: bytes, complete: bool) -> None:
        """A filtered response the active policy has answered: compare the candidate's view of it, if sampled.

        Called once the active answer is built; the comparison runs later, and
        only for Checks whose candidate hand-off was kept.
        """
        if self.candidate is None or not complete:
            return
        if plan.decision_id not in self._samples and not self._queue:
            return  # not sampled: its Check was evaluated already (nothing queued could still add it)
        if len(self._tasks) >= MAX_PENDING or self._held_bytes + len(body) > MAX_HELD_BYTES:
            self.counts.skipped += 1
            metrics.child(metrics.shadow_skipped, "busy").inc()
            return
        self._held_bytes += len(body)
        self._spawn(self._compare(plan, head, body))

    async def _compare(self, plan: ResponsePlan, head: ResponseHead, body: bytes) -> None:
        try:
            await self._compare_held(plan, head, body)
        finally:
            self._held_bytes -= len(body)

    async def _compare_held(self, plan: ResponsePlan, head: ResponseHead, body: bytes) -> None:
        if self._queue:
            self._drain()  # the candidate's evaluation of this response's Check may still be queued
        sample = self._samples.pop(plan.decision_id, None)
        if sample is None:
            return
        theirs = plan_response(sample.candidate.policy, sample.handoff, head)
        try:
            if len(body) > _OFFLOAD_BYTES:
                active, shadow = await asyncio.to_thread(_both_views, plan, theirs, body)
            else:
                active, shadow = _both_views(plan, theirs, body)
        except Unfilterable:
            return  # the active answer blocked it already; nothing reached the client to compare with
        self.counts.responses += 1
        if active == shadow:
            metrics.child(metrics.shadow_responses, plan.proxy, "same").inc()
            return
        self.counts.response_differences += 1
        metrics.child(metrics.shadow_responses, plan.proxy, "different").inc()
        log_info("shadow_response_diff", {
            "decision_id": plan.decision_id, "proxy": plan.proxy, "kind": "body", "status": head.status,
            "active_filters": [b.filter.index for b in plan.filters],
            "shadow_filters": [b.filter.index for b in theirs.filters] if theirs.action is Action.BUFFER else [],
            "shadow_action": theirs.action.value, "active_values": _size(active), "shadow_values": _size(shadow)})

    # --- status and lifecycle ----------------------------------------------------------------------

    def status(self) -> dict[str, Any] | None:
        """/readyz and the admin service: what runs as the candidate and how often it agrees."""
        if self.settings is None:
            return None
        c = self.counts
        decided = c.checks - c.undecided
        return {
            "file": self.settings.file, "digest": self.digest or None, "loadedAt": self.loaded_at or None,
            "checks": c.checks, "differences": c.differences, "undecided": c.undecided, "skipped": c.skipped,
            "agreement": round(1 - c.differences / decided, 6) if decided else None,
            "responsesCompared": c.responses, "responseDifferences": c.response_differences,
            "lastReload": self.last_reload.as_json() if self.last_reload else None,
        }

    def _spawn(self, coroutine: Any, name: str | None = None) -> None:
        task = asyncio.get_running_loop().create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        await self._stop_watching()
        self._queue.clear()
        for old, timer in list(self._retired.items()):
            timer.cancel()
            self._close_retired(old)
        for task in list(self._tasks):
            if task.get_name() != _CLOSING:
                task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.candidate is not None:
            await self.candidate.close()
            self.candidate = None


def _described(outcome: Outcome) -> dict[str, Any]:
    return {"status": outcome.status, "code": outcome.code, "rule": outcome.rule, "reason": outcome.reason,
            "filtered": outcome.filtered}


def _both_views(active: ResponsePlan, candidate: ResponsePlan, body: bytes) -> tuple[Any, Any]:
    """The document each policy would let the client see (the candidate's ``None`` if it would block it)."""
    document, _ = parse(decode(body, active.encodings, active.limit))
    mine = apply_filters(active.filters, document)
    if candidate.action is Action.BUFFER:
        return mine, apply_filters(candidate.filters, document)
    if candidate.action is Action.BLOCK:
        return mine, None
    return mine, document


def _size(document: Any) -> int:
    """Values in a JSON document (leaves and containers): how much each policy lets through, in one number.

    Iterative: a document may be nested as deep as the parser allows.
    """
    count, stack = 0, [document]
    while stack:
        value = stack.pop()
        if value is None:
            continue
        count += 1
        if isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list):
            stack.extend(value)
    return count
