"""Policy errors that name the file, the line and the field, so they can be fixed."""

from __future__ import annotations

from dataclasses import dataclass

from extauthz.errors import ExtauthzError


@dataclass(frozen=True)
class Issue:
    file: str
    line: int
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.file}:{self.line}" if self.line else self.file
        return f"{where}: {self.field or '<root>'}: {self.message}"


class PolicyError(ExtauthzError):
    """Every problem found in one policy file; the running policy is never replaced by it."""

    def __init__(self, issues: list[Issue]) -> None:
        self.issues = tuple(issues)
        super().__init__("\n".join(str(issue) for issue in issues))
