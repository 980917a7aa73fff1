"""Nothing is left behind: stacks, the demo and the CLI tools leave no ``extauthz-*`` temporary folders.

Each test gets a temporary folder of its own, for this process (``tempfile.tempdir``)
and for every process it starts (``TMPDIR``), so what other tests or engineers
create meanwhile in the shared ``/tmp`` never counts, and all that is found there
afterwards was left by the code under test.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.demo_process import running_demo
from tests.e2e.stack import running_stack

pytestmark = pytest.mark.envoy

POLICY = """
providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - {name: orders-api, rules: [{effect: allow}]}
"""


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The temporary folder of this test, for this process and the processes it starts."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    monkeypatch.setenv("TMPDIR", str(folder))
    yield folder


def ours(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("extauthz-"))


def cli(*args: str, check_exit: int = 0) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-m", "extauthz", *args],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == check_exit, done.stdout + done.stderr
    return done


def test_a_stack_leaves_no_temporary_folders(tmp_path: Path, scratch: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()
    with running_stack(workdir, POLICY) as stack:
        assert stack.request("GET", "/x", stack.idp.token(sub="u")).status == 200
        # Watching the right place: the rendered Envoy config lives there while Envoy runs.
        assert [name.rpartition("-")[0] for name in ours(scratch)] == ["extauthz-envoy"]
    assert ours(scratch) == []


def test_the_cli_tools_and_the_demo_leave_no_temporary_folders(tmp_path: Path, scratch: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text("""providers:
  - {name: idp, issuer: https://idp.example, jwksUri: "http://127.0.0.1:1/jwks", audiences: [api]}
relationships:
  openfga:
    - {name: fga, url: "http://127.0.0.1:1", storeId: 01HZX8M5Q2R7T9V3W4Y6Z8B0CD,
       authorizationModelId: 01HZX8N2K4M6P8R0T2V4X6Z8AB}
proxies:
  - name: api
    rules:
      - effect: allow
        variables: [{name: id, source: pathSegment, index: 1}]
        fga: {user: "user:{{sub}}", relation: viewer, object: "doc:{{id}}"}
""")
    tests = tmp_path / "policy.test.yaml"
    tests.write_text("""policy: policy.yaml
tests:
  - name: a viewer
    request: {path: /docs/1}
    token: {claims: {sub: anne}}
    relationships: [{rule: 0, exists: true}]
    expect: {result: allow, rule: 0}
""")
    cli("validate", str(policy))
    explained = cli("explain", "--config", str(policy), "GET", "/docs/1", "--claims", json.dumps({"sub": "u"}),
                    "--json")
    assert json.loads(explained.stdout)["result"] == "deny"  # the backend is unreachable: fails closed
    cli("test", str(tests))

    with running_demo() as (demo, _):
        assert sorted(name.rpartition("-")[0] for name in ours(scratch)) == ["extauthz-demo", "extauthz-envoy"]
    assert demo.returncode == 0
    assert ours(scratch) == []
