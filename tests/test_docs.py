"""The docs cannot drift: every YAML/JSON block in README.md and docs/ is loaded by this test,
and the CLI transcripts in README.md are compared with what the CLI prints.

Each fenced block carries a marker on the line before it that says what it is:

* ``<!-- policy -->``: a policy, whole or the top-level keys of one (the rest filled
  with a minimal provider and proxy); loaded by the real loader. Only files it names
  (mounted secrets, certificates, documents) may be missing.
* ``<!-- policy-proxy -->``: the keys of one proxy (``filters:``, ``rules:``).
* ``<!-- policy-tests -->``: an ``extauthz test`` file, loaded by its loader.
* ``<!-- yaml: what -->`` / ``<!-- json: what -->``: another format (Kubernetes,
  Envoy, AuthZEN); it must parse.

A block without a marker fails the test, so a new example is checked from the day
it is written.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from extauthz.cli import main
from extauthz.policy.errors import PolicyError
from extauthz.policy.loader import parse_policy
from extauthz.toolbox.testing import load_suite

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
BLOCK = re.compile(r"(?:<!-- (?P<marker>[^>]*?) -->\n)?```(?P<lang>yaml|json)\n(?P<body>.*?)```", re.S)
BASE: dict[str, Any] = {
    "providers": [{"name": "idp", "issuer": "https://idp.example", "jwksUri": "https://idp.example/jwks",
                   "audiences": ["api"]}],
    "proxies": [{"name": "p"}],
}


def blocks() -> list[tuple[str, str, str]]:
    found = []
    for doc in DOCS:
        text = doc.read_text()
        for match in BLOCK.finditer(text):
            line = text[:match.start("lang")].count("\n") + 1
            found.append((f"{doc.relative_to(REPO)}:{line}", match.group("marker") or "", match.group("body")))
    return found


def _missing_file(message: str) -> bool:
    """Files an example names (mounted secrets, certificates, an OpenAPI document) are not in the repository."""
    return any(words in message for words in ("does not exist", "cannot read", "No such file"))


def load(where: str, text: str, tmp_path: Path) -> None:
    try:
        parse_policy(text, where, tmp_path)
    except PolicyError as exc:
        unexpected = [i for i in exc.issues if not _missing_file(i.message)]
        assert not unexpected, "\n".join(map(str, unexpected))


@pytest.mark.parametrize(("where", "marker", "body"), blocks(), ids=[b[0] for b in blocks()])
def test_every_example_in_the_docs_loads(where: str, marker: str, body: str, tmp_path: Path) -> None:
    kind = marker.split(":", 1)[0]
    if kind == "policy":
        document = {**BASE, **yaml.safe_load(body)}
        load(where, yaml.safe_dump(document, sort_keys=False), tmp_path)
    elif kind == "policy-proxy":
        document = {**BASE, "proxies": [{"name": "p", **yaml.safe_load(body)}]}
        load(where, yaml.safe_dump(document, sort_keys=False), tmp_path)
    elif kind == "policy-tests":
        (tmp_path / "tests.yaml").write_text(body)
        assert load_suite(tmp_path / "tests.yaml").cases
    elif kind == "yaml":
        assert yaml.safe_load(body) is not None
    elif kind == "json":
        json.loads(body)
    else:
        pytest.fail(f"{where}: mark the block with <!-- policy -->, <!-- policy-proxy -->, <!-- policy-tests -->, "
                    f"<!-- yaml: ... --> or <!-- json: ... --> on the line before it (found {marker!r})")


def test_the_docs_have_examples_to_check() -> None:
    assert len(blocks()) >= 10


def transcripts() -> list[tuple[list[str], list[str]]]:
    """The ``$ extauthz ...`` commands in README.md's shell blocks and the output shown under each."""
    text = (REPO / "README.md").read_text()
    found: list[tuple[list[str], list[str]]] = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        lines = block.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ extauthz "):
                i += 1
                continue
            command = lines[i][2:]
            while command.endswith("\\"):
                i += 1
                command = command[:-1] + lines[i].strip()
            i += 1
            shown: list[str] = []
            while i < len(lines) and not lines[i].startswith("$ "):
                shown.append(lines[i])
                i += 1
            found.append((shlex.split(command)[1:], [line for line in shown if line.strip()]))
    return found


@pytest.mark.parametrize(("argv", "shown"), transcripts(), ids=[" ".join(t[0][:2]) for t in transcripts()])
def test_readme_transcripts_are_what_the_cli_prints(
    argv: list[str], shown: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Lines shown in the README appear in the real output, in order; ``...`` stands for lines left out."""
    monkeypatch.chdir(REPO)
    main(argv)
    printed = [line.rstrip() for line in capsys.readouterr().out.splitlines()]
    position = 0
    for line in shown:
        if line.strip() == "...":
            continue
        assert line.rstrip() in printed[position:], f"README shows {line!r}, the CLI printed:\n" + "\n".join(printed)
        position = printed.index(line.rstrip(), position) + 1


def test_the_readme_has_transcripts_to_check() -> None:
    assert {argv[0] for argv, _ in transcripts()} >= {"explain", "test"}
