"""The one strict reader of policy files (YAML or JSON): duplicate keys refused, every value's line kept.

The loader, ``extauthz test`` and ``extauthz validate`` all read files through
:func:`read_document`, so a file is read the same way everywhere and every
error can name its line.
"""

from __future__ import annotations

from typing import Any

import yaml

from extauthz.policy.errors import Issue, PolicyError


class LDict(dict[str, Any]):
    line: int = 0
    lines: dict[str, int]


class LList(list[Any]):
    line: int = 0
    lines: list[int]


class LineLoader(yaml.SafeLoader):
    pass


def _construct_map(loader: LineLoader, node: yaml.MappingNode) -> LDict:
    loader.flatten_mapping(node)
    result = LDict()
    result.line = node.start_mark.line + 1
    result.lines = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            raise yaml.MarkedYAMLError(
                problem=f"field names must be strings, found {key!r}",
                problem_mark=key_node.start_mark,
            )
        if key in result:
            raise yaml.MarkedYAMLError(
                problem=f"duplicate field {key!r}", problem_mark=key_node.start_mark
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.lines[key] = value_node.start_mark.line + 1
    return result


def _construct_seq(loader: LineLoader, node: yaml.SequenceNode) -> LList:
    result = LList()
    result.line = node.start_mark.line + 1
    result.lines = []
    for child in node.value:
        result.append(loader.construct_object(child, deep=True))
        result.lines.append(child.start_mark.line + 1)
    return result


LineLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
LineLoader.add_constructor("tag:yaml.org,2002:seq", _construct_seq)


def syntax_issue(file: str, exc: yaml.MarkedYAMLError) -> Issue:
    """Where the broken construct starts (an unclosed quote or bracket), and where the parser gave up.

    The parser notices a missing ``"`` or ``]`` only lines later, so for an
    unclosed quoted scalar or flow collection the line an editor should jump to
    is where that construct began; for block structure (indentation) it is
    where the parser stopped.
    """
    problem, context = exc.problem_mark, exc.context_mark
    where = f" at line {problem.line + 1}, column {problem.column + 1}" if problem else ""
    message = f"not valid YAML/JSON: {exc.problem}{where}"
    if context is not None and exc.context:
        message += f" ({exc.context} at line {context.line + 1}, column {context.column + 1})"
    unclosed = context is not None and any(word in (exc.context or "") for word in ("scalar", "flow"))
    mark = context if unclosed else problem
    return Issue(file, (mark.line + 1) if mark else 0, "", message)



def read_document(raw: bytes, file: str) -> Any:
    """The parsed document with line numbers; :class:`PolicyError` naming the line when it is not YAML/JSON."""
    try:
        return yaml.load(raw, Loader=LineLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        raise PolicyError([syntax_issue(file, exc)]) from None
    except yaml.YAMLError as exc:
        raise PolicyError([Issue(file, 0, "", f"not valid YAML/JSON: {exc}")]) from None
