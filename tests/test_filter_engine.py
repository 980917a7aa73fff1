"""The response filter engine, codec and header-time decisions (docs/response-filtering.md), without Envoy."""

from __future__ import annotations

import copy
import gzip
import json
import zlib
from dataclasses import replace
from pathlib import Path
from typing import Any

import brotli
import pytest

from extauthz.core.handoff import Handoff
from extauthz.demo.upstream import ORDERS
from extauthz.filtering.codec import Unfilterable, decode, parse, serialize
from extauthz.filtering.engine import apply_filters, bind
from extauthz.filtering.pipeline import filter_body
from extauthz.filtering.scope import Action, ResponseHead, plan_response
from extauthz.policy.loader import load_filter, parse_policy

# Seed 003 step 6, pasted as published (JSON, including the escaped dot).
SEED_003_FILTER = json.loads(r"""
{
"variables": [
{
"name": "callerSub",
"source": "jwtClaim",
"key": "sub"
}
],
"defaultFilterOperation": "destroy",
"operations": [
{
"effect": "retain",
"jsonPath": { "pattern": "^orders$" },
"matchField": { "pattern": "^userId$" },
"matchValue": { "pattern": "^{{callerSub}}$" },
"priority": 10,
"notes": "Retain only orders where userId matches the caller's JWT sub"
},
{
"effect": "retain",
"jsonPath": { "pattern": "^orders\\.(orderId|userId|amount|status)$" },
"priority": 5,
"notes": "Retain only these fields on each surviving order"
}
],
"notes": "Strip orders not belonging to the calling user; remove internal fields"
}
""")

SEED_FIELDS = {"orderId", "userId", "amount", "status"}


def shape(filter_obj: dict[str, Any], document: Any, **values: str) -> Any:
    return bind(load_filter(filter_obj), values).apply(document)


def op(effect: str, json_path: str, field: str | None = None, value: str | None = None,
       priority: int = 100) -> dict[str, Any]:
    out: dict[str, Any] = {"effect": effect, "jsonPath": {"pattern": json_path}, "priority": priority}
    if field is not None:
        out["matchField"] = {"pattern": field}
        out["matchValue"] = {"pattern": value}
    return out


def flt(default: str, *ops: dict[str, Any], variables: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"defaultFilterOperation": default, "operations": list(ops),
            "variables": variables or [{"name": "callerSub", "source": "jwtClaim", "key": "sub"}]}


# --- seed 003 ----------------------------------------------------------------------


def test_seed_filter_gives_the_caller_only_their_orders_with_only_the_retained_fields() -> None:
    out = shape(SEED_003_FILTER, ORDERS, callerSub="user-123")
    assert out == {"orders": [
        {"orderId": "o-1", "userId": "user-123", "amount": 42, "status": "paid"},
        {"orderId": "o-3", "userId": "user-123", "amount": 13, "status": "open"},
    ]}


def test_seed_filter_gives_a_caller_without_orders_an_empty_list() -> None:
    assert shape(SEED_003_FILTER, ORDERS, callerSub="user-999") == {"orders": []}


def test_seed_filter_with_unresolved_caller_shows_no_rows() -> None:
    # A token without sub: the retain row operation is restrictive, the array still addressed.
    assert shape(SEED_003_FILTER, ORDERS) == {"orders": []}


def test_the_sample_policy_ships_the_seed_filter() -> None:
    policy = parse_policy(Path("extauthz/examples/policy.yaml").read_bytes().replace(
        b"discovery: true", b"jwksUri: http://127.0.0.1:1/jwks"), base_dir=Path("extauthz/examples"))
    shipped = policy.proxy_named("orders-api").filters[0]  # type: ignore[union-attr]
    seed = load_filter(SEED_003_FILTER)
    assert [(o.effect, o.json_path.source, o.priority) for o in shipped.operations] == \
        [(o.effect, o.json_path.source, o.priority) for o in seed.operations]
    assert bind(shipped, {"callerSub": "user-123"}).apply(ORDERS) == shape(SEED_003_FILTER, ORDERS,
                                                                          callerSub="user-123")


def test_filtering_does_not_modify_the_input() -> None:
    before = copy.deepcopy(ORDERS)
    shape(SEED_003_FILTER, ORDERS, callerSub="user-123")
    assert before == ORDERS


# --- variables ---------------------------------------------------------------------


@pytest.mark.parametrize("sub, other", [
    ("user.abc+1", "userXabc1"), ("user.abc+1", "user.abccc1"), (".*", "anything"),
    ("a|b", "a"), ("(x)?", ""), ("[a-z]", "q"), ("a\nb", "a"), ("user-123", "user-123\n"),
])
def test_a_variable_full_of_regex_metacharacters_matches_only_itself(sub: str, other: str) -> None:
    doc = {"orders": [{"userId": sub, "n": 1}, {"userId": other, "n": 2}]}
    assert shape(SEED_003_FILTER, doc, callerSub=sub) == {"orders": [{"userId": sub}]}


def test_unresolved_variable_makes_a_destroy_field_operation_take_everything() -> None:
    f = flt("retain", op("destroy", "^{{callerSub}}$"))
    assert shape(f, {"a": 1, "b": [1]}) == {}
    assert shape(f, {"a": 1, "b": [1]}, callerSub="a") == {"b": [1]}


def test_unresolved_variable_makes_a_destroy_row_operation_remove_every_addressed_row() -> None:
    f = flt("retain", op("destroy", "^orders$", "^userId$", "^{{callerSub}}$"))
    assert shape(f, {"orders": [{"userId": "u"}], "other": [{"userId": "u"}]}) == \
        {"orders": [], "other": [{"userId": "u"}]}


def test_unresolved_variable_makes_a_retain_field_operation_grant_nothing() -> None:
    f = flt("destroy", op("retain", "^{{callerSub}}$"))
    assert shape(f, {"a": 1}) == {}
    assert shape(f, {"a": 1}, callerSub="a") == {"a": 1}


def test_unresolved_json_path_in_a_retain_row_operation_row_filters_every_array() -> None:
    f = flt("destroy", op("retain", "^{{callerSub}}$", "^id$", "^1$"), op("retain", "^(a|b)(\\..*)?$"))
    assert shape(f, {"a": [{"id": 1}, {"id": 2}], "b": 2}) == {"a": [{"id": 1}], "b": 2}
    assert shape(f, {"a": [{"id": 1}, {"id": 2}], "b": 2}, callerSub="c") == {"a": [{"id": 1}, {"id": 2}], "b": 2}


def test_builtin_sub_needs_no_declaration() -> None:
    f = {"defaultFilterOperation": "destroy", "operations": [op("retain", "^rows$", "^owner$", "^{{sub}}$")]}
    assert shape(f, {"rows": [{"owner": "me"}, {"owner": "you"}]}, sub="me") == {"rows": [{"owner": "me"}]}


# --- destroy default (allowlist) ------------------------------------------------------


def test_destroy_default_without_operations_leaves_an_empty_root_of_the_same_type() -> None:
    f = flt("destroy")
    assert shape(f, {"a": 1}) == {}
    assert shape(f, [1, 2]) == []
    assert shape(f, "secret") is None


def test_retained_field_keeps_its_subtree_and_the_containers_that_hold_it() -> None:
    f = flt("destroy", op("retain", "^a\\.b$"))
    doc = {"a": {"b": {"deep": [1, {"x": 2}]}, "c": 3}, "d": 4, "e": {"f": 5}}
    assert shape(f, doc) == {"a": {"b": {"deep": [1, {"x": 2}]}}}


def test_rows_kept_by_a_row_operation_are_kept_whole_when_no_field_operation_reaches_inside() -> None:
    f = flt("destroy", op("retain", "^orders$", "^userId$", "^{{callerSub}}$"))
    out = shape(f, ORDERS, callerSub="user-456")
    assert out == {"orders": [ORDERS["orders"][1]]}


def test_destroy_field_operation_still_applies_inside_rows_kept_whole() -> None:
    f = flt("destroy", op("retain", "^orders$", "^userId$", "^{{callerSub}}$"), op("destroy", "^orders\\.audit$"))
    out = shape(f, ORDERS, callerSub="user-456")
    assert out == {"orders": [{k: v for k, v in ORDERS["orders"][1].items() if k != "audit"}]}


def test_an_array_addressed_by_a_retain_row_operation_survives_empty_and_holds_its_parents() -> None:
    f = flt("destroy", op("retain", "^data\\.orders$", "^userId$", "^{{callerSub}}$"))
    assert shape(f, {"data": {"orders": [{"userId": "x"}], "total": 9}}, callerSub="me") == {"data": {"orders": []}}


def test_non_object_elements_of_an_addressed_array_do_not_survive() -> None:
    f = flt("destroy", op("retain", "^rows$", "^id$", "^1$"))
    assert shape(f, {"rows": [{"id": 1}, 1, "1", None]}) == {"rows": [{"id": 1}]}


def test_a_field_retained_only_outside_the_caller_rows_does_not_survive() -> None:
    # Allowlisted fields of other users' rows stay hidden: the row rule decides first.
    f = flt("destroy", op("retain", "^orders$", "^userId$", "^{{callerSub}}$"), op("retain", "^orders\\.amount$"))
    assert shape(f, ORDERS, callerSub="user-456") == {"orders": [{"amount": 7}]}


# --- retain default (denylist) ------------------------------------------------------


def test_retain_default_removes_only_what_destroy_operations_select() -> None:
    f = flt("retain", op("destroy", "^orders\\.(internalRef|audit)$"), op("destroy", "^page$"))
    out = shape(f, ORDERS)
    assert out == {"orders": [{k: v for k, v in o.items() if k not in ("internalRef", "audit")}
                              for o in ORDERS["orders"]]}


def test_retain_default_destroy_row_operation_removes_rows_whole() -> None:
    f = flt("retain", op("destroy", "^orders$", "^status$", "^paid$"))
    assert shape(f, ORDERS) == {"orders": [ORDERS["orders"][1], ORDERS["orders"][2]], "page": 1}


def test_retain_default_keeps_containers_emptied_by_destroy_operations() -> None:
    f = flt("retain", op("destroy", "^a\\.b$"))
    assert shape(f, {"a": {"b": 1}, "c": []}) == {"a": {}, "c": []}


def test_retain_operations_cannot_add_anything_in_retain_mode() -> None:
    f = flt("retain", op("retain", "^orders$", "^userId$", "^nobody$"))
    assert shape(f, ORDERS) == ORDERS


# --- destroy wins, field before row, priorities ------------------------------------------


def test_destroy_wins_over_retain_on_the_same_field() -> None:
    f = flt("destroy", op("retain", "^a$", priority=1), op("destroy", "^a$", priority=99))
    assert shape(f, {"a": 1, "b": 2}) == {}


def test_destroy_wins_over_retain_on_the_same_row() -> None:
    f = flt("destroy", op("retain", "^orders$", "^userId$", "^user-123$"),
            op("destroy", "^orders$", "^status$", "^paid$"))
    assert shape(f, ORDERS) == {"orders": [ORDERS["orders"][2]]}


def test_row_tests_read_original_values_even_when_a_field_operation_removes_the_field() -> None:
    f = flt("destroy", op("retain", "^orders$", "^userId$", "^{{callerSub}}$", priority=10),
            op("retain", "^orders\\.(orderId|amount)$", priority=5))
    assert shape(f, ORDERS, callerSub="user-123") == {"orders": [
        {"orderId": "o-1", "amount": 42}, {"orderId": "o-3", "amount": 13}]}


def test_priorities_do_not_change_the_result() -> None:
    ops = [op("retain", "^orders$", "^userId$", "^{{callerSub}}$"), op("retain", "^orders\\.(orderId|status)$"),
           op("destroy", "^orders$", "^status$", "^open$"), op("destroy", "^orders\\.orderId$")]
    results = set()
    for priorities in ([1, 2, 3, 4], [4, 3, 2, 1], [2, 4, 1, 3]):
        ordered = [{**o, "priority": p} for o, p in zip(ops, priorities, strict=True)]
        results.add(json.dumps(shape(flt("destroy", *ordered), ORDERS, callerSub="user-123")))
    assert results == {json.dumps({"orders": [{"status": "paid"}]})}


# --- paths: root, nested arrays, top-level arrays, row field spelling ---------------------


def test_root_path_is_empty() -> None:
    assert shape(flt("destroy", op("retain", "^$")), ORDERS) == ORDERS
    assert shape(flt("retain", op("destroy", "^$")), ORDERS) == {}


def test_top_level_array_rows() -> None:
    rows = [{"owner": "me", "secret": 1}, {"owner": "you"}]
    f = flt("destroy", op("retain", "^$", "^owner$", "^{{callerSub}}$"), op("retain", "^owner$"))
    assert shape(f, rows, callerSub="me") == [{"owner": "me"}]


def test_nested_arrays_are_transparent_for_rows_and_fields() -> None:
    doc = {"groups": [[{"userId": "me", "x": 1}, {"userId": "you"}], [{"userId": "you"}], []]}
    f = flt("destroy", op("retain", "^groups$", "^userId$", "^{{callerSub}}$"), op("retain", "^groups\\.userId$"))
    assert shape(f, doc, callerSub="me") == {"groups": [[{"userId": "me"}], [], []]}


def test_row_field_may_be_nested_and_array_values_match_any_element() -> None:
    doc = {"docs": [{"owner": {"id": "me"}}, {"owner": {"id": "you"}, "readers": ["me", "x"]}, {"readers": ["x"]}]}
    f = flt("destroy", op("retain", "^docs$", "^(owner\\.id|readers)$", "^{{callerSub}}$"))
    assert shape(f, doc, callerSub="me") == {"docs": doc["docs"][:2]}


def test_numbers_and_booleans_match_in_json_spelling_and_null_never_matches() -> None:
    doc = {"rows": [{"v": 42}, {"v": True}, {"v": None}, {"v": 1.5}, {"v": "42"}]}
    f = flt("destroy", op("retain", "^rows$", "^v$", "^(42|true|null|1\\.5)$"))
    assert shape(f, doc) == {"rows": [{"v": 42}, {"v": True}, {"v": 1.5}, {"v": "42"}]}


def test_scalar_elements_are_rows_with_the_empty_field_name() -> None:
    f = flt("retain", op("destroy", "^tags$", "^$", "^secret$"))
    assert shape(f, {"tags": ["public", "secret", "other"]}) == {"tags": ["public", "other"]}


def test_several_filters_compose_each_taking_more_away() -> None:
    first = bind(load_filter(SEED_003_FILTER), {"callerSub": "user-123"})
    second = bind(load_filter(flt("retain", op("destroy", "^orders\\.amount$"))), {})
    assert apply_filters([first, second], ORDERS) == {"orders": [
        {"orderId": "o-1", "userId": "user-123", "status": "paid"},
        {"orderId": "o-3", "userId": "user-123", "status": "open"}]}


# --- codec --------------------------------------------------------------------------


DATA = json.dumps(ORDERS).encode()


def _raw_deflate(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    return compressor.compress(data) + compressor.flush()


@pytest.mark.parametrize("encodings, body", [
    (("gzip",), gzip.compress(DATA)), (("x-gzip",), gzip.compress(DATA)), (("deflate",), zlib.compress(DATA)),
    (("deflate",), _raw_deflate(DATA)), (("br",), brotli.compress(DATA)), (("identity",), DATA),
    (("gzip", "br"), brotli.compress(gzip.compress(DATA))),
])
def test_supported_content_encodings_decode(encodings: tuple[str, ...], body: bytes) -> None:
    assert decode(body, encodings, 1 << 20) == DATA


@pytest.mark.parametrize("encodings, bomb", [
    (("gzip",), gzip.compress(b" " * 20_000_000)), (("br",), brotli.compress(b" " * 20_000_000)),
    (("deflate",), zlib.compress(b" " * 20_000_000)),
])
def test_decoding_stops_at_the_limit(encodings: tuple[str, ...], bomb: bytes) -> None:
    with pytest.raises(Unfilterable) as caught:
        decode(bomb, encodings, 1 << 20)
    assert caught.value.code == "too_large"


@pytest.mark.parametrize("encodings, body, code", [
    (("zstd",), DATA, "unsupported_encoding"), (("gzip",), gzip.compress(DATA)[:-8], "bad_encoding"),
    (("gzip",), DATA, "bad_encoding"), (("br",), brotli.compress(DATA)[:-2], "bad_encoding"),
])
def test_undecodable_bodies_are_unfilterable(encodings: tuple[str, ...], body: bytes, code: str) -> None:
    with pytest.raises(Unfilterable) as caught:
        decode(body, encodings, 1 << 20)
    assert caught.value.code == code


@pytest.mark.parametrize("body", [b"NaN", b"{", b"\xff", b'{"a": Infinity}', b'"\\ud800"', b"[1e400]",
                                  b'{"big": 123456789012345678901234567890, "x": NaN}'])
def test_invalid_json_is_unfilterable(body: bytes) -> None:
    with pytest.raises(Unfilterable) as caught:
        parse(body)
    assert caught.value.code == "invalid_json"


def test_deep_documents_are_filtered_and_too_deep_ones_fail_closed() -> None:
    p = replace(plan_response(POLICY, caller(), head(headers={"content-type": "application/json"})), limit=1 << 20)
    deep = b'{"orders": ' + b"[" * 200 + b'{"userId": "me", "x": 1}' + b"]" * 200 + b"}"
    assert filter_body(p, deep).body == deep.replace(b" ", b"")  # the row is kept whole
    for too_deep in (b"[" * 5000 + b"]" * 5000, b'{"a":' * 3000 + b"1" + b"}" * 3000):
        with pytest.raises(Unfilterable) as caught:
            filter_body(p, too_deep)
        assert caught.value.code == "invalid_json"


def test_integers_beyond_64_bits_survive_exactly() -> None:
    body = b'{"orders": [{"userId": "u", "id": 123456789012345678901234567890, "n": -9223372036854775809}]}'
    document, exact = parse(body)
    out = serialize(bind(load_filter(SEED_003_FILTER), {"callerSub": "u"}).apply(document), exact)
    assert out == b'{"orders":[{"userId":"u"}]}'
    assert serialize(*parse(body)) == b'{"orders":[{"userId":"u","id":123456789012345678901234567890,' \
                                      b'"n":-9223372036854775809}]}'


# --- header-time decisions ------------------------------------------------------------


POLICY = parse_policy("""
providers:
  - {name: idp, issuer: https://idp, jwksUri: https://idp/jwks, audiences: [api], algorithms: [RS256]}
server: {maxBodyBytes: 1000}
proxies:
  - name: api
    filters:
      - methods: [GET, HEAD]
        path: {pattern: "^/v1/orders$"}
        statuses: [200]
        variables:
          - {name: callerSub, source: jwtClaim, key: sub}
          - {name: tier, source: jwtClaim, key: plan.tier}
          - {name: tenant, source: header, key: x-tenant}
        defaultFilterOperation: destroy
        operations:
          - {effect: retain, jsonPath: {pattern: "^orders$"}, matchField: {pattern: "^userId$"},
             matchValue: {pattern: "^{{callerSub}}$"}}
          - {effect: retain, jsonPath: {pattern: "^tier{{tier}}$"}}
          - {effect: retain, jsonPath: {pattern: "^tenant{{tenant}}$"}}
""")
JSON_HEADERS = {"content-type": "application/json; charset=utf-8", "content-length": "100"}


def caller(**overrides: Any) -> Handoff:
    """The Check's hand-off as the response phase reads it back (plain lists of readings and values here)."""
    fields: dict[str, Any] = {
        "decisionId": "d-1", "proxy": "api", "policy": POLICY.digest,
        "methods": ["GET"], "paths": ["/v1/orders"], "host": "api",
        "filterValues": [{"callerSub": "me", "tier": "2", "tenant": "acme", "sub": "me"}],
    }
    fields.update(overrides)
    sent = Handoff(fields["decisionId"], fields["proxy"], fields["policy"], tuple(fields["methods"]),
                   tuple(fields["paths"]), fields["host"], tuple(fields["filterValues"]))
    found = Handoff.from_metadata(sent.to_metadata())
    assert found is not None
    return found


def head(**overrides: Any) -> ResponseHead:
    fields: dict[str, Any] = {"status": 200, "headers": JSON_HEADERS}
    fields.update(overrides)
    return ResponseHead(**fields)


def test_in_scope_json_response_is_buffered_with_the_check_phase_variables() -> None:
    p = plan_response(POLICY, caller(), head())
    assert p.action is Action.BUFFER and p.declared_length == 100 and p.limit == 1000
    doc = {"orders": [{"userId": "me"}, {"userId": "x"}], "tier2": 1, "tenantacme": 1, "tier3": 1}
    assert filter_body(p, json.dumps(doc).encode()).body == b'{"orders":[{"userId":"me"}],"tier2":1,"tenantacme":1}'


@pytest.mark.parametrize("request_fields, response_fields", [
    ({"methods": ["POST"]}, {}), ({"paths": ["/v1/orders/1"]}, {}), ({}, {"status": 404}),
    ({}, {"from_upstream": False}),
])
def test_out_of_scope_responses_stream_through(request_fields: dict[str, Any], response_fields: dict[str, Any]) -> None:
    assert plan_response(POLICY, caller(**request_fields), head(**response_fields)).action is Action.PASS


@pytest.mark.parametrize("request_fields", [
    {"methods": ["HEAD"]}, {"methods": ["OPTIONS"]}, {"methods": ["POST", "GET"]},
    {"paths": ["/v1/orders/"]}, {"paths": ["/v1/orders;x=1", "/v1/orders"]},
])
def test_every_reading_of_the_request_is_in_scope(request_fields: dict[str, Any]) -> None:
    """HEAD/OPTIONS read as GET, a method override counts, any path reading, trailing slash or not."""
    assert plan_response(POLICY, caller(**request_fields), head()).action is Action.BUFFER


@pytest.mark.parametrize("response_fields", [
    {"status": 206}, {"status": 404, "headers": {**JSON_HEADERS, "content-range": "bytes 0-9/100"}},
    {"status": 416, "headers": {"content-range": "bytes */100"}},
])
def test_partial_responses_to_a_filtered_request_are_blocked_whatever_the_status_scope(
    response_fields: dict[str, Any],
) -> None:
    p = plan_response(POLICY, caller(), head(**response_fields))
    assert (p.action, p.code) == (Action.BLOCK, "partial_content")


def test_a_handoff_of_another_version_counts_as_none() -> None:
    assert Handoff.from_metadata({**caller().to_metadata(), "v": "1"}) is None
    assert Handoff.from_metadata({**caller().to_metadata(), "v": "3"}) is None
    assert Handoff.from_metadata(caller().to_metadata()) == caller()


@pytest.mark.parametrize("headers, code", [
    ({"content-type": "text/html"}, "not_json"),
    ({}, "not_json"),
    ({"content-type": "application/json", "content-encoding": "zstd"}, "unsupported_encoding"),
    ({"content-type": "application/json", "content-encoding": "gzip, compress"}, "unsupported_encoding"),
    ({"content-type": "application/json", "content-length": "1001"}, "too_large"),
])
def test_unfilterable_responses_are_blocked_on_their_headers(headers: dict[str, str], code: str) -> None:
    p = plan_response(POLICY, caller(), head(headers=headers))
    assert (p.action, p.code) == (Action.BLOCK, code)


def test_head_response_loses_its_content_length() -> None:
    assert plan_response(POLICY, caller(methods=["HEAD"]), head(end_of_stream=True)).action is Action.STRIP_LENGTH


def test_response_without_identity_is_blocked_when_any_filter_could_apply() -> None:
    assert plan_response(POLICY, None, head()).code == "no_identity"
    assert plan_response(POLICY, caller(proxy="gone"), head()).code == "no_identity"
    # Envoy's request attributes narrow it down when configured; without them every filter might apply.
    assert plan_response(POLICY, None, head(method="GET", path="/elsewhere")).action is Action.PASS
    assert plan_response(POLICY, None, head(method="GET", path="/v1/orders/")).code == "no_identity"


def test_after_a_reload_the_checks_values_are_not_trusted() -> None:
    stale = caller(policy="older-digest", filterValues=[{"callerSub": "someone-else", "tier": "9"}])
    p = plan_response(POLICY, stale, head())
    doc = {"orders": [{"userId": "me"}, {"userId": "someone-else"}], "tier2": 1, "tier9": 1, "tenantacme": 1}
    # The index may name another filter now: every variable is unresolved, which shows less.
    assert filter_body(p, json.dumps(doc).encode()).body == b'{"orders":[]}'


def test_bodies_over_the_limit_or_incomplete_are_unfilterable() -> None:
    p = plan_response(POLICY, caller(), head(headers={"content-type": "application/json"}))
    assert p.declared_length is None
    for body, complete in ((b" " * 1001, True), (b"{}", False)):
        with pytest.raises(Unfilterable) as caught:
            filter_body(p, body, complete)
        assert caught.value.code == "too_large"
