"""Attacks through a real stack: raw requests, probes, policies from the docs, hand-made tokens.

Every attack is tagged with a fresh ``x-probe`` header, so what the upstream
received for exactly that request can be found (:func:`attack`).
"""

from __future__ import annotations

import copy
import http.client
import json
import re
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extauthz.demo.idp import SigningKey
from tests.e2e.security.upstream import ORDERS, LenientUpstream
from tests.e2e.stack import Stack, Transport, running_stack

REPO = Path(__file__).resolve().parents[3]
Headers = list[tuple[str, str]]


@dataclass
class Seen:
    """One attack: what the caller received and what the upstream received for it."""

    status: int
    headers: dict[str, str]
    header_list: Headers
    body: bytes
    upstream: list[dict[str, Any]] = field(default_factory=list)
    error: str = ""
    """Set when the connection failed instead of answering (e.g. closed without a response)."""

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def reached(self) -> bool:
        return bool(self.upstream)

    def upstream_text(self) -> str:
        """Everything the upstream received (targets, header names and values, bodies) as one string."""
        return "\n".join(
            f"{r['method']} {r['path']}\n" + "\n".join(f"{k}: {v}" for k, v in r["header_list"]) + "\n" + r["body"]
            for r in self.upstream
        )


def send(port: int, method: str, target: str, headers: Headers | None = None, body: bytes | None = None,
         host: str | None = "localhost") -> tuple[int, dict[str, str], Headers, bytes, str]:
    """One HTTP/1.1 request with exactly these bytes: any method, path, duplicate or odd header names."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        if host is not None:
            conn.putheader("Host", host)
        for name, value in headers or []:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("content-length", str(len(body)))
        conn.endheaders(body)
        response = conn.getresponse()
        pairs = [(k.lower(), v) for k, v in response.getheaders()]
        return response.status, dict(pairs), pairs, response.read(), ""
    except (ConnectionError, http.client.HTTPException, OSError) as exc:
        return 0, {}, [], b"", f"{type(exc).__name__}: {exc}"
    finally:
        conn.close()


def attack(stack: Stack, method: str, target: str, headers: Headers | None = None, token: str | None = None,
           body: bytes | None = None, host: str | None = "localhost") -> Seen:
    probe = uuid.uuid4().hex
    sent = [("x-probe", probe), *(headers or [])]
    if token is not None:
        sent.append(("authorization", f"Bearer {token}"))
    status, hdrs, pairs, data, error = send(stack.ports.listener, method, target, sent, body, host)
    return Seen(status, hdrs, pairs, data, stack.upstream.seen(probe), error)


# --- what the caller saw ----------------------------------------------------------------------


def filtered_view(sub: str, allowlist: bool = True) -> dict[str, Any]:
    """The orders document as the docs' filters leave it for ``sub`` (allowlist), or without internalRef."""
    if allowlist:
        keep = ("orderId", "userId", "amount", "status")
        return {"orders": [{k: o[k] for k in keep} for o in ORDERS["orders"] if o["userId"] == sub]}
    view = copy.deepcopy(ORDERS)
    for order in view["orders"]:
        del order["internalRef"]
    return view


def is_blocked(seen: Seen) -> bool:
    """A JSON error in place of the response: ``{"error", "message", "decisionId"}``."""
    try:
        body = seen.json()
    except ValueError:
        return False
    return isinstance(body, dict) and {"error", "message", "decisionId"} <= body.keys()


def leaked_document(seen: Seen, expected: dict[str, Any]) -> bool:
    """Did the client get anything of the upstream's document other than exactly the filtered view?"""
    if seen.status == 206 or "content-range" in seen.headers:
        return True
    if not 200 <= seen.status < 300 or not seen.body:
        return False
    try:
        return bool(seen.json() != expected)
    except ValueError:
        return True


def label(seen: Seen, expected: dict[str, Any] | None = None) -> str:
    """``"403"``, ``"200 filtered"``, ``"502 blocked"``, ``"200 unfiltered"``, ``"no answer"``..."""
    if seen.error:
        return "no answer"
    bodiless_json = not seen.body and seen.headers.get("content-type") == "application/json"  # HEAD
    if seen.status in (502, 503) and (is_blocked(seen) or bodiless_json):
        return f"{seen.status} blocked"
    if expected is not None and 200 <= seen.status < 300:
        if seen.status == 206 or "content-range" in seen.headers:
            return f"{seen.status} partial"
        if not seen.body:
            return f"{seen.status} no body"
        return f"{seen.status} " + ("unfiltered" if leaked_document(seen, expected) else "filtered")
    return str(seen.status)


# --- policies and stacks ----------------------------------------------------------------------


def docs_filter_example() -> dict[str, Any]:
    """The first filter example of docs/response-filtering.md, as written there."""
    text = (REPO / "docs" / "response-filtering.md").read_text()
    block = re.search(r"```yaml\n(.*?)```", text, re.S)
    assert block is not None, "docs/response-filtering.md has no yaml example"
    loaded = yaml.safe_load(block.group(1))
    example: dict[str, Any] = loaded["filters"][0]
    return example


def policy(*proxies: dict[str, Any], providers: list[dict[str, Any]] | None = None,
           server: dict[str, Any] | None = None) -> str:
    """A policy file for the test IdP (``ISSUER`` and ``JWKS_URI`` are filled in by the stack)."""
    doc: dict[str, Any] = {
        "providers": providers or [{"name": "idp", "issuer": "ISSUER", "jwksUri": "JWKS_URI",
                                    "audiences": ["orders-api"]}],
        "proxies": list(proxies),
    }
    if server:
        doc["server"] = server
    return str(yaml.safe_dump(doc, sort_keys=False))


@contextmanager
def lenient_stack(workdir: Path, text: str, edit_envoy: Callable[[dict[str, Any]], None] | None = None,
                  files: dict[str, str] | None = None, transport: Transport = "grpc") -> Iterator[Stack]:
    """The shipped Envoy config of ``transport`` (ports rewritten, plus ``edit_envoy``) in front of the lenient
    upstream."""
    with running_stack(workdir, text, edit_envoy=edit_envoy, files=files,
                       upstream_factory=lambda port: LenientUpstream(port=port), transport=transport) as stack:
        yield stack


class Stacks(dict[str, Stack]):
    """Stacks by name, each started on first use (a module's fixture keeps them until its end)."""

    def __init__(self, start: Callable[[str], Stack]) -> None:
        super().__init__()
        self._start = start

    def __missing__(self, name: str) -> Stack:
        self[name] = self._start(name)
        return self[name]


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0][
        "typed_config"]
    return found


def ext_proc_config(config: dict[str, Any]) -> dict[str, Any]:
    """The ExternalProcessor message of the shipped config (inside its matcher wrapper, if any)."""
    wrapper = next(f for f in hcm(config)["http_filters"] if f["name"] == "envoy.filters.http.ext_proc")
    typed: dict[str, Any] = wrapper["typed_config"]
    if "extension_config" in typed:
        typed = typed["extension_config"]["typed_config"]
    return typed


# --- tokens signed from raw bytes ---------------------------------------------------------------


def sign_raw(key: SigningKey, header: bytes, payload: bytes) -> str:
    return key.sign_bytes(header, payload)
