"""Envoy's HeaderMap messages as a plain dict, the same way for ext_authz and ext_proc."""

from __future__ import annotations

from typing import Any

# Where the Check's hand-off travels: ext_authz writes its dynamic metadata under its
# own filter name, and ext_proc's metadata_options forwards that namespace.
METADATA_NAMESPACE = "envoy.filters.http.ext_authz"

# Where a route names its proxy when it cannot set context_extensions: route metadata, which Envoy's
# ext_authz sends in the CheckRequest for the namespaces in route_metadata_context_namespaces.
ROUTE_METADATA_NAMESPACE = "extauthz"
ROUTE_METADATA_PROXY = "proxy"
# Envoy Gateway puts a route's own metadata under this namespace (ext auth's includeRouteMetadata: true):
# resources[].annotations holds the route's gateway.envoyproxy.io/ annotations with that prefix taken off.
GATEWAY_METADATA_NAMESPACE = "envoy-gateway"
GATEWAY_PROXY_ANNOTATION = "extauthz-proxy"


def header_map(headers: Any) -> dict[str, str]:
    """Lower-case name -> value; repeated lines are joined as an HTTP list (two content-encoding
    lines must both be seen). Envoy puts values in ``raw_value`` (bytes) in recent versions."""
    out: dict[str, str] = {}
    for header in headers.headers:
        value = header.raw_value.decode("utf-8", "replace") if header.raw_value else header.value
        name = header.key.lower()
        out[name] = f"{out[name]}, {value}" if name in out else value
    return out
