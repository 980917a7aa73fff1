"""The import graph points one way: adapters -> decision core -> policy model.

The core (``extauthz/core``) is the plain decision pipeline the gRPC servicers,
the CLI and the tests all call; it must not reach into the adapters or the
backends it is given (identity, relationships, filtering, server), nor into
gRPC/protobuf. Checked on the source, imports inside functions included.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "extauthz"
CORE = sorted((PACKAGE / "core").glob("*.py"))
FORBIDDEN = ("extauthz.identity", "extauthz.server", "extauthz.filtering", "extauthz.relationships",
             "extauthz.admin", "extauthz.toolbox", "extauthz.demo", "extauthz.observability",
             "grpc", "google.protobuf", "envoy")


def imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.level:  # relative: resolve against the core package
                found.add("extauthz.core." + node.module)
            else:
                found.add(node.module)
    return found


@pytest.mark.parametrize("module", CORE, ids=[p.name for p in CORE])
def test_the_core_imports_no_adapter_backend_or_grpc(module: Path) -> None:
    bad = sorted(name for name in imports(module) if name.startswith(FORBIDDEN))
    assert not bad, f"extauthz/core/{module.name} imports {bad}"


def test_the_check_finds_what_it_looks_for() -> None:
    """The checker itself sees imports, nested ones included (a test that cannot fail is no test)."""
    sample = PACKAGE.parent / "tests" / "test_architecture.py"
    assert "ast" in imports(sample)
    assert "extauthz.identity.verifier" in imports(PACKAGE / "server" / "runtime.py")
