"""Nothing is left behind: a stack started and stopped leaves no temporary folders."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from tests.stack import running_stack

pytestmark = pytest.mark.envoy

POLICY = """
providers:
  - {name: idp, issuer: ISSUER, jwksUri: JWKS_URI, audiences: [orders-api]}
proxies:
  - {name: orders-api, rules: [{effect: allow}]}
"""


def test_a_stack_leaves_no_temporary_folders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))  # where Envoy's rendered config goes
    workdir = tmp_path / "work"
    workdir.mkdir()
    with running_stack(workdir, POLICY) as stack:
        assert stack.request("GET", "/x", stack.idp.token(sub="u")).status == 200
        assert any(scratch.iterdir())  # the rendered Envoy config lives there while Envoy runs
    assert list(scratch.iterdir()) == []
