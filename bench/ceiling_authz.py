"""The HTTP ceiling: an ext_authz ``http_service`` that costs Envoy's side of a check and nothing more.

A second Envoy, with a worker of its own, answers every check request with a
fixed ``direct_response``: 200 and the headers extauthz's HTTP transport gives
the benchmark's caller on an unfiltered route (identity header, the token to
remove, the unfiltered mark, a decision id). The Envoy under test does exactly
what it does with extauthz behind ``envoy/envoy-http.yaml``; only the decision
is missing. Its throughput is the most any HTTP ext_authz server can reach on
the benchmark's machine and Envoy settings, whatever language it is written in:
the ratio between ``http_transport`` and this row is extauthz's own share.

One header more than extauthz's answer remains: Envoy dates every response it
writes, and the Envoy under test copies that ``date`` onto the upstream request
too. By ``bench.envoy_instructions`` that costs it ~2% more instructions per
request than behind extauthz, so the ceiling is that much low, not high.
"""

from __future__ import annotations

from typing import Any

from bench.workloads import CALLER

ALLOW_HEADERS = {
    "x-extauthz-decision-id": "00000000-0000-4000-8000-000000000000",
    "x-envoy-auth-headers-to-remove": "authorization",
    "x-extauthz-unfiltered": "1",
    "x-auth-sub": CALLER,
}
"""What extauthz answers the benchmark's allowed request with (seed policy, a route no filter covers)."""


def envoy_config(admin_port: int, port: int) -> dict[str, Any]:
    """An Envoy that allows every check request on ``port``: Envoy's fastest way to answer HTTP."""
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "static_resources": {"listeners": [{
            "name": "fixed_allow",
            "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": "envoy.filters.network.http_connection_manager",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3"
                             ".HttpConnectionManager",
                    "stat_prefix": "fixed_allow",
                    "server_header_transformation": "PASS_THROUGH",  # no server header for Envoy to copy upstream
                    "route_config": {"virtual_hosts": [{
                        "name": "allow",
                        "domains": ["*"],
                        "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}],
                        "response_headers_to_add": [
                            {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                            for key, value in ALLOW_HEADERS.items()],
                    }]},
                    "http_filters": [{
                        "name": "envoy.filters.http.router",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"},
                    }],
                },
            }]}],
        }]},
    }
