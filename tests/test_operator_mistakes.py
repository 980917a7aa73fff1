"""Every operator mistake gets one clear line naming what is wrong, and an exit code of its own."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from extauthz.cli import Exit, main

POLICY = """providers:
  - {name: idp, issuer: https://idp.example, jwksUri: "http://127.0.0.1:1/jwks", audiences: [api]}
proxies:
  - {name: api, rules: [{effect: allow}]}
"""


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield int(s.getsockname()[1])


def serve(tmp_path: Path, *args: str, policy: str | None = POLICY, name: str = "policy.yaml",
          ) -> subprocess.CompletedProcess[str]:
    if policy is not None:
        (tmp_path / name).write_text(policy)
    return subprocess.run(
        [sys.executable, "-m", "extauthz", "serve", "--config", str(tmp_path / name), *args],
        check=False, capture_output=True, text=True, timeout=30,
    )


@pytest.mark.parametrize("flag, what", [
    ("--grpc-address", "gRPC"), ("--metrics-address", "metrics"), ("--admin-address", "admin"),
])
def test_a_busy_port_is_one_line_naming_the_address(tmp_path: Path, busy_port: int, flag: str, what: str) -> None:
    free = ["--grpc-address", "127.0.0.1:0"] if flag != "--grpc-address" else []
    done = serve(tmp_path, *free, flag, f"127.0.0.1:{busy_port}")
    assert done.returncode == Exit.ADDRESS, done.stderr
    line = f"extauthz: cannot serve: cannot listen on 127.0.0.1:{busy_port} ({what}"
    assert line in done.stderr and "address already in use" in done.stderr
    assert "Traceback" not in done.stderr and "Failed to bind" not in done.stderr


def test_a_missing_policy_file_is_not_an_invalid_policy(tmp_path: Path) -> None:
    done = serve(tmp_path, policy=None, name="nope.yaml")
    assert done.returncode == Exit.FILE and "nope.yaml" in done.stderr and "Traceback" not in done.stderr
    done = serve(tmp_path, policy="providers: []\nproxies: []\nbogus: 1\n", name="bad.yaml")
    assert done.returncode == Exit.POLICY and "bad.yaml:3: bogus" in done.stderr


def test_version_and_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as version:
        main(["--version"])
    assert version.value.code == 0 and capsys.readouterr().out.startswith("extauthz ")
    with pytest.raises(SystemExit) as usage:
        main(["serve"])
    assert usage.value.code == Exit.USAGE


def test_claims_that_are_not_a_json_object_say_so(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["explain", "--config", "x.yaml", "GET", "/", "--claims", "sub=user"])
    assert code == Exit.USAGE
    assert "--claims takes a JSON object" in capsys.readouterr().err


def test_the_demo_names_a_busy_port(busy_port: int, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--port", str(busy_port)]) == Exit.ADDRESS
    err = capsys.readouterr().err
    assert f"port {busy_port} (Envoy listener) is not available: already in use" in err and "--port" in err


def test_the_demo_without_a_source_checkout_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """``pip install .`` carries no envoy/envoy.yaml: the demo says how to get it, no traceback."""
    from extauthz.demo import runner

    monkeypatch.setattr(runner, "ENVOY_DIR", tmp_path / "site-packages" / "envoy")
    assert main(["demo"]) == Exit.MISSING
    err = capsys.readouterr().err
    assert "pip install -e '.[dev]'" in err and "envoy/envoy.yaml" in err


def test_explain_with_a_relationship_backend_closes_what_it_opens(tmp_path: Path) -> None:
    """No "Unclosed client session" after the answer: the resolver's pools are closed."""
    (tmp_path / "policy.yaml").write_text("""providers:
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
    done = subprocess.run(
        [sys.executable, "-m", "extauthz", "explain", "--config", str(tmp_path / "policy.yaml"),
         "GET", "/docs/1", "--claims", '{"sub": "u"}'],
        check=False, capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == Exit.OK, done.stderr
    assert "relationship unresolved" in done.stdout  # the backend was asked (and is unreachable)
    assert "Unclosed" not in done.stderr, done.stderr
