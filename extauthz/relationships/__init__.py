"""Relationship backends (OpenFGA, AuthZEN) behind the core's RelationshipResolver."""

from __future__ import annotations

import httpx

from extauthz.core.rules import NoRelationships, RelationshipResolver
from extauthz.policy.model import Policy


def build_resolver(policy: Policy, http: httpx.AsyncClient) -> RelationshipResolver:
    """The resolver for a policy's backends; with none configured, conditions stay unresolved."""
    return NoRelationships()
