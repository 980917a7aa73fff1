"""``extauthz demo-idp`` and ``extauthz demo-api``: the demo's identity provider and orders API as
long-running servers, one per container, for the Kubernetes quickstart (k8s/overlays/quickstart).

FOR DEMOS ONLY. ``demo-idp`` signs a token with whatever claims anyone asks it for
(``GET /token?sub=...``): whoever can reach it can be anybody to the APIs that trust it.
Its signing key is generated at start and never leaves the process, so a restart
invalidates every token it issued. Never point a real policy at it.
"""

from __future__ import annotations

import errno
import signal
import sys
import threading
import time
import urllib.parse
from typing import Any

from extauthz.cli import Exit
from extauthz.demo.idp import IdentityProvider
from extauthz.demo.upstream import SampleApi

DEMO_ONLY = "FOR DEMOS ONLY: it signs a token for any claims anyone asks for."
MAX_TTL_SECONDS = 24 * 3600
RESERVED_CLAIMS = frozenset({"iss", "iat", "exp", "nbf"})
LIST_CLAIMS = frozenset({"permissions", "roles", "groups"})
"""Claims that are lists of strings; a value may be comma-separated (``permissions=a,b``)."""


def issuer_url(value: str) -> str:
    """argparse type of ``--issuer``: an absolute http(s) URL, nothing after the path."""
    parts = urllib.parse.urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
        raise ValueError(value)
    return value


def mint(idp: IdentityProvider, query: str, audience: str) -> tuple[int, str, bytes]:
    """``GET /token?claim=value&...``: a signed JWT (text, one line) with these claims.

    ``aud`` (default the IdP's ``--audience``) and ``ttl`` (seconds, default 3600) shape the
    token; every other parameter is a claim: a string, or a list when repeated or when it is
    one of ``permissions``, ``roles``, ``groups`` (comma-separated values allowed).
    """
    fields = urllib.parse.parse_qs(query, keep_blank_values=True)
    reserved = sorted(RESERVED_CLAIMS & set(fields))
    if reserved:
        return _text(400, f"{', '.join(reserved)}: set by the IdP, not by the caller\n")
    ttl_values = fields.pop("ttl", ["3600"])
    try:
        ttl = int(ttl_values[-1])
    except ValueError:
        return _text(400, f"ttl: seconds, an integer (got {ttl_values[-1]!r})\n")
    if not 0 < ttl <= MAX_TTL_SECONDS:
        return _text(400, f"ttl: between 1 and {MAX_TTL_SECONDS} seconds\n")
    aud_values = fields.pop("aud", [audience])
    aud: str | list[str] = aud_values[0] if len(aud_values) == 1 else aud_values
    claims: dict[str, Any] = {}
    for name, values in fields.items():
        if name in LIST_CLAIMS:
            claims[name] = [v for value in values for v in value.split(",") if v]
        else:
            claims[name] = values[0] if len(values) == 1 else values
    now = int(time.time())
    token = idp.keys[0].sign({**claims, "iss": idp.issuer, "aud": aud, "iat": now, "exp": now + ttl})
    return _text(200, token + "\n")


def usage(idp: IdentityProvider, audience: str) -> str:
    return f"""extauthz demo-idp: {DEMO_ONLY}

issuer     {idp.issuer}
discovery  {idp.issuer.rstrip("/")}/.well-known/openid-configuration
jwks       {idp.jwks_uri}
tokens     GET /token?sub=user-123&tenant_id=acme&permissions=orders:read
           every parameter is a claim (permissions, roles, groups: lists, comma-separated);
           aud (default {audience}) and ttl (seconds, default 3600) shape the token.
"""


def _text(status: int, text: str) -> tuple[int, str, bytes]:
    return status, "text/plain; charset=utf-8", text.encode()


def _wait_for_signal() -> None:
    """Block until SIGTERM (Kubernetes stopping the container) or SIGINT (Ctrl-C)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _cannot_listen(command: str, host: str, port: int, exc: OSError) -> int:
    reason = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
    print(f"extauthz {command}: cannot listen on {host}:{port}: {reason}; choose another with --port",
          file=sys.stderr)
    return Exit.ADDRESS


def run_demo_idp(host: str, port: int, issuer: str | None, audience: str) -> int:
    try:
        idp = IdentityProvider(host=host, port=port)
    except OSError as exc:
        return _cannot_listen("demo-idp", host, port, exc)
    # The issuer is the URL clients and the sidecar use to reach this IdP (in a cluster,
    # its Service's DNS name), not the address the socket is bound to.
    if issuer is not None:
        idp.issuer = issuer
        idp.jwks_uri = f"{issuer.rstrip('/')}/.well-known/jwks.json"
    idp.routes["/token"] = lambda query: mint(idp, query, audience)
    idp.routes["/"] = lambda _query: _text(200, usage(idp, audience))
    with idp:
        print(f"{usage(idp, audience)}listening on {host}:{idp.port}", flush=True)
        _wait_for_signal()
    return 0


class _Recent(list[dict[str, Any]]):
    """The sample API records what it received (tests read it); a long-running one keeps the last few."""

    LIMIT = 100

    def append(self, item: dict[str, Any]) -> None:
        super().append(item)
        del self[:-self.LIMIT]


def run_demo_api(host: str, port: int) -> int:
    try:
        upstream = SampleApi(host=host, port=port)
    except OSError as exc:
        return _cannot_listen("demo-api", host, port, exc)
    upstream.requests = _Recent()
    with upstream:
        print(f"extauthz demo-api: the sample orders API on {host}:{upstream.port} "
              f"(GET /v1/orders; any other request is echoed back)", flush=True)
        _wait_for_signal()
    return 0
