"""The shadow policy in one process: what it counts, what it never changes, what it may cost.

A real :class:`~extauthz.server.runtime.RuntimeHolder` serves a policy whose
``server.shadow`` names a candidate; JWKS come over HTTP from a test IdP and
relationship answers from the local OpenFGA server (tests/openfga_server.py).
Through Envoy, with the response phase: tests/e2e/test_shadow.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.core.decision import Decision
from extauthz.core.request import HttpRequest
from extauthz.demo.idp import IdentityProvider
from extauthz.observability.logging import configure
from extauthz.server import shadow as shadow_module
from extauthz.server.reload import ReloadOutcome
from extauthz.server.runtime import RuntimeHolder
from tests.openfga_server import OpenFgaServer, Scripted

pytestmark = pytest.mark.usefixtures("fga_spec_clean")

PATH = {"path": {"pattern": "^/v1/journeys/[^/]+$"}}
JOURNEY = [{"name": "journeyId", "source": "pathSegment", "index": 2}]


def fga_rule(relation: str, **extra: Any) -> dict[str, Any]:
    return {"effect": "allow", "methods": ["GET"], "path": PATH, "variables": JOURNEY,
            "fga": {"user": "user:{{sub}}", "relation": relation, "object": "journey:{{journeyId}}"}, **extra}


def document(idp: IdentityProvider, fga: OpenFgaServer, rules: list[dict[str, Any]],
             shadow: bool = False, audiences: tuple[str, ...] = ("orders-api",)) -> str:
    doc: dict[str, Any] = {
        "providers": [{"name": "idp", "issuer": idp.issuer, "jwksUri": idp.jwks_uri, "audiences": list(audiences)}],
        "relationships": {"openfga": [fga.backend(timeout_ms=500)],
                          "cache": {"allowedTtlSeconds": 60, "deniedTtlSeconds": 60}},
        "proxies": [{"name": "orders-api", "rules": rules}],
    }
    if shadow:
        doc["server"] = {"shadow": {"file": "candidate.yaml", "responseSampleRate": 1}}
    return yaml.safe_dump(doc, sort_keys=False)


ACTIVE_RULES = [
    {"effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/orders"}}},
    {"effect": "allow", "methods": ["GET"], "path": {"path": {"pattern": "^/v1/users/"}}},
    fga_rule("viewer"),
]
# Tightened: service accounts off user paths (a deny above the allow).
CANDIDATE_RULES = [
    ACTIVE_RULES[0],
    {"effect": "deny", "path": {"path": {"pattern": "^/v1/users/"}},
     "token": [{"claim": {"pattern": "^sub$"}, "value": {"pattern": "^svc-"}}]},
    ACTIVE_RULES[1],
    fga_rule("viewer"),
]


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    with IdentityProvider() as provider:
        yield provider


class Sidecar:
    def __init__(self, holder: RuntimeHolder, idp: IdentityProvider, tmp: Path) -> None:
        self.holder, self.idp, self.tmp = holder, idp, tmp

    async def check(self, path: str, sub: str | None = "user-1", method: str = "GET",
                    audience: str = "orders-api") -> Decision:
        headers = {"authorization": f"Bearer {self.idp.token(sub=sub, audience=audience)}"} if sub else {}
        request = HttpRequest.from_target(method, path, headers=headers, context={"proxy": "orders-api"})
        return await self.holder.authorizer().check(request)

    async def settle(self) -> None:
        """Let the shadow evaluations queued by the Checks so far run (and any backend call they wait for)."""
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not self.holder.shadow._queue and not self.holder.shadow._tasks:
                return

    def status(self) -> dict[str, Any]:
        status = self.holder.readiness()[1]["shadow"]
        assert isinstance(status, dict)
        return status


async def start(tmp: Path, idp: IdentityProvider, active: str, candidate: str | None) -> Sidecar:
    (tmp / "policy.yaml").write_text(active)
    if candidate is not None:
        (tmp / "candidate.yaml").write_text(candidate)
    return Sidecar(await RuntimeHolder.start(tmp / "policy.yaml"), idp, tmp)


def test_differences_are_counted_and_the_active_policy_answers(
    tmp_path: Path, idp: IdentityProvider, fga: OpenFgaServer, capsys: pytest.CaptureFixture[str],
) -> None:
    configure("json", "info")  # as `serve` does (an earlier test may have run the CLI at another level)

    async def main() -> None:
        sidecar = await start(tmp_path, idp, document(idp, fga, ACTIVE_RULES, shadow=True),
                              document(idp, fga, CANDIDATE_RULES))
        try:
            service = await sidecar.check("/v1/users/7", sub="svc-batch")
            assert service.allowed and service.status == 200  # the active policy's answer...
            assert sidecar.holder.shadow.counts.checks == 0  # ...given before the candidate ran
            await sidecar.settle()
            assert (await sidecar.check("/v1/users/7", sub="user-1")).allowed
            assert (await sidecar.check("/v1/orders")).allowed
            assert (await sidecar.check("/v1/other")).status == 403
            assert (await sidecar.check("/v1/orders", sub=None)).status == 401
            await sidecar.settle()
            status = sidecar.status()
            assert status["checks"] == 5 and status["differences"] == 1 and status["undecided"] == 0
            assert status["agreement"] == 0.8
            assert status["digest"] == sidecar.holder.shadow.digest and status["lastReload"]["result"] == "reloaded"
        finally:
            await sidecar.holder.close()
        diffs = [json.loads(line) for line in capsys.readouterr().err.splitlines()
                 if line.startswith("{") and '"shadow_diff"' in line]
        assert len(diffs) == 1
        diff = diffs[0]
        assert diff["decision_id"] == service.decision_id and diff["sub"] == "svc-batch"
        assert diff["path"] == "/v1/users/7" and diff["method"] == "GET" and diff["proxy"] == "orders-api"
        assert diff["active"]["code"] == "allowed" and diff["active"]["rule"] == 1
        assert diff["shadow"]["status"] == 403 and diff["shadow"]["rule"] == 1 and diff["shadow"]["code"] == "forbidden"

    asyncio.run(main())


def test_a_broken_candidate_is_reported_by_line_and_never_touches_the_active_policy(
    tmp_path: Path, idp: IdentityProvider, fga: OpenFgaServer,
) -> None:
    async def main() -> None:
        broken = document(idp, fga, CANDIDATE_RULES).replace("effect: deny", "effect: denied")
        sidecar = await start(tmp_path, idp, document(idp, fga, ACTIVE_RULES, shadow=True), broken)
        try:
            status = sidecar.status()
            assert status["digest"] is None and status["lastReload"]["result"] == "invalid"
            line = next(n for n, text in enumerate(broken.splitlines(), 1) if "effect: denied" in text)
            assert status["lastReload"]["errors"] == [
                f"{tmp_path / 'candidate.yaml'}:{line}: proxies[0].rules[1].effect: must be one of allow, deny, "
                "found 'denied'"]
            assert (await sidecar.check("/v1/users/7", sub="svc-batch")).allowed  # the active policy serves
            await sidecar.settle()
            assert sidecar.status()["checks"] == 0  # no candidate, nothing evaluated

            (tmp_path / "candidate.yaml").write_text(document(idp, fga, CANDIDATE_RULES))
            assert await sidecar.holder.reload_shadow() is ReloadOutcome.RELOADED
            good = sidecar.holder.shadow.digest
            (tmp_path / "candidate.yaml").write_text(broken)
            assert await sidecar.holder.reload_shadow() is ReloadOutcome.INVALID
            assert sidecar.holder.shadow.digest == good  # the last good candidate keeps running
            await sidecar.check("/v1/users/7", sub="svc-batch")
            await sidecar.settle()
            assert sidecar.status()["differences"] == 1
        finally:
            await sidecar.holder.close()

    asyncio.run(main())


def test_reloading_either_file_keeps_the_other(tmp_path: Path, idp: IdentityProvider, fga: OpenFgaServer) -> None:
    async def main() -> None:
        sidecar = await start(tmp_path, idp, document(idp, fga, ACTIVE_RULES, shadow=True),
                              document(idp, fga, CANDIDATE_RULES))
        try:
            candidate = sidecar.holder.shadow.digest
            active_text = document(idp, fga, [*ACTIVE_RULES, {"effect": "allow", "methods": ["GET"],
                                                              "path": {"path": {"pattern": "^/v2/"}}}], shadow=True)
            (tmp_path / "policy.yaml").write_text(active_text)
            assert await sidecar.holder.reload() is ReloadOutcome.RELOADED
            assert sidecar.holder.shadow.digest == candidate
            assert (await sidecar.check("/v2/x")).allowed  # the new active policy decides...
            await sidecar.check("/v1/users/7", sub="svc-batch")
            await sidecar.settle()
            assert sidecar.status()["differences"] == 2  # ...and the candidate still runs beside it (/v2 too)

            active = sidecar.holder.runtime.policy.digest
            (tmp_path / "candidate.yaml").write_text(document(idp, fga, ACTIVE_RULES))
            assert await sidecar.holder.reload_shadow() is ReloadOutcome.RELOADED
            assert sidecar.holder.runtime.policy.digest == active
            await sidecar.check("/v1/users/7", sub="svc-batch")
            await sidecar.settle()
            assert sidecar.status()["differences"] == 2  # the new candidate agrees with the active policy on it

            # The active policy stops naming a candidate: the shadow is off, and /readyz says nothing of it.
            (tmp_path / "policy.yaml").write_text(document(idp, fga, ACTIVE_RULES))
            assert await sidecar.holder.reload() is ReloadOutcome.RELOADED
            assert "shadow" not in sidecar.holder.readiness()[1]
            await sidecar.check("/v1/users/7", sub="svc-batch")
            await sidecar.settle()
            assert sidecar.holder.shadow.counts.checks == 3  # not evaluated: no candidate any more
        finally:
            await sidecar.holder.close()

    asyncio.run(main())


def test_the_candidate_shares_identical_providers_and_verifies_a_changed_one_itself(
    tmp_path: Path, idp: IdentityProvider, fga: OpenFgaServer,
) -> None:
    async def main() -> None:
        sidecar = await start(tmp_path, idp, document(idp, fga, ACTIVE_RULES, shadow=True),
                              document(idp, fga, ACTIVE_RULES))
        try:
            assert idp.jwks_requests == 1  # one key set for both policies
            token_cache = sidecar.holder.runtime.verifier.cache
            await sidecar.check("/v1/orders")
            await sidecar.settle()
            assert (token_cache.hits, token_cache.misses) == (0, 1)  # the candidate's read is not counted
            # A relationship condition both policies have is asked once: the candidate reads the active's cache.
            assert (await sidecar.check("/v1/journeys/roadmap", sub="bob")).allowed
            await sidecar.settle()
            assert len(fga.calls) == 1 and sidecar.status()["differences"] == 0

            # The candidate accepts another audience: its own key set and verifier.
            (tmp_path / "candidate.yaml").write_text(
                document(idp, fga, ACTIVE_RULES, audiences=("orders-api", "reports")))
            assert await sidecar.holder.reload_shadow() is ReloadOutcome.RELOADED
            assert idp.jwks_requests == 2
            reports = await sidecar.check("/v1/orders", audience="reports")
            assert reports.status == 401  # the active policy refuses the audience...
            await sidecar.settle()
            status = sidecar.status()
            assert status["differences"] == 1  # ...the candidate would let it through
        finally:
            await sidecar.holder.close()

    asyncio.run(main())


def test_the_candidate_may_cause_one_backend_call_per_check_and_is_undecided_past_it(
    tmp_path: Path, idp: IdentityProvider, fga: OpenFgaServer,
) -> None:
    # Conditions the active policy never asks. Bob views roadmap, so the deny rule's question follows in a
    # second call: past the budget. Questions to one backend in one step are one BatchCheck: one call.
    two_calls = [fga_rule("viewer"), {**fga_rule("editor"), "effect": "deny"}]
    one_call = [fga_rule("editor")]

    async def main() -> None:
        sidecar = await start(tmp_path, idp, document(idp, fga, [ACTIVE_RULES[0]], shadow=True),
                              document(idp, fga, two_calls))
        try:
            assert (await sidecar.check("/v1/journeys/roadmap", sub="bob")).status == 403
            await sidecar.settle()
            assert sidecar.status()["undecided"] == 1
            assert len(fga.calls) == 1  # the one call it could make; the second question was never asked

            (tmp_path / "candidate.yaml").write_text(document(idp, fga, one_call))
            assert await sidecar.holder.reload_shadow() is ReloadOutcome.RELOADED
            await sidecar.check("/v1/journeys/launch", sub="dave")
            await sidecar.settle()
            status = sidecar.status()
            assert status["undecided"] == 1 and status["differences"] == 1  # dave may edit launch: an allow
            calls = len(fga.calls)
            await sidecar.check("/v1/journeys/launch", sub="dave")  # cached: no call, within any budget
            await sidecar.settle()
            assert len(fga.calls) == calls and sidecar.status()["differences"] == 2
        finally:
            await sidecar.holder.close()

    asyncio.run(main())


def test_past_the_pending_bound_evaluations_are_skipped_not_queued(
    tmp_path: Path, idp: IdentityProvider, fga: OpenFgaServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(shadow_module, "MAX_PENDING", 2)

    async def main() -> None:
        sidecar = await start(tmp_path, idp, document(idp, fga, [ACTIVE_RULES[0]], shadow=True),
                              document(idp, fga, [fga_rule("viewer")]))
        try:
            fga.then(*[Scripted(200, b'{"allowed": true}', delay=0.3)] * 4)  # the candidate's lookups hang a while
            answers = [await sidecar.check(f"/v1/journeys/j{i}") for i in range(5)]
            assert all(a.status == 403 for a in answers)  # answered at once, whatever the candidate waits for
            await sidecar.settle()
            status = sidecar.status()
            assert status["skipped"] == 3 and status["checks"] == 2
        finally:
            await sidecar.holder.close()

    asyncio.run(main())


def test_a_candidate_in_a_configmap_follows_kubelets_updates(
    tmp_path: Path, idp: IdentityProvider, fga: OpenFgaServer,
) -> None:
    """Both files are keys of one mounted ConfigMap: an update replaces the directory their links point into."""
    from tests.e2e.ops_stack import kubelet_layout, kubelet_update

    mount = tmp_path / "policy"
    active = document(idp, fga, ACTIVE_RULES, shadow=True)
    kubelet_layout(mount, {"policy.yaml": active, "candidate.yaml": document(idp, fga, CANDIDATE_RULES)})

    async def main() -> None:
        holder = await RuntimeHolder.start(mount / "policy.yaml")
        try:
            first = holder.shadow.digest
            assert first and holder.shadow.settings is not None
            assert holder.shadow.settings.file == str(mount / "candidate.yaml")  # the link, not today's target
            kubelet_update(mount, {"policy.yaml": active, "candidate.yaml": document(idp, fga, ACTIVE_RULES)}, 2)
            assert await holder.reload_shadow() is ReloadOutcome.RELOADED
            assert holder.shadow.digest not in ("", first)
        finally:
            await holder.close()

    asyncio.run(main())


def test_a_candidate_that_cannot_follow_an_active_reload_is_off_until_it_loads_again(
    tmp_path: Path, idp: IdentityProvider, fga: OpenFgaServer,
) -> None:
    """Its own provider's keys are unreachable when the active policy reloads: no candidate judging nothing."""

    async def main(other: IdentityProvider) -> None:
        candidate = document(other, fga, ACTIVE_RULES)  # its provider trusts another issuer: a key set of its own
        sidecar = await start(tmp_path, idp, document(idp, fga, ACTIVE_RULES, shadow=True), candidate)
        sidecar.holder.watch_shadow(0.05)
        try:
            digest = sidecar.holder.shadow.digest
            other.down = True
            (tmp_path / "policy.yaml").write_text(document(idp, fga, CANDIDATE_RULES, shadow=True))
            assert await sidecar.holder.reload() is ReloadOutcome.RELOADED  # the active policy's keys are shared
            status = sidecar.status()
            assert status["digest"] is None and status["lastReload"]["result"] == "unavailable"
            other.down = False
            for _ in range(200):
                await asyncio.sleep(0.05)
                if sidecar.holder.shadow.digest == digest:
                    break
            assert sidecar.holder.shadow.digest == digest  # loaded again for the new active policy
            assert (await sidecar.check("/v1/users/7", sub="svc-batch")).status == 403
            await sidecar.settle()
            assert sidecar.status()["differences"] == 1  # and judging beside it (401: not its issuer)
        finally:
            await sidecar.holder.close()

    with IdentityProvider() as other:
        asyncio.run(main(other))


def test_response_bodies_held_for_comparison_are_bounded_in_bytes(
    tmp_path: Path, idp: IdentityProvider, fga: OpenFgaServer, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An upstream's large bodies cannot make the shadow hold more than its budget: past it, skipped as busy."""
    from extauthz.filtering.scope import Action, ResponseHead, ResponsePlan

    monkeypatch.setattr(shadow_module, "MAX_HELD_BYTES", 1000)
    orders_filter = {"methods": ["GET"], "path": {"pattern": "^/v1/orders"}, "defaultFilterOperation": "destroy",
                     "operations": [{"effect": "retain", "jsonPath": {"pattern": "^orders$"}}]}

    def with_filter(text: str) -> str:
        doc = yaml.safe_load(text)
        doc["proxies"][0]["filters"] = [orders_filter]
        return str(yaml.safe_dump(doc, sort_keys=False))

    async def main() -> None:
        sidecar = await start(tmp_path, idp, with_filter(document(idp, fga, ACTIVE_RULES, shadow=True)),
                              with_filter(document(idp, fga, ACTIVE_RULES)))
        try:
            first, second = await sidecar.check("/v1/orders"), await sidecar.check("/v1/orders")
            await sidecar.settle()  # both sampled (responseSampleRate 1)
            head = ResponseHead(200, {"content-type": "application/json"})
            shadow = sidecar.holder.shadow
            for decision in (first, second):
                plan = ResponsePlan(Action.BUFFER, "orders-api", decision.decision_id, limit=1 << 20)
                shadow.compare_response(plan, head, b'{"orders": [' + b'1,' * 300 + b'1]}', True)
            assert sidecar.status()["skipped"] == 1  # the second body would pass 1,000 bytes held
            await sidecar.settle()
            assert sidecar.status()["responsesCompared"] == 1 and shadow._held_bytes == 0
        finally:
            await sidecar.holder.close()

    asyncio.run(main())
