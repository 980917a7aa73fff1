"""OpenFGA's Check and BatchCheck over HTTP, and the rule conditions that ask them.

Every request carries the policy's pinned ``authorization_model_id``: OpenFGA then
skips resolving the latest model, and a model change is an explicit policy change
rather than something a write to the store can do behind the sidecar's back.
Bodies follow OpenFGA's published HTTP API description field for field (snake_case
``tuple_key``, ``contextual_tuples.tuple_keys``, ``correlation_id``), and the
tests' local server rejects anything else, so a misspelt field cannot be dropped
silently. An answer is used only if it is exactly the documented shape;
anything else is a :class:`Failure` (unresolved, fail closed).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from extauthz.policy.model import Consistency, FgaCondition, OpenFgaBackend
from extauthz.relationships.base import Answer, Cause, Failure
from extauthz.relationships.templates import JsonRenderer, TupleString, compile_json
from extauthz.relationships.transport import Transport

MAX_CHECKS_PER_BATCH = 50
"""OpenFGA's default ``OPENFGA_MAX_CHECKS_PER_BATCH_CHECK``; larger batches are split."""


@dataclass(frozen=True, slots=True)
class CheckQuery:
    """One filled-in Check: what is sent, and the cache key of everything that can change the answer."""

    user: str
    relation: str
    object: str
    contextual_tuples: tuple[dict[str, Any], ...]
    context: Mapping[str, Any] | None
    consistency: Consistency
    key: str

    def item(self) -> dict[str, Any]:
        """The fields a Check body and a BatchCheckItem share."""
        body: dict[str, Any] = {"tuple_key": {"user": self.user, "relation": self.relation, "object": self.object}}
        if self.contextual_tuples:
            body["contextual_tuples"] = {"tuple_keys": list(self.contextual_tuples)}
        if self.context:
            body["context"] = self.context
        return body


class _TupleTemplate:
    __slots__ = ("condition", "condition_name", "object", "relation", "user")

    def __init__(self, user: TupleString, relation: TupleString, obj: TupleString,
                 condition_name: str | None, condition: JsonRenderer | None) -> None:
        self.user, self.relation, self.object = user, relation, obj
        self.condition_name, self.condition = condition_name, condition

    def render(self, values: Mapping[str, str]) -> dict[str, Any]:
        key: dict[str, Any] = {
            "user": self.user.render(values), "relation": self.relation.render(values),
            "object": self.object.render(values),
        }
        if self.condition_name is not None:
            condition: dict[str, Any] = {"name": self.condition_name}
            if self.condition is not None:
                condition["context"] = self.condition(values)
            key["condition"] = condition
        return key


class FgaPlan:
    """A rule's ``fga`` condition compiled once per loaded policy; ``query`` fills it per request."""

    def __init__(self, condition: FgaCondition, backend: OpenFgaBackend) -> None:
        self.backend = backend
        self.consistency = condition.consistency
        self._user = TupleString(condition.user)
        self._relation = TupleString(condition.relation)
        self._object = TupleString(condition.obj)
        self._tuples = tuple(
            _TupleTemplate(
                TupleString(t.user), TupleString(t.relation), TupleString(t.obj),
                str(t.condition["name"]) if t.condition is not None else None,
                compile_json(t.condition["context"]) if t.condition is not None and "context" in t.condition
                else None,
            )
            for t in condition.contextual_tuples
        )
        self._context = compile_json(condition.context)
        self._key_prefix = orjson.dumps([backend.url, backend.store_id, backend.authorization_model_id])

    def query(self, values: Mapping[str, str]) -> CheckQuery:
        """The Check for these variable values; raises Unresolvable if a value is missing or invalid."""
        user = self._user.render(values)
        relation = self._relation.render(values)
        obj = self._object.render(values)
        # Order does not change OpenFGA's answer, so it does not split the cache either.
        tuples = tuple(sorted((t.render(values) for t in self._tuples), key=_canonical))
        context = self._context(values) or None
        digest = hashlib.blake2b(self._key_prefix, digest_size=16)
        digest.update(orjson.dumps([user, relation, obj, tuples, context], option=orjson.OPT_SORT_KEYS))
        return CheckQuery(user, relation, obj, tuples, context, self.consistency, "fga:" + digest.hexdigest())


def _canonical(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


class OpenFgaClient:
    """Check / BatchCheck against one store and pinned model."""

    def __init__(self, backend: OpenFgaBackend, transport: Transport) -> None:
        self.backend = backend
        self.transport = transport
        base = f"{backend.url}/stores/{backend.store_id}"
        self._check_url = f"{base}/check"
        self._batch_url = f"{base}/batch-check"

    async def check(self, query: CheckQuery) -> Answer:
        body = query.item()
        body["authorization_model_id"] = self.backend.authorization_model_id
        if query.consistency is not Consistency.UNSPECIFIED:
            body["consistency"] = query.consistency.value
        answer = await self.transport.post(self._check_url, body, "check")
        if isinstance(answer, Failure):
            return answer
        allowed = answer.get("allowed") if isinstance(answer, dict) else None
        if not isinstance(allowed, bool):
            return Failure(Cause.MALFORMED, "check answer has no boolean 'allowed'")
        return allowed

    async def check_many(self, queries: Sequence[CheckQuery]) -> list[Answer]:
        """Several checks in as few round trips as possible: one Check, or BatchCheck per consistency."""
        if len(queries) == 1:
            return [await self.check(queries[0])]
        groups: dict[Consistency, list[int]] = {}
        for i, query in enumerate(queries):
            groups.setdefault(query.consistency, []).append(i)
        calls = []
        for consistency, indexes in groups.items():
            for start in range(0, len(indexes), MAX_CHECKS_PER_BATCH):
                chunk = indexes[start:start + MAX_CHECKS_PER_BATCH]
                calls.append((chunk, self._batch([queries[i] for i in chunk], consistency)))
        results: list[Answer] = [Failure(Cause.MALFORMED)] * len(queries)
        answers = await asyncio.gather(*(call for _, call in calls))
        for (chunk, _), chunk_answers in zip(calls, answers, strict=True):
            for i, answer in zip(chunk, chunk_answers, strict=True):
                results[i] = answer
        return results

    async def _batch(self, queries: Sequence[CheckQuery], consistency: Consistency) -> list[Answer]:
        if len(queries) == 1:
            return [await self.check(queries[0])]
        checks = []
        for i, query in enumerate(queries):
            item = query.item()
            item["correlation_id"] = f"c{i}"
            checks.append(item)
        body: dict[str, Any] = {"checks": checks, "authorization_model_id": self.backend.authorization_model_id}
        if consistency is not Consistency.UNSPECIFIED:
            body["consistency"] = consistency.value
        answer = await self.transport.post(self._batch_url, body, "batch-check")
        if isinstance(answer, Failure):
            return [answer] * len(queries)
        result = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(result, dict):
            return [Failure(Cause.MALFORMED, "batch-check answer has no 'result' object")] * len(queries)
        return [_batch_item(result.get(f"c{i}")) for i in range(len(queries))]


def _batch_item(item: object) -> Answer:
    """One BatchCheckSingleResult: ``allowed`` counts only when ``error`` is empty."""
    if not isinstance(item, dict):
        return Failure(Cause.MALFORMED, "batch-check answer lacks a correlation id it was asked")
    error = item.get("error")
    if error is not None:
        if not isinstance(error, dict):
            return Failure(Cause.MALFORMED, "batch-check item has a malformed 'error'")
        codes = {error.get("input_error", "no_error"), error.get("internal_error", "no_internal_error")}
        if error.get("message") or not codes <= {"no_error", "no_internal_error", None}:
            text = ": ".join(str(v) for v in error.values() if v)[:200]
            return Failure(Cause.ITEM_ERROR, f"batch-check item error ({text})")
    allowed = item.get("allowed")
    if not isinstance(allowed, bool):
        return Failure(Cause.MALFORMED, "batch-check item has no boolean 'allowed'")
    return allowed
