"""``extauthz diff`` and ``extauthz test --against`` as a user runs them: real policy files, the CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from extauthz.cli import main

# The policy in use. Tokens in the tests are minted from claims by the toolbox (as in
# tests/test_toolbox.py): the provider's key source is replaced, everything else is verified.
OLD = """# The orders API
providers:
  - {name: idp, issuer: https://idp.example, jwksUri: https://idp.example/jwks, audiences: [api]}
proxies:
  - name: orders
    publicPaths: [{pattern: "^/healthz$", methods: [GET]}]
    upstream:
      targetCredential: {header: authorization, prefix: "Bearer ", file: key.txt}
      identityHeaders: {x-auth-sub: "{{sub}}"}
    rules:
      - effect: deny
        token: [{claim: {pattern: "^sub$"}, presence: must_absent}]
        priority: 1
        notes: sub required
      - effect: deny
        path: {path: {pattern: "^/v1/admin"}}
        token: [{claim: {pattern: "^role$"}, value: {pattern: "^admin$"}, presence: must_absent}]
        priority: 2
        notes: admins only
      - {effect: allow, methods: [GET], path: {path: {pattern: "^/v1/"}}, notes: readers}
    filters:
      - path: {pattern: "^/v1/orders"}
        variables: [{name: me, source: jwtClaim, key: sub}]
        defaultFilterOperation: destroy
        operations:
          - {effect: retain, jsonPath: {pattern: "^orders$"}, matchField: {pattern: "^owner$"},
             matchValue: {pattern: "^{{me}}$"}}
          - {effect: retain, jsonPath: {pattern: "^orders\\\\.(id|owner|total)$"}}
        notes: own orders only
"""

# The same policy written differently: block style, other quoting and key order, no comments.
REFORMATTED = """proxies:
- name: orders
  rules:
  - notes: sub required
    priority: 1
    token:
    - presence: must_absent
      claim:
        pattern: ^sub$
    effect: deny
  - notes: admins only
    priority: 2
    effect: deny
    path:
      path:
        pattern: ^/v1/admin
    token:
    - claim: {pattern: ^role$}
      value: {pattern: ^admin$}
      presence: must_absent
  - effect: allow
    notes: readers
    path: {path: {pattern: '^/v1/'}}
    methods:
    - GET
  filters:
  - notes: own orders only
    path: {pattern: ^/v1/orders}
    defaultFilterOperation: destroy
    variables:
    - {key: sub, name: me, source: jwtClaim}
    operations:
    - effect: retain
      jsonPath: {pattern: ^orders$}
      matchField: {pattern: ^owner$}
      matchValue: {pattern: '^{{me}}$'}
    - effect: retain
      jsonPath: {pattern: '^orders\\.(id|owner|total)$'}
  upstream:
    identityHeaders:
      x-auth-sub: '{{sub}}'
    targetCredential:
      file: key.txt
      header: authorization
      prefix: 'Bearer '
  publicPaths:
  - methods: [GET]
    pattern: ^/healthz$
providers:
- name: idp
  audiences: [api]
  jwksUri: https://idp.example/jwks
  issuer: https://idp.example
"""

# `policy:` names no file: diff compares OLD and NEW, whatever the test file says.
TESTS = """policy: no-such-policy.yaml
tests:
  - name: a reader lists orders
    request: {method: GET, path: /v1/orders}
    token: {claims: {sub: alice}}
    expect: {result: allow, rule: 2, headers: {x-auth-sub: alice}}
  - name: a reader lists products
    request: {method: GET, path: /v1/products}
    token: {claims: {sub: alice}}
    expect: {result: allow, rule: 2}
  - name: a user is kept out of admin
    request: {method: GET, path: /v1/admin/users}
    token: {claims: {sub: alice, role: user}}
    expect: {result: deny, status: 403, rule: 1}
  - name: a token without sub is denied
    request: {method: GET, path: /v1/orders}
    token: {claims: {sub: null}}
    expect: {result: deny, rule: 0}
  - name: the health check is public
    request: {method: GET, path: /healthz}
    expect: {result: allow, status: 200}
"""

UPSTREAM_KEY = "upstream-key-that-must-never-be-printed"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "key.txt").write_text(UPSTREAM_KEY)
    (tmp_path / "old.yaml").write_text(OLD)
    (tmp_path / "tests.yaml").write_text(TESTS)
    return tmp_path


def new_policy(tmp_path: Path, text: str) -> str:
    (tmp_path / "new.yaml").write_text(text)
    return str(tmp_path / "new.yaml")


def edited(old: str, new: str) -> str:
    assert old in OLD, old
    return OLD.replace(old, new)


def test_a_reformatted_policy_changes_nothing(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = new_policy(files, REFORMATTED)
    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new)
    assert code == 0, out
    lines = out.splitlines()
    assert lines[0].startswith(f"old  {files / 'old.yaml'} (policy ")
    assert lines[1].startswith(f"new  {new} (policy ")
    assert lines[0][-18:] != lines[1][-18:]  # the files differ byte for byte...
    assert lines[2:] == ["no change in decisions' inputs"]  # ...but not in what decides

    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new, "--tests", str(files / "tests.yaml"))
    assert code == 0
    assert out.splitlines()[2:] == ["0 of 5 cases change"]


def test_a_tightened_rule_is_reported_by_index_and_notes(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = new_policy(files, edited('pattern: "^/v1/"}}, notes: readers}', 'pattern: "^/v1/orders"}}, notes: readers}'))
    code, out, err = run(capsys, "diff", str(files / "old.yaml"), new)
    assert code == 1, err
    assert out.splitlines()[2:] == [
        """proxy orders: rule #2 (allow) "readers" changed: pattern '^/v1/' -> '^/v1/orders'""",
        "1 change",
    ]


def test_a_changed_filter_shows_the_operation_that_changed(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = new_policy(files, edited("(id|owner|total)", "(id|owner)"))
    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new)
    assert code == 1
    assert out.splitlines()[2:] == [
        """proxy orders: filter #0 "own orders only" changed: operations[1].jsonPath """
        """'^orders\\\\.(id|owner|total)$' -> '^orders\\\\.(id|owner)$'""",
        "1 change",
    ]


def test_an_added_proxy_is_listed_with_its_rules(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = new_policy(files, OLD + """  - name: billing
    hosts: [billing.example]
    mode: monitor
    rules:
      - {effect: allow, methods: [GET, HEAD], path: {path: {pattern: "^/invoices/"}}, notes: invoices}
""")
    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new)
    assert code == 1
    assert out.splitlines()[2:] == [
        "proxy billing added: providers ['idp']; hosts ['billing.example']; mode 'monitor'; rules 1; filters 0",
        """proxy billing: rule #0 (allow) "invoices" added: methods ['GET', 'HEAD']; pattern '^/invoices/'""",
        "2 changes",
    ]


def test_a_moved_rule_and_removed_public_path(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    reordered = OLD.replace("""      - {effect: allow, methods: [GET], path: {path: {pattern: "^/v1/"}}, notes: readers}
""", "").replace("""    rules:
""", """    rules:
      - {effect: allow, methods: [GET], path: {path: {pattern: "^/v1/"}}, notes: readers}
""").replace("""    publicPaths: [{pattern: "^/healthz$", methods: [GET]}]
""", "")
    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new_policy(files, reordered))
    assert code == 1
    assert out.splitlines()[2:] == [
        "proxy orders: publicPath #0 removed",
        """proxy orders: rule #2 -> #0 (allow) "readers" moved""",
        "2 changes",
    ]


def test_an_invalid_new_policy_exits_2_with_file_line_field(
        files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = new_policy(files, edited("- {effect: allow, methods: [GET]", "- {effect: permit, methods: [GET]"))
    code, out, err = run(capsys, "diff", str(files / "old.yaml"), new, "--tests", str(files / "tests.yaml"))
    assert code == 2
    assert out == ""
    line = OLD.splitlines().index('      - {effect: allow, methods: [GET], path: {path: {pattern: "^/v1/"}}, '
                                  'notes: readers}') + 1
    assert err.splitlines()[0].startswith(f"{new}:{line}: proxies[0].rules[2].effect: "), err


def test_an_invalid_test_file_exits_2(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "tests.yaml").write_text(TESTS.replace("expect: {result: allow, status: 200}", "expct: {}"))
    code, out, err = run(capsys, "diff", str(files / "old.yaml"), str(files / "old.yaml"),
                         "--tests", str(files / "tests.yaml"))
    assert code == 2 and out == ""
    assert f"{files / 'tests.yaml'}:21: tests[4].expct: unknown field" in err


def test_tests_list_exactly_the_changed_cases_with_both_traces(
        files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = new_policy(files, edited('pattern: "^/v1/"}}, notes: readers}', 'pattern: "^/v1/orders"}}, notes: readers}'))
    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new, "--tests", str(files / "tests.yaml"))
    assert code == 1
    lines = out.splitlines()
    assert [line for line in lines if line.startswith("CHANGED")] == [
        f"CHANGED  a reader lists products  ({files / 'tests.yaml'}:7)"]
    at = lines.index(f"CHANGED  a reader lists products  ({files / 'tests.yaml'}:7)")
    assert lines[at + 1:at + 4] == [
        "      old  allow 200 allowed rule #2",
        "      new  deny 403 forbidden default",
        "      differs: result allow -> deny; status 200 -> 403; code allowed -> forbidden; rule #2 -> default",
    ]
    old_trace, new_trace = lines.index("      old trace:"), lines.index("      new trace:")
    assert old_trace < new_trace
    assert "        decision  ALLOW 200 allowed" in lines[old_trace:new_trace]
    assert "          -> #2 allow p100  MATCHED      all conditions match" in lines[old_trace:new_trace]
    assert "        decision  DENY 403 forbidden" in lines[new_trace:]
    assert ("             #2 allow p100  not matched  path '/v1/products' does not match '^/v1/orders' (must_exist)"
            in lines[new_trace:])
    assert lines[-1] == "1 of 5 cases change"


def test_a_renumbered_rule_still_decides_alike(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A rule added in front renumbers every rule after it; cases decided by those rules have not changed."""
    new = new_policy(files, edited("""    rules:
""", """    rules:
      - {effect: deny, token: [{claim: {pattern: "^banned$"}}], notes: banned callers}
"""))
    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new, "--tests", str(files / "tests.yaml"))
    assert code == 0, out
    assert out.splitlines()[2:] == [
        "0 of 5 cases change",
        "the policies differ (1 change) but no test case's decision does: run without --tests to see what changed",
    ]
    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new)
    assert code == 1
    assert """proxy orders: rule #0 (deny) "banned callers" added: token[0].claim '^banned$'""" in out.splitlines()


def test_json_for_ci(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    new = new_policy(files, edited('pattern: "^/v1/"}}, notes: readers}', 'pattern: "^/v1/orders"}}, notes: readers}'))
    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new, "--tests", str(files / "tests.yaml"), "--json")
    assert code == 1
    document = json.loads(out)
    assert document["differ"] is True
    assert document["old"]["file"] == str(files / "old.yaml") and document["new"]["file"] == new
    assert document["changes"] == [{
        "where": "proxy orders", "item": 'rule #2 (allow) "readers"', "change": "changed",
        "text": """proxy orders: rule #2 (allow) "readers" changed: pattern '^/v1/' -> '^/v1/orders'""",
        "fields": {"pattern": {"old": "^/v1/", "new": "^/v1/orders"}},
    }]
    tests = document["tests"]
    assert tests["cases"] == 5 and tests["summary"] == "1 of 5 cases change"
    [changed] = tests["changed"]
    assert changed["name"] == "a reader lists products" and changed["line"] == 7
    assert changed["old"]["result"] == "allow" and changed["new"]["result"] == "deny"
    assert changed["new"]["rule"] is None and changed["old"]["rule"] == 2
    assert [t["outcome"] for t in changed["new"]["trace"]] == ["not matched"] * 3

    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new_policy(files, REFORMATTED), "--json")
    assert code == 0
    assert json.loads(out)["differ"] is False and json.loads(out)["changes"] == []


def test_secrets_are_compared_but_never_printed(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    policy = """providers:
  - {name: hs, issuer: https://hs.example, hmacSecretFile: %(secret)s, audiences: [api], algorithms: [HS256]}
relationships:
  openfga:
    - {name: fga, url: "http://127.0.0.1:1", storeId: 01ARZ3NDEKTSV4RRFFQ69G5FAV,
       authorizationModelId: 01ARZ3NDEKTSV4RRFFQ69G5FAW}
  cache: {redis: {url: "redis://:%(password)s@redis:6379/0"}}
proxies:
  - name: api
    upstream: {targetCredential: {header: x-api-key, file: %(key)s}}
    rules: [{effect: allow}]
"""
    secrets = {"old": ("o" * 40, "old-redis-password", "old-upstream-key"),
               "new": ("n" * 40, "new-redis-password", "new-upstream-key")}
    for name, (secret, password, key) in secrets.items():
        (tmp_path / f"{name}-secret.txt").write_text(secret)
        (tmp_path / f"{name}-key.txt").write_text(key)
        # Same file names on both sides: only the secrets' values differ.
        (tmp_path / name).mkdir()
        (tmp_path / name / "secret.txt").write_text(secret)
        (tmp_path / name / "key.txt").write_text(key)
        (tmp_path / name / "policy.yaml").write_text(
            policy % {"secret": "secret.txt", "password": password, "key": "key.txt"})
    old, new = str(tmp_path / "old" / "policy.yaml"), str(tmp_path / "new" / "policy.yaml")
    code, out, _ = run(capsys, "diff", old, new)
    assert code == 1
    assert out.splitlines()[2:] == [
        "provider hs changed: hmacSecret changed (not shown)",
        "proxy api changed: upstream.targetCredential.value changed (not shown)",
        "relationship cache changed: redisUrl changed (redis://:***@redis:6379/0)",
        "3 changes",
    ]
    code, json_out, _ = run(capsys, "diff", old, new, "--json")
    assert code == 1
    for secret in (value for values in secrets.values() for value in values):
        assert secret not in out and secret not in json_out


RELATIONSHIPS = """providers:
  - {name: idp, issuer: https://idp.example, jwksUri: https://idp.example/jwks, audiences: [api]}
relationships:
  openfga:
    - {url: "http://127.0.0.1:1", storeId: 01ARZ3NDEKTSV4RRFFQ69G5FAV, authorizationModelId: 01ARZ3NDEKTSV4RRFFQ69G5FAW}
proxies:
  - name: docs
    rules:
%s      - effect: allow
        variables: [{name: doc, source: pathSegment, index: 1}]
        fga: {user: "user:{{sub}}", relation: viewer, object: "doc:{{doc}}"}
        notes: viewers
"""


def test_scripted_relationships_apply_by_rule_index_to_both_policies(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The test scripts rule #0; in NEW the relationship rule is #1, so its condition is unscripted there and
    fails closed: the case is listed (the documented choice), not silently answered from the old index."""
    (tmp_path / "old.yaml").write_text(RELATIONSHIPS % "")
    (tmp_path / "new.yaml").write_text(RELATIONSHIPS % "      - {effect: deny, methods: [DELETE], notes: no deletes}\n")
    (tmp_path / "tests.yaml").write_text("""policy: old.yaml
tests:
  - name: a viewer reads a doc
    request: {path: /docs/1}
    token: {claims: {sub: anne}}
    relationships: [{rule: 0, exists: true}]
    expect: {result: allow, rule: 0}
""")
    code, out, _ = run(capsys, "diff", str(tmp_path / "old.yaml"), str(tmp_path / "new.yaml"),
                       "--tests", str(tmp_path / "tests.yaml"))
    assert code == 1
    assert "      differs: result allow -> deny; status 200 -> 403; code allowed -> forbidden; rule #0 -> default" \
        in out.splitlines()
    assert "relationship unresolved" in out.split("      new trace:")[1]
    assert out.splitlines()[-1] == "1 of 1 cases change"


def test_a_case_that_cannot_run_against_new_is_a_change(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    first = "token: {claims: {sub: alice}}\n    expect: {result: allow, rule: 2, headers"
    assert TESTS.count(first) == 1
    (files / "tests.yaml").write_text(TESTS.replace(first, first.replace("}}", "}, provider: idp}")))
    new = new_policy(files, OLD.replace("name: idp,", "name: corp,"))
    code, out, _ = run(capsys, "diff", str(files / "old.yaml"), new, "--tests", str(files / "tests.yaml"))
    assert code == 1
    assert "      new  cannot run: no provider named 'idp' (defined: corp)" in out.splitlines()
    assert out.splitlines()[-1] == "1 of 5 cases change"
    # The other way round the test file does not fit the policy compared from: invalid input.
    code, out, err = run(capsys, "diff", new, str(files / "old.yaml"), "--tests", str(files / "tests.yaml"))
    assert code == 2 and out == ""
    assert err.strip() == (f"{files / 'tests.yaml'}:3: test 'a reader lists orders' cannot run against {new}: "
                           "no provider named 'idp' (defined: corp)")


def test_test_against_checks_expectations_on_the_primary_and_lists_what_the_other_changes(
        files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "tests.yaml").write_text(TESTS.replace("policy: no-such-policy.yaml", "policy: old.yaml"))
    new = new_policy(files, edited('pattern: "^/v1/"}}, notes: readers}', 'pattern: "^/v1/orders"}}, notes: readers}'))
    code, out, _ = run(capsys, "test", str(files / "tests.yaml"), "--against", new)
    assert code == 0, out  # every expectation holds for old.yaml; the other policy's decisions are only listed
    lines = out.splitlines()
    assert "5 passed, 0 failed" in lines
    at = lines.index("5 passed, 0 failed")
    assert lines[at + 1].startswith(f"{files / 'tests.yaml'}: against {new} (policy ")
    assert lines[at + 2:at + 6] == [
        f"CHANGED  a reader lists products  ({files / 'tests.yaml'}:7)",
        "      policy   allow 200 allowed rule #2",
        "      against  deny 403 forbidden default",
        "      differs: result allow -> deny; status 200 -> 403; code allowed -> forbidden; rule #2 -> default",
    ]
    assert "      policy trace:" in lines and "      against trace:" in lines
    assert lines[-1] == "1 of 5 cases change"

    # With the candidate as the tested policy, its failing expectation sets the exit code as always.
    code, out, _ = run(capsys, "test", str(files / "tests.yaml"), "--policy", new, "--against",
                       str(files / "old.yaml"))
    assert code == 1
    assert "4 passed, 1 failed" in out.splitlines()
    assert out.splitlines()[-1] == "1 of 5 cases change"


def test_test_against_an_invalid_policy_exits_2(files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (files / "tests.yaml").write_text(TESTS.replace("policy: no-such-policy.yaml", "policy: old.yaml"))
    new = new_policy(files, edited("- {effect: allow, methods: [GET]", "- {effect: permit, methods: [GET]"))
    code, _, err = run(capsys, "test", str(files / "tests.yaml"), "--against", new)
    assert code == 2
    assert f"{new}:" in err and "proxies[0].rules[2].effect" in err
