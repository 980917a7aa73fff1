"""The core's :class:`~extauthz.core.rules.RelationshipResolver` over OpenFGA and AuthZEN backends.

For the conditions of one evaluation step (``resolve_all``), in order:

1. fill each condition's templates (a missing or invalid value: unresolved, no call);
2. answer from the in-process cache, unless the condition asks ``HIGHER_CONSISTENCY``;
3. join an identical call already in flight (another request asked the same);
4. answer from Redis, when configured, with one ``MGET`` for all remaining keys;
5. ask the backends: per OpenFGA backend one Check, or one BatchCheck for several
   questions; one evaluation per AuthZEN question; all concurrently;
6. store answers (never failures) in memory and, in the background, in Redis.

In a shadow policy's evaluation (:data:`~extauthz.core.shadow.SHADOW_BUDGET`
set), step 5 is rationed: a condition that would need a call past the budget
is unresolved with cause ``over_budget`` (not logged or counted as a failure;
the shadow records the outcome as undecided).

A failure becomes ``None`` for the rule engine (fail closed) with one
``relationship_unresolved`` log line and metric naming the backend and cause.
Backend calls run in their own task so that when Envoy gives up on one request
(cancelling it), other requests waiting on the same call still get the answer.
``HIGHER_CONSISTENCY`` asks the backend every time (no cache read, no sharing
of a call that may have started before the caller's write) and stores the fresh
answer for everyone else.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import aiohttp
import structlog

from extauthz.core.claims import Claims
from extauthz.core.request import HttpRequest
from extauthz.core.shadow import SHADOW_BUDGET, CallBudget
from extauthz.observability import metrics
from extauthz.policy.model import BackendAuth, Consistency, Policy, Rule
from extauthz.relationships.auth import ClientCredentials, credentials
from extauthz.relationships.authzen import AuthzenClient, AuthzenPlan, EvaluationQuery
from extauthz.relationships.base import Answer, Cause, Failure, Unresolvable
from extauthz.relationships.cache import MemoryCache, SingleFlight
from extauthz.relationships.openfga import CheckQuery, FgaPlan, OpenFgaClient
from extauthz.relationships.redis_cache import RedisCache
from extauthz.relationships.transport import Transport

log = structlog.get_logger("extauthz.relationships")

Query = CheckQuery | EvaluationQuery
_OVER_BUDGET = Failure(Cause.OVER_BUDGET, "the shadow policy's backend calls for this Check are spent")


@dataclass
class _Question:
    """One condition of the step being resolved, and where its answer comes from."""

    rule: Rule
    backend: str
    query: Query | None = None
    answer: Answer | None = None
    wait: asyncio.Future[Answer] | None = None


@dataclass
class _Ask:
    """A question this call sends to a backend, and the future its askers wait on."""

    query: Query
    future: asyncio.Future[Answer]
    shared: bool
    """The future is in the in-flight table (False for HIGHER_CONSISTENCY)."""


@dataclass
class _Fetch:
    fga: dict[str, list[_Ask]] = field(default_factory=dict)
    authzen: dict[str, list[_Ask]] = field(default_factory=dict)

    def add(self, backend: str, ask: _Ask) -> None:
        group = self.fga if isinstance(ask.query, CheckQuery) else self.authzen
        group.setdefault(backend, []).append(ask)

    def __bool__(self) -> bool:
        return bool(self.fga or self.authzen)


class Relationships:
    """Resolves ``fga`` and ``authzen`` rule conditions for one loaded policy."""

    def __init__(
        self, policy: Policy, session: aiohttp.ClientSession,
        memory: MemoryCache | None = None, shared: RedisCache | None = None,
        flight: SingleFlight | None = None,
    ) -> None:
        self.session = session
        settings = policy.relationship_cache
        self.memory = memory if memory is not None else MemoryCache(  # an empty cache is falsy: not `or`
            settings.allowed_ttl_seconds, settings.denied_ttl_seconds, settings.max_entries
        )
        self.shared = shared
        self._flight = flight if flight is not None else SingleFlight()
        self._owns_pools = flight is None
        self._tasks: set[asyncio.Task[None]] = set()
        self._token_clients: list[ClientCredentials] = []
        self.openfga: dict[str, OpenFgaClient] = {}
        for fga in policy.openfga.values():
            self.openfga[fga.name] = OpenFgaClient(fga, self._transport(fga.name, fga.timeout_ms, fga.auth))
        self.authzen: dict[str, AuthzenClient] = {}
        authzen_plans: dict[str, AuthzenPlan] = {}
        for pdp in policy.authzen.values():
            self.authzen[pdp.name] = AuthzenClient(pdp, self._transport(pdp.name, pdp.timeout_ms, pdp.auth))
            authzen_plans[pdp.name] = AuthzenPlan(pdp)
        # Compile every rule's condition now, at load: a request only fills in values.
        self._fga: dict[int, FgaPlan] = {}
        self._authzen: dict[int, AuthzenPlan] = {}
        for proxy in policy.proxies:
            for rule in proxy.rules:
                if rule.fga is not None and rule.fga.backend in policy.openfga:
                    self._fga[id(rule)] = FgaPlan(rule.fga, policy.openfga[rule.fga.backend])
                elif rule.authzen is not None and rule.authzen.backend in authzen_plans:
                    self._authzen[id(rule)] = authzen_plans[rule.authzen.backend]
        self._policy = policy  # keeps the rules alive, so their ids stay valid keys

    @classmethod
    def beside(cls, active: Relationships, policy: Policy) -> Relationships:
        """The shadow policy's resolver: its own rules and clients over the active one's connection pool, caches
        and in-flight calls, so a question both policies ask is asked once. Closing it leaves those to the active."""
        return cls(policy, active.session, active.memory, active.shared, active._flight)

    def _transport(self, name: str, timeout_ms: int, auth: BackendAuth) -> Transport:
        creds = credentials(auth, self.session)
        if isinstance(creds, ClientCredentials):
            self._token_clients.append(creds)
        return Transport(self.session, name, timeout_ms / 1000, creds)

    # --- the RelationshipResolver protocol ------------------------------------

    async def resolve_all(
        self, pending: Sequence[tuple[Rule, Mapping[str, str]]], request: HttpRequest, claims: Claims
    ) -> list[bool | None]:
        questions = [self._question(rule, values, request, claims) for rule, values in pending]
        fetch = _Fetch()
        lookups: list[tuple[_Question, _Ask]] = []
        loop = asyncio.get_running_loop()
        budget = SHADOW_BUDGET.get()  # None but in a shadow evaluation
        # OpenFGA backends this step already asks: one BatchCheck holds every question (shadow evaluations only).
        charged: set[str] | None = set() if budget is not None else None
        for q in questions:
            query = q.query
            if query is None:
                continue
            if isinstance(query, CheckQuery) and query.consistency is Consistency.HIGHER_CONSISTENCY:
                if charged is not None and _over_budget(q, budget, charged):
                    q.answer = _OVER_BUDGET
                    continue
                metrics.child(metrics.relationship_cache, "memory", "bypass").inc()
                q.wait = loop.create_future()
                fetch.add(q.backend, _Ask(query, q.wait, shared=False))
                continue
            cached = self.memory.get(query.key)
            if cached is not None:
                metrics.child(metrics.relationship_cache, "memory", "hit").inc()
                q.answer = cached
                continue
            q.wait = self._flight.join(query.key)
            if q.wait is not None:
                metrics.child(metrics.relationship_cache, "memory", "in_flight").inc()
                continue
            if charged is not None and _over_budget(q, budget, charged):  # a call even if Redis answers it
                q.answer = _OVER_BUDGET
                continue
            metrics.child(metrics.relationship_cache, "memory", "miss").inc()
            q.wait = self._flight.lead(query.key)
            lookups.append((q, _Ask(query, q.wait, shared=True)))
        if lookups:
            await self._from_shared(lookups, fetch)
        if fetch:
            task = asyncio.create_task(self._fetch(fetch))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        answers: list[bool | None] = []
        for q in questions:
            if q.answer is None and q.wait is not None:
                q.answer = await asyncio.shield(q.wait)
            answers.append(self._outcome(q, request))
        return answers

    async def aclose(self) -> None:
        """Cancel lookups still running and wait until they have settled their followers, then close pools."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        for client in self._token_clients:
            await client.aclose()
        if not self._owns_pools:  # the active resolver's pool, Redis client and caches
            return
        if self.shared is not None:
            await self.shared.aclose()
        await self.session.close()

    # --- steps ------------------------------------------------------------------

    def _question(self, rule: Rule, values: Mapping[str, str], request: HttpRequest, claims: Claims) -> _Question:
        condition = rule.fga or rule.authzen
        question = _Question(rule, condition.backend if condition is not None else "")
        try:
            if (fga := self._fga.get(id(rule))) is not None:
                question.query = fga.query(values)
            elif (authzen := self._authzen.get(id(rule))) is not None:
                question.query = authzen.query(request, claims)
            else:
                question.answer = Failure(Cause.NO_BACKEND, "no backend is configured for this condition")
        except Unresolvable as exc:
            question.answer = exc.failure
        return question

    async def _from_shared(self, lookups: list[tuple[_Question, _Ask]], fetch: _Fetch) -> None:
        found: dict[str, tuple[bool, float]] = {}
        if self.shared is not None:
            try:
                found = await self.shared.get_many([ask.query.key for _, ask in lookups])
            except BaseException:
                for _, ask in lookups:  # cancelled while waiting for Redis: release the followers
                    self._flight.finish(ask.query.key, ask.future, Failure(Cause.CANCELLED, "cancelled"))
                raise
        for q, ask in lookups:
            hit = found.get(ask.query.key)
            if hit is None:
                fetch.add(q.backend, ask)
                continue
            value, left = hit
            self.memory.put(ask.query.key, value, left)
            self._flight.finish(ask.query.key, ask.future, value)

    async def _fetch(self, fetch: _Fetch) -> None:
        jobs = [self._ask_openfga(name, asks) for name, asks in fetch.fga.items()]
        jobs += [self._ask_authzen(name, ask) for name, asks in fetch.authzen.items() for ask in asks]
        try:
            for outcome in await asyncio.gather(*jobs, return_exceptions=True):
                if isinstance(outcome, Exception):  # a bug, not a backend failure: fail closed, loudly
                    log.error("relationship_lookup_crashed", error=f"{type(outcome).__name__}: {outcome}")
        finally:
            # Whatever happened (even cancellation at shutdown), nobody waits forever.
            for asks in (*fetch.fga.values(), *fetch.authzen.values()):
                for ask in asks:
                    self._settle(ask, Failure(Cause.CANCELLED, "the lookup was cancelled"))

    async def _ask_openfga(self, name: str, asks: list[_Ask]) -> None:
        queries = [ask.query for ask in asks if isinstance(ask.query, CheckQuery)]
        answers = await self.openfga[name].check_many(queries)
        for ask, answer in zip(asks, answers, strict=True):
            self._settle(ask, answer)

    async def _ask_authzen(self, name: str, ask: _Ask) -> None:
        assert isinstance(ask.query, EvaluationQuery)
        self._settle(ask, await self.authzen[name].evaluate(ask.query))

    def _settle(self, ask: _Ask, answer: Answer) -> None:
        if ask.future.done():
            return
        if ask.shared:
            self._flight.finish(ask.query.key, ask.future, answer)
        else:
            ask.future.set_result(answer)
        if isinstance(answer, bool):  # failures are never cached
            self.memory.put(ask.query.key, answer)
            if self.shared is not None:
                self.shared.put(ask.query.key, answer, self.memory.ttl_for(answer))

    def _outcome(self, q: _Question, request: HttpRequest) -> bool | None:
        answer = q.answer
        if isinstance(answer, bool):
            return answer
        failure = answer if isinstance(answer, Failure) else Failure(Cause.CANCELLED, "no answer")
        if failure is _OVER_BUDGET:
            return None  # the shadow's outcome is recorded as undecided; no backend failed
        metrics.child(metrics.relationship_unresolved, q.backend or "none", failure.cause).inc()
        log.warning("relationship_unresolved", backend=q.backend, cause=failure.cause, detail=failure.detail,
                    rule_index=q.rule.index, request_id=request.request_id)
        return None


def _over_budget(q: _Question, budget: CallBudget | None, charged: set[str]) -> bool:
    """Whether asking ``q`` would take a shadow evaluation past its backend calls (and spend one if not)."""
    if budget is None:
        return False
    if isinstance(q.query, CheckQuery):
        if q.backend in charged:
            return False
        charged.add(q.backend)
    return not budget.take()
