"""Resolve a rule's or filter's variables against the request and the verified claims.

A variable that cannot be resolved is simply absent from the result; whatever
uses it then fails closed (docs/policy.md), so there is no "empty string" fallback
that could widen a pattern.
"""

from __future__ import annotations

from collections.abc import Iterable

from extauthz.core.claims import Claims
from extauthz.core.request import HttpRequest
from extauthz.policy.model import Variable, VariableSource


def builtins(request: HttpRequest, claims: Claims) -> dict[str, str]:
    values = {"method": request.method, "host": request.host, "path": request.path}
    if claims.sub is not None:
        values["sub"] = claims.sub
    return values


def resolve(
    variables: Iterable[Variable], request: HttpRequest | None, claims: Claims
) -> dict[str, str]:
    """Built-in variables (``sub``, ``method``, ``host``, ``path``) plus the declared ones."""
    values = builtins(request, claims) if request is not None else {}
    if claims.sub is not None:
        values["sub"] = claims.sub
    for variable in variables:
        value = _value(variable, request, claims)
        if value is None:
            values.pop(variable.name, None)
        else:
            values[variable.name] = value
    return values


def _value(variable: Variable, request: HttpRequest | None, claims: Claims) -> str | None:
    source = variable.source
    if source is VariableSource.JWT_CLAIM:
        return claims.lookup(variable.key)
    if request is None:
        return None
    if source is VariableSource.HEADER:
        return request.headers.get(variable.key)
    if source is VariableSource.QUERY:
        found = request.query.get(variable.key)
        return found[0] if found and len(found) == 1 else None  # ambiguous repeats fail closed
    if source is VariableSource.PATH_SEGMENT:
        segments = request.segments
        try:
            return segments[variable.index]
        except IndexError:
            return None
    if source is VariableSource.METHOD:
        return request.method
    if source is VariableSource.HOST:
        return request.host
    return request.path
