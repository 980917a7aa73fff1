"""The OpenFGA client against a local server that validates every request against OpenFGA's spec.

Allow, deny, timeout, 5xx, 400 (unknown store), malformed answers, retries and
Retry-After, BatchCheck, contextual tuples/context/consistency on the wire, value
validation (the interpolation rule of docs/relationships.md) and both kinds of
bearer auth. Calls are counted at the server; no test measures time. Without
OpenFGA's published API description the server checks only the shape of what it
reads, and the tests about the description itself skip.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extauthz.relationships.templates import valid_value
from tests.openfga_server import (
    NO_PUBLISHED_API,
    Model,
    OpenFgaServer,
    Scripted,
    has_published_api,
    journeys_model,
    journeys_server,
    journeys_store,
    new_ulid,
    policy_document,
    resolver_for,
    store_file_tuples,
)

pytestmark = pytest.mark.usefixtures("fga_spec_clean")  # fga: tests/conftest.py
needs_published_api = pytest.mark.skipif(not has_published_api(), reason=NO_PUBLISHED_API)

VIEW = {"effect": "allow", "methods": ["GET"],
        "variables": [{"name": "journeyId", "source": "pathSegment", "index": 2}],
        "fga": {"user": "user:{{sub}}", "relation": "viewer", "object": "journey:{{journeyId}}"}}


def fga_rule(relation: str = "viewer", effect: str = "allow", **extra: Any) -> dict[str, Any]:
    rule: dict[str, Any] = {
        "effect": effect,
        "variables": [{"name": "journeyId", "source": "pathSegment", "index": 2}],
        "fga": {"user": "user:{{sub}}", "relation": relation, "object": "journey:{{journeyId}}"},
    }
    rule["fga"].update(extra)
    return rule


def ask(doc: dict[str, Any], rule: int, values: dict[str, str], claims: dict[str, Any]) -> bool | None:
    async def run() -> bool | None:
        async with resolver_for(doc) as h:
            return await h.ask(rule, values, claims)

    return asyncio.run(run())


def test_allowed_and_denied_answers_with_the_pinned_model(fga: OpenFgaServer) -> None:
    doc = policy_document([fga_rule("viewer"), fga_rule("can_delete")], [fga.backend()])
    assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is True
    assert ask(doc, 1, {"journeyId": "roadmap"}, {"sub": "bob"}) is False
    assert [c.path for c in fga.calls] == [f"/stores/{fga.store_id}/check"] * 2
    assert fga.calls[0].body == {
        "tuple_key": {"user": "user:bob", "relation": "viewer", "object": "journey:roadmap"},
        "authorization_model_id": fga.model.id,
    }
    assert fga.calls[0].authorization is None


@needs_published_api
def test_the_local_server_rejects_what_the_spec_does_not_allow(fga: OpenFgaServer) -> None:
    """The validator the other tests rely on really fails a wrong body (camelCase, as the SDKs' inputs)."""
    assert fga.spec is not None
    status, _, _, _ = fga.handle(f"/stores/{fga.store_id}/check", {"content-type": "application/json"},
                                 b'{"tupleKey": {"user": "user:bob", "relation": "viewer", "object": "journey:x"}}')
    assert status == 400
    assert any("tupleKey" in problem for problem in fga.invalid)
    fga.invalid.clear()


@needs_published_api
def test_the_local_server_rejects_a_batch_the_spec_does_not_allow(fga: OpenFgaServer) -> None:
    """Fields the server would not even read are checked too: an unknown consistency value, a misspelt key."""
    check = {"tuple_key": {"user": "user:bob", "relation": "viewer", "object": "journey:x"}, "correlation_id": "c0"}
    for body in ({"checks": [check], "consistency": "EVENTUAL"},
                 {"checks": [{**check, "contextualTuples": {"tuple_keys": []}}]}):
        status, _, _, _ = fga.handle(f"/stores/{fga.store_id}/batch-check", {"content-type": "application/json"},
                                     json.dumps(body).encode())
        assert status == 400, body
    assert len(fga.invalid) == 2 and "contextualTuples" in fga.invalid[1], fga.invalid
    fga.invalid.clear()


def test_without_the_published_spec_the_server_still_answers_and_reads_only_what_it_can() -> None:
    with OpenFgaServer(journeys_model(), store_file_tuples(journeys_store()), validate=False) as server:
        assert server.spec is None
        doc = policy_document([fga_rule("viewer"), fga_rule("can_delete")], [server.backend()])
        assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is True
        assert ask(doc, 1, {"journeyId": "roadmap"}, {"sub": "bob"}) is False
        assert server.invalid == []
        status, _, _, _ = server.handle(f"/stores/{server.store_id}/check", {"content-type": "application/json"},
                                        b'{"tuple_key": {"user": "user:bob", "relation": "viewer"}}')
        assert status == 400 and server.invalid == ["/stores/" + server.store_id + "/check: tuple_key/object: "
                                                     "must be a string"]


def test_timeout_is_unresolved_without_a_retry(fga: OpenFgaServer) -> None:
    fga.then(Scripted(delay=1.0))
    doc = policy_document([VIEW], [fga.backend(timeout_ms=100)])
    assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is None
    assert len(fga.calls) == 1  # the budget is spent: no second attempt


def test_5xx_is_retried_once_then_unresolved(fga: OpenFgaServer) -> None:
    fga.then(Scripted(500, b'{"code": "internal_error", "message": "boom"}'),
             Scripted(503, b'{"code": "unavailable", "message": "down"}'))
    doc = policy_document([VIEW], [fga.backend()])
    assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is None
    assert len(fga.calls) == 2


def test_one_5xx_then_an_answer(fga: OpenFgaServer) -> None:
    fga.then(Scripted(502, b"bad gateway"))
    doc = policy_document([VIEW], [fga.backend()])
    assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is True
    assert len(fga.calls) == 2


def test_retry_after_beyond_the_budget_is_not_waited_for(fga: OpenFgaServer) -> None:
    fga.then(Scripted(503, b"{}", headers={"retry-after": "30"}))
    doc = policy_document([VIEW], [fga.backend()])
    assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is None
    assert len(fga.calls) == 1


def test_429_with_a_short_retry_after_is_retried(fga: OpenFgaServer) -> None:
    fga.then(Scripted(429, b'{"code": "rate_limited"}', headers={"retry-after": "0"}))
    doc = policy_document([VIEW], [fga.backend()])
    assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is True
    assert len(fga.calls) == 2


def test_unknown_store_answers_400_and_is_not_retried(fga: OpenFgaServer) -> None:
    backend = fga.backend()
    backend["storeId"] = new_ulid()
    doc = policy_document([VIEW], [backend])
    assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is None
    assert len(fga.calls) == 1


def test_a_model_id_the_store_does_not_have_is_unresolved(fga: OpenFgaServer) -> None:
    backend = fga.backend()
    backend["authorizationModelId"] = new_ulid()
    doc = policy_document([VIEW], [backend])
    assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is None


@pytest.mark.parametrize("body", [
    b"<html>ok</html>",
    b'{"allowed": "true"}',
    b'{"allowed": null}',
    b"{}",
    b"[true]",
    b'"allowed"',
])
def test_malformed_answers_are_unresolved_and_not_cached(fga: OpenFgaServer, body: bytes) -> None:
    fga.then(Scripted(200, body))
    doc = policy_document([VIEW], [fga.backend()])

    async def run() -> tuple[bool | None, bool | None]:
        async with resolver_for(doc) as h:
            first = await h.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"})
            second = await h.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"})
            return first, second

    assert asyncio.run(run()) == (None, True)
    assert len(fga.calls) == 2  # the failure was not cached: the second ask went to the server


def test_several_conditions_go_in_one_batch_check(fga: OpenFgaServer) -> None:
    doc = policy_document([fga_rule("viewer"), fga_rule("editor"), fga_rule("can_delete")], [fga.backend()])

    async def run() -> list[bool | None]:
        async with resolver_for(doc) as h:
            return await h.ask_all([(0, {"journeyId": "roadmap"}), (1, {"journeyId": "roadmap"}),
                                    (2, {"journeyId": "launch"})], {"sub": "bob"})

    assert asyncio.run(run()) == [True, False, False]
    assert [c.path for c in fga.calls] == [f"/stores/{fga.store_id}/batch-check"]
    body = fga.calls[0].body
    assert body["authorization_model_id"] == fga.model.id
    assert [c["tuple_key"]["relation"] for c in body["checks"]] == ["viewer", "editor", "can_delete"]


def test_a_batch_item_error_leaves_only_that_condition_unresolved(fga: OpenFgaServer) -> None:
    fga.then(Scripted(200, b'{"result": {"c0": {"allowed": true, "error": {"message": ""}},'
                           b' "c1": {"error": {"input_error": "validation_error", "message": "bad"}}}}'))
    doc = policy_document([fga_rule("viewer"), fga_rule("editor")], [fga.backend()])

    async def run() -> list[bool | None]:
        async with resolver_for(doc) as h:
            return await h.ask_all([(0, {"journeyId": "a"}), (1, {"journeyId": "a"})], {"sub": "bob"})

    assert asyncio.run(run()) == [True, None]


def test_a_batch_answer_missing_an_item_is_unresolved_for_it(fga: OpenFgaServer) -> None:
    fga.then(Scripted(200, b'{"result": {"c1": {"allowed": true}}}'))
    doc = policy_document([fga_rule("viewer"), fga_rule("editor")], [fga.backend()])

    async def run() -> list[bool | None]:
        async with resolver_for(doc) as h:
            return await h.ask_all([(0, {"journeyId": "a"}), (1, {"journeyId": "a"})], {"sub": "bob"})

    assert asyncio.run(run()) == [None, True]


def test_contextual_tuples_context_and_consistency_are_sent_as_specified(fga: OpenFgaServer) -> None:
    """Seed 002: the organization membership comes from the token, as a contextual tuple."""
    rule = fga_rule(
        "viewer",
        contextualTuples=[{"user": "user:{{sub}}", "relation": "member", "object": "organization:{{orgId}}"}],
        context={"requested_from": "{{journeyId}}", "static": [1, True]},
        consistency="MINIMIZE_LATENCY",
    )
    rule["variables"].append({"name": "orgId", "source": "jwtClaim", "key": "org_id"})
    doc = policy_document([rule], [fga.backend()])
    assert ask(doc, 0, {"journeyId": "roadmap", "orgId": "acme"}, {"sub": "erin", "org_id": "acme"}) is True
    assert ask(doc, 0, {"journeyId": "roadmap", "orgId": "globex"}, {"sub": "erin", "org_id": "globex"}) is False
    assert fga.calls[0].body == {
        "tuple_key": {"user": "user:erin", "relation": "viewer", "object": "journey:roadmap"},
        "contextual_tuples": {"tuple_keys": [{"user": "user:erin", "relation": "member",
                                              "object": "organization:acme"}]},
        "context": {"requested_from": "roadmap", "static": [1, True]},
        "consistency": "MINIMIZE_LATENCY",
        "authorization_model_id": fga.model.id,
    }


@pytest.mark.parametrize("value", [
    "a:b", "a#viewer", "a b", "a\tb", "", "a\x00b", "a\u200bb",  # as received
    "a%3Ab", "a%23viewer", "a%20b", "a%0Ab", "%3a",  # once percent-decoded
])
def test_values_that_may_not_be_interpolated_are_never_sent(fga: OpenFgaServer, value: str) -> None:
    doc = policy_document([VIEW], [fga.backend()])
    assert ask(doc, 0, {"journeyId": value}, {"sub": "bob"}) is None
    assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": value}) is None
    assert fga.calls == []


def test_an_unresolved_variable_is_unresolved_without_a_call(fga: OpenFgaServer) -> None:
    doc = policy_document([VIEW], [fga.backend()])
    assert ask(doc, 0, {}, {"sub": "bob"}) is None
    assert fga.calls == []


def test_a_value_longer_than_an_openfga_id_is_unresolved_without_a_call(fga: OpenFgaServer) -> None:
    """Attacker-chosen path segments must not fill the answer cache: 256 characters at most."""
    doc = policy_document([VIEW], [fga.backend()])
    assert ask(doc, 0, {"journeyId": "j" * 257}, {"sub": "bob"}) is None
    assert fga.calls == []
    assert valid_value("j" * 256)


@given(st.text(max_size=12))
def test_value_validation_matches_the_documented_rule(value: str) -> None:
    from urllib.parse import unquote

    def clean(text: str) -> bool:
        return not any(ch.isspace() or ch in "#:" or ord(ch) < 32 or 0x7F <= ord(ch) <= 0x9F for ch in text)

    if valid_value(value):
        assert value and clean(value) and clean(unquote(value))
    elif value and clean(value) and clean(unquote(value)):
        # Also rejected: invisible format characters (zero-width, bidi controls).
        assert any(0x200B <= ord(ch) <= 0x206F or ch == "\ufeff" for ch in value + unquote(value))


def test_preshared_key_from_a_mounted_file_and_its_rotation(tmp_path: Path) -> None:
    key = tmp_path / "fga.key"
    key.write_text("first-key\n")
    with journeys_server(api_token="first-key") as fga:
        doc = policy_document([VIEW], [fga.backend(auth={"tokenFile": str(key)})])

        async def run() -> list[bool | None]:
            async with resolver_for(doc) as h:
                first = await h.ask(0, {"journeyId": "roadmap"}, {"sub": "bob"})
                # The Secret is rotated: the server wants the new key, the file has it.
                fga.api_token = "second-key"
                key.write_text("second-key\n")
                second = await h.ask(0, {"journeyId": "launch"}, {"sub": "dave"})
                return [first, second]

        assert asyncio.run(run()) == [True, True]
        assert [c.authorization for c in fga.calls] == ["Bearer first-key", "Bearer first-key", "Bearer second-key"]
        assert fga.invalid == []


def test_without_the_right_key_the_condition_is_unresolved(tmp_path: Path) -> None:
    key = tmp_path / "fga.key"
    key.write_text("wrong")
    with journeys_server(api_token="right") as fga:
        doc = policy_document([VIEW], [fga.backend(auth={"tokenFile": str(key)})])
        assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is None
        assert len(fga.calls) == 2  # one retry after the 401 (the file is re-read), then give up


def test_oidc_client_credentials(tmp_path: Path) -> None:
    secret = tmp_path / "client.secret"
    secret.write_text("s3cret\n")
    with journeys_server(api_token="unused") as fga:
        fga.clients["extauthz"] = "s3cret"
        auth = {"clientId": "extauthz", "clientSecretFile": str(secret), "tokenUrl": f"{fga.url}/oauth/token",
                "audience": "https://fga.example"}
        doc = policy_document([VIEW], [fga.backend(auth=auth)])

        async def run() -> list[bool | None]:
            async with resolver_for(doc) as h:
                answers = [await h.ask(0, {"journeyId": j}, {"sub": "bob"}) for j in ("roadmap", "launch", "x")]
                fga.revoke_tokens()  # the access token stops working: one 401, a new token, the answer
                answers.append(await h.ask(0, {"journeyId": "y"}, {"sub": "bob"}))
                return answers

        assert asyncio.run(run()) == [True, False, False, False]
        assert fga.token_requests == 2
        assert all(c.authorization and c.authorization.startswith("Bearer ") for c in fga.calls)
        assert "s3cret" not in str([c.authorization for c in fga.calls])


def test_oidc_with_a_wrong_secret_is_unresolved(tmp_path: Path) -> None:
    secret = tmp_path / "client.secret"
    secret.write_text("nope")
    with journeys_server(api_token="unused") as fga:
        fga.clients["extauthz"] = "s3cret"
        auth = {"clientId": "extauthz", "clientSecretFile": str(secret), "tokenUrl": f"{fga.url}/oauth/token"}
        doc = policy_document([VIEW], [fga.backend(auth=auth)])
        assert ask(doc, 0, {"journeyId": "roadmap"}, {"sub": "bob"}) is None
        assert fga.calls == []  # no check without a token


def test_local_model_semantics_agree_with_the_real_engine_answers() -> None:
    """The store file's expectations are verified by `fga model test` (test_openfga_journeys); here
    the local server's evaluator must give the very same answers."""
    model = Model(journeys_model(), "m")
    base = frozenset(store_file_tuples(journeys_store()))
    checked = 0
    for test in journeys_store()["tests"]:
        tuples = base | frozenset(store_file_tuples(test))
        for check in test["check"]:
            for relation, expected in check["assertions"].items():
                assert model.check(tuples, check["user"], relation, check["object"]) is expected, (check, relation)
                checked += 1
    assert checked == 33
