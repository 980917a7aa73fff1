"""Answer caching, proven by counting the calls that reach the backend.

In process: separate TTLs for allowed and denied answers, errors never cached,
HIGHER_CONSISTENCY bypassing the cache, keys that cover contextual tuples and
context, a size bound, and concurrent identical checks sharing one call. Shared:
a real Redis lets a second replica answer without a call, keeps entries no
longer than their TTL, and going away (mid-test) never fails a check.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
import redis

from extauthz.relationships.cache import MemoryCache
from tests.openfga_server import OpenFgaServer, Scripted, policy_document, resolver_for
from tests.redis_server import RedisServer, private_redis

pytestmark = pytest.mark.usefixtures("fga_spec_clean")  # fga: tests/conftest.py


def rule(relation: str = "viewer", **extra: Any) -> dict[str, Any]:
    fga: dict[str, Any] = {"user": "user:{{sub}}", "relation": relation, "object": "journey:{{journeyId}}", **extra}
    return {"effect": "allow", "variables": [{"name": "journeyId", "source": "pathSegment", "index": 2}],
            "fga": fga}


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_allowed_and_denied_answers_expire_after_their_own_ttl(fga: OpenFgaServer) -> None:
    doc = policy_document([rule("viewer"), rule("can_delete")], [fga.backend()],
                          cache={"allowedTtlSeconds": 10, "deniedTtlSeconds": 2})
    clock = Clock()

    async def run() -> list[tuple[bool | None, bool | None, int]]:
        async with resolver_for(doc) as h:
            h.resolver.memory = MemoryCache(10, 2, 1000, clock)
            seen = []
            for now in (1000.0, 1001.0, 1003.0, 1011.0):
                clock.now = now
                viewer = await h.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"})
                delete = await h.ask(1, {"journeyId": "roadmap"}, {"sub": "bob"})
                seen.append((viewer, delete, len(fga.calls)))
            return seen

    assert asyncio.run(run()) == [
        (True, False, 2),   # both asked
        (True, False, 2),   # both cached
        (True, False, 3),   # the denied answer expired after 2 s, the allowed one did not
        (True, False, 5),   # both expired
    ]


def test_a_zero_ttl_does_not_cache_that_kind_of_answer(fga: OpenFgaServer) -> None:
    doc = policy_document([rule("can_delete")], [fga.backend()],
                          cache={"allowedTtlSeconds": 10, "deniedTtlSeconds": 0})

    async def run() -> None:
        async with resolver_for(doc) as h:
            for _ in range(3):
                assert await h.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}) is False

    asyncio.run(run())
    assert len(fga.calls) == 3


def test_errors_are_never_cached(fga: OpenFgaServer) -> None:
    fga.then(Scripted(500), Scripted(500))
    doc = policy_document([rule()], [fga.backend()])

    async def run() -> list[bool | None]:
        async with resolver_for(doc) as h:
            return [await h.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}) for _ in range(3)]

    assert asyncio.run(run()) == [None, True, True]
    assert len(fga.calls) == 3  # two failed attempts, then one answer that the third ask reused


def test_higher_consistency_bypasses_the_cache_and_refreshes_it(fga: OpenFgaServer) -> None:
    doc = policy_document([rule(consistency="HIGHER_CONSISTENCY"), rule(consistency="MINIMIZE_LATENCY")],
                          [fga.backend()])

    async def run() -> list[int]:
        counts = []
        async with resolver_for(doc) as h:
            for index in (1, 0, 0, 1):
                assert await h.ask(index, {"journeyId": "roadmap"}, {"sub": "bob"}) is True
                counts.append(len(fga.calls))
            fga.remove(("user:bob", "member", "workspace:eng"))
            try:
                assert await h.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}) is False  # fresh, at once
                assert await h.ask(1, {"journeyId": "roadmap"}, {"sub": "bob"}) is False  # and shared
            finally:
                fga.add(("user:bob", "member", "workspace:eng"))
        counts.append(len(fga.calls))
        return counts

    assert asyncio.run(run()) == [1, 2, 3, 3, 4]
    assert [c.body.get("consistency") for c in fga.calls] == [
        "MINIMIZE_LATENCY", "HIGHER_CONSISTENCY", "HIGHER_CONSISTENCY", "HIGHER_CONSISTENCY"]


def test_the_key_covers_contextual_tuples_and_context(fga: OpenFgaServer) -> None:
    org = rule(contextualTuples=[{"user": "user:{{sub}}", "relation": "member", "object": "organization:{{org}}"}])
    org["variables"].append({"name": "org", "source": "jwtClaim", "key": "org_id"})
    ctx = rule(context={"region": "{{region}}"})
    ctx["variables"].append({"name": "region", "source": "header", "key": "x-region"})
    doc = policy_document([org, ctx], [fga.backend()])

    async def run() -> list[bool | None]:
        async with resolver_for(doc) as h:
            return [
                await h.ask(0, {"journeyId": "roadmap", "org": "acme"}, {"sub": "erin"}),
                await h.ask(0, {"journeyId": "roadmap", "org": "globex"}, {"sub": "erin"}),
                await h.ask(0, {"journeyId": "roadmap", "org": "acme"}, {"sub": "erin"}),
                await h.ask(1, {"journeyId": "roadmap", "region": "eu"}, {"sub": "bob"}),
                await h.ask(1, {"journeyId": "roadmap", "region": "us"}, {"sub": "bob"}),
                await h.ask(1, {"journeyId": "roadmap", "region": "eu"}, {"sub": "bob"}),
            ]

    assert asyncio.run(run()) == [True, False, True, True, True, True]
    assert len(fga.calls) == 4  # acme, globex, eu, us: the repeats came from the cache


def test_the_cache_is_bounded(fga: OpenFgaServer) -> None:
    doc = policy_document([rule()], [fga.backend()], cache={"maxEntries": 2})

    async def run() -> None:
        async with resolver_for(doc) as h:
            for journey in ("a", "b", "c", "a"):
                await h.ask(0, {"journeyId": journey}, {"sub": "bob"})
            assert len(h.resolver.memory) == 2

    asyncio.run(run())
    assert len(fga.calls) == 4  # "a" had been evicted by "c"


def test_concurrent_identical_checks_share_one_call(fga: OpenFgaServer) -> None:
    fga.then(Scripted(200, b'{"allowed": true}', delay=0.2))
    doc = policy_document([rule()], [fga.backend(timeout_ms=500)])

    async def run() -> list[bool | None]:
        async with resolver_for(doc) as h:
            return list(await asyncio.gather(*(h.ask(0, {"journeyId": "shared"}, {"sub": "bob"})
                                               for _ in range(20))))

    assert asyncio.run(run()) == [True] * 20
    assert len(fga.calls) == 1


def test_a_cancelled_asker_does_not_strand_the_others(fga: OpenFgaServer) -> None:
    """Envoy gives up on one request; another request waiting on the same call still gets the answer."""
    fga.then(Scripted(200, b'{"allowed": true}', delay=0.3))
    doc = policy_document([rule()], [fga.backend(timeout_ms=500)])

    async def run() -> bool | None:
        async with resolver_for(doc) as h:
            leader = asyncio.create_task(h.ask(0, {"journeyId": "j"}, {"sub": "bob"}))
            await asyncio.sleep(0.05)
            follower = asyncio.create_task(h.ask(0, {"journeyId": "j"}, {"sub": "bob"}))
            await asyncio.sleep(0.05)
            leader.cancel()
            return await follower

    assert asyncio.run(run()) is True
    assert len(fga.calls) == 1


# --- Redis ----------------------------------------------------------------------


def redis_doc(fga: OpenFgaServer, url: str, **cache: Any) -> dict[str, Any]:
    return policy_document([rule("viewer"), rule("can_delete")], [fga.backend()],
                           cache={"allowedTtlSeconds": 30, "deniedTtlSeconds": 5,
                                  "redis": {"url": url, "timeoutMs": 100}, **cache})


def test_replicas_share_answers_through_redis(fga: OpenFgaServer, redis_server: RedisServer) -> None:
    doc = redis_doc(fga, redis_server.url)

    async def run() -> list[Any]:
        async with resolver_for(doc) as a, resolver_for(doc) as b:
            first = [await a.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}),
                     await a.ask(1, {"journeyId": "roadmap"}, {"sub": "bob"})]
            await a.resolver.shared.drain()
            calls_after_a = len(fga.calls)
            second = [await b.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}),
                      await b.ask(1, {"journeyId": "roadmap"}, {"sub": "bob"})]
            return [first, calls_after_a, second, len(fga.calls)]

    assert asyncio.run(run()) == [[True, False], 2, [True, False], 2]


def test_redis_entries_carry_the_ttl_of_their_kind(fga: OpenFgaServer) -> None:
    with private_redis() as server:
        doc = redis_doc(fga, server.url)

        async def run() -> None:
            async with resolver_for(doc) as a:
                await a.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"})   # allowed
                await a.ask(1, {"journeyId": "roadmap"}, {"sub": "bob"})   # denied
                await a.resolver.shared.drain()

        asyncio.run(run())
        client = redis.Redis(port=server.port)
        ttls = {}
        for key in client.scan_iter("extauthz:rel:v1:*"):
            value = client.get(key)
            assert value is not None
            ttls[value[:1]] = client.pttl(key)
        assert set(ttls) == {b"1", b"0"}
        assert 5_000 < ttls[b"1"] <= 30_000
        assert 0 < ttls[b"0"] <= 5_000


def test_a_replica_trusts_redis_only_until_the_stored_expiry(fga: OpenFgaServer) -> None:
    with private_redis() as server:
        doc = redis_doc(fga, server.url)
        client = redis.Redis(port=server.port)

        async def write() -> None:
            async with resolver_for(doc) as a:
                await a.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"})
                await a.resolver.shared.drain()

        asyncio.run(write())
        (key,) = list(client.scan_iter("extauthz:rel:v1:*"))
        now_ms = int(time.time() * 1000)

        async def read() -> bool | None:
            async with resolver_for(doc) as b:
                return await b.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"})

        client.set(key, f"0:{now_ms + 60_000}")  # another replica's (denied) answer, still fresh
        calls = len(fga.calls)
        assert asyncio.run(read()) is False
        assert len(fga.calls) == calls  # taken from Redis, not asked

        client.set(key, f"1:{now_ms - 1}")  # expired by its stored expiry, even if Redis still holds it
        assert asyncio.run(read()) is True
        assert len(fga.calls) == calls + 1


def test_redis_going_away_mid_test_never_fails_a_check(fga: OpenFgaServer) -> None:
    with private_redis() as server:
        doc = redis_doc(fga, server.url)

        async def run() -> list[Any]:
            seen: list[Any] = []
            async with resolver_for(doc) as a, resolver_for(doc) as b:
                seen.append(await a.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}))
                await a.resolver.shared.drain()
                server.stop()  # Redis goes away
                calls = len(fga.calls)
                seen.append(await a.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}))  # own memory
                seen.append(len(fga.calls) - calls)
                seen.append(await b.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}))  # the backend
                seen.append(await b.ask(1, {"journeyId": "roadmap"}, {"sub": "anne"}))
                seen.append(await b.ask(0, {"journeyId": "launch"}, {"sub": "bob"}))
                seen.append(len(fga.calls) - calls)
                server.start_again()  # Redis is back (empty): after the pause, sharing resumes
                await asyncio.sleep(1.2)
                seen.append(await b.ask(0, {"journeyId": "launch"}, {"sub": "dave"}))
                await b.resolver.shared.drain()
                calls = len(fga.calls)
                seen.append(await a.ask(0, {"journeyId": "launch"}, {"sub": "dave"}))
                seen.append(len(fga.calls) - calls)
            return seen

        assert asyncio.run(run()) == [True, True, 0, True, True, False, 3, True, True, 0]


def test_an_unreachable_redis_from_the_start_is_only_a_miss(fga: OpenFgaServer) -> None:
    from extauthz.demo.processes import free_port

    doc = redis_doc(fga, f"redis://127.0.0.1:{free_port()}/0")

    async def run() -> list[bool | None]:
        async with resolver_for(doc) as a:
            return [await a.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}),
                    await a.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"}),
                    await a.ask(1, {"journeyId": "roadmap"}, {"sub": "bob"})]

    assert asyncio.run(run()) == [True, True, False]
    assert len(fga.calls) == 2  # the in-process cache still works
