"""Which response filters a request falls under, decided from the request alone.

Shared by the Check (to drop ``Range`` before the upstream answers, so the
answer is a whole document) and the response phase (to filter). A filter's
scope errs towards applying: HEAD and OPTIONS read as GET, any reading of the
path counts, with or without a trailing slash (a scope written ``^/v1/docs$``
also covers ``/v1/docs/``), and a path scope whose variable is unresolved
applies.
"""

from __future__ import annotations

from collections.abc import Mapping

from extauthz.core.normalize import method_matches
from extauthz.policy.matchers import Matcher
from extauthz.policy.model import Filter


def _path_matches(regex: Matcher, paths: tuple[str, ...]) -> bool:
    """Any reading of the path, with or without a trailing slash: a scope never misses ``/v1/docs/``."""
    for path in paths:
        if regex.matches(path):
            return True
        other = path[:-1] if path.endswith("/") and len(path) > 1 else path + "/"
        if regex.matches(other):
            return True
    return False


def request_in_scope(
    flt: Filter, methods: tuple[str, ...], paths: tuple[str, ...], values: Mapping[str, str]
) -> bool:
    """Could this filter apply to responses of this request? (Its status scope is checked on the response.)

    ``methods`` are the request's own and any it claims through an override.
    """
    if flt.methods is not None and not any(method_matches(flt.methods, m) for m in methods):
        return False
    if flt.path is not None:
        compiled = flt.path.bind(values)
        if compiled is not None and not _path_matches(compiled, paths):
            return False
    return True
