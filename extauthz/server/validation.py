"""What the server checks beyond the policy loader, shared by ``serve``, hot reload and ``validate``.

The loader proves a policy is well formed; these checks prove the server can run
it: listen addresses parse (the unauthenticated admin service, and cleartext
gRPC, are loopback or Unix sockets only), TLS files are a usable
certificate/key pair, inline or file JWKS hold a usable signing key.
``extauthz validate`` runs exactly these, so CI rejects what the server would
reject, and every issue names ``file:line: field``.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from extauthz.errors import ExtauthzError
from extauthz.identity.jwks import parse_jwks  # the very parser the key sets use
from extauthz.policy.errors import Issue, PolicyError
from extauthz.policy.loader import ShapeCheck, parse_policy, policy_directory
from extauthz.policy.model import Policy, thaw
from extauthz.policy.source import LDict, LList, read_document
from extauthz.server.tls import TlsError, read_material


@dataclass(frozen=True)
class ListenAddress:
    """A TCP ``host:port`` or a Unix socket (``unix:/path``), as gRPC spells them."""

    spec: str
    host: str = ""
    port: int = 0
    unix_path: str = ""

    @property
    def is_unix(self) -> bool:
        return bool(self.unix_path)

    @property
    def is_loopback(self) -> bool:
        if self.is_unix:
            return True
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False

    async def serve(self, protocol: Callable[[], asyncio.Protocol], reuse_port: bool = False,
                    ) -> tuple[asyncio.Server, int]:
        """Listen here on the running loop; returns the server and the bound port (0 for a Unix socket).

        ``reuse_port``: workers (``serve --workers``) share the port, and the
        kernel spreads connections over them.
        """
        loop = asyncio.get_running_loop()
        inherited = inherited_socket(self.spec)
        if inherited is not None:  # a worker: the supervisor bound it, every worker accepts on it
            # asyncio (3.13+) would unlink the path when this worker's server closes: every worker's socket.
            keep: dict[str, Any] = {"cleanup_socket": False} if sys.version_info >= (3, 13) and isinstance(
                loop, asyncio.BaseEventLoop) else {}
            return await loop.create_unix_server(protocol, sock=inherited, **keep), 0
        if self.is_unix:
            return await loop.create_unix_server(protocol, sock=bind_unix(self.unix_path, self.spec)), 0
        server = await loop.create_server(protocol, self.host or None, self.port, reuse_address=True,
                                          reuse_port=reuse_port or None)
        return server, int(server.sockets[0].getsockname()[1])


# Owner and group may connect, others not, whatever the umask: in a pod, Envoy
# (another user, the same group) connects to a socket the sidecar creates.
UNIX_SOCKET_MODE = 0o660


def bind_unix(path: str, spec: str) -> socket.socket:
    """A bound, not yet listening, Unix socket at ``path``, mode :data:`UNIX_SOCKET_MODE`.

    A socket file left by a killed process is replaced, so a restarted sidecar
    gets its address back; one that a live process still answers on is not
    taken over (a second sidecar must fail, as on a busy TCP port), and a file
    that is not a socket is never deleted. The mode is set before ``listen``,
    so no one connects while the umask's mode is in force.
    """
    try:
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                probe.settimeout(1.0)
                found = probe.connect_ex(path)
            if found != errno.ECONNREFUSED:  # answered, busy, or not ours to judge: leave it be
                reason = "address already in use" if found in (0, errno.EAGAIN) else os.strerror(found)
                raise ListenError(f"cannot listen on {spec}: {reason}")
            os.unlink(path)  # nothing listens: a killed process's socket
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, UNIX_SOCKET_MODE)
    except OSError as exc:
        sock.close()
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ListenError(f"cannot listen on {spec}: {reason}") from None
    sock.setblocking(False)
    return sock


INHERITED_SOCKETS_ENV = "EXTAUTHZ_LISTEN_FDS"
"""Set by the workers' supervisor: ``{address: fd}`` of the listening Unix sockets it bound for them (JSON)."""


def inherited_socket(spec: str) -> socket.socket | None:
    """The listening socket for ``spec`` the supervisor handed this worker, if it did.

    A Unix socket cannot be shared with ``SO_REUSEPORT`` as a TCP port is: the
    supervisor binds it once (:func:`bind_unix`, ``listen``) and each worker
    accepts on that very socket, inherited as a file descriptor.
    """
    fds = os.environ.get(INHERITED_SOCKETS_ENV)
    if not fds:
        return None
    fd = json.loads(fds).get(spec)
    if not isinstance(fd, int):
        return None
    sock = socket.socket(fileno=fd)
    sock.setblocking(False)
    return sock


def parse_address(spec: str, unix: bool = True) -> ListenAddress:
    """Parse ``host:port``, ``[v6]:port`` or (when allowed) ``unix:/path``; raises ValueError."""
    if spec.startswith("unix:"):
        if not unix:
            raise ValueError(f"must be HOST:PORT, found {spec!r}")
        path = spec.removeprefix("unix:")
        if path.startswith("//"):  # unix:///abs/path, gRPC's URI form
            path = path[2:]
        if not path:
            raise ValueError("unix: needs a socket path, e.g. unix:/var/run/extauthz/extauthz.sock")
        return ListenAddress(spec, unix_path=path)
    host, sep, port = spec.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"must be HOST:PORT{' or unix:/PATH' if unix else ''}, found {spec!r}")
    return ListenAddress(spec, host=host, port=int(port))


class ListenError(ExtauthzError, OSError):
    """An address the server cannot listen on; the message names it and says why."""


def probe_listen(spec: str, what: str) -> None:
    """Bind and release a TCP address first, so a busy port is one clear line, not gRPC's traceback.

    Raises :class:`ListenError`. Unix sockets are left to the server (a stale
    socket file is replaced there).

    The probe binds with ``SO_REUSEADDR``, as every real listener does (asyncio's
    and uvloop's ``create_server`` on POSIX, grpc.aio always): "busy" must mean
    another socket *listens* there. Without it, the connections a crashed or
    OOM-killed sidecar leaves in TIME_WAIT (about a minute on Linux) made its
    replacement refuse to start, though its listeners would have bound fine.
    No ``SO_REUSEPORT``, though workers set it: they share their port among
    themselves only, and with it the probe would bind beside another process
    listening with ``SO_REUSEPORT`` (another sidecar's workers) and find the
    port free.
    """
    address = parse_address(spec)
    if address.is_unix:
        return
    family = socket.AF_INET6 if ":" in address.host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((address.host, address.port))
    except OSError as exc:
        reason = "address already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ListenError(f"cannot listen on {spec} ({what}): {reason}") from None


def parse_admin_address(spec: str) -> ListenAddress:
    """The admin service has no authentication, so it only listens on loopback or a Unix socket."""
    address = parse_address(spec)
    if not address.is_loopback:
        raise ValueError(f"the admin service is unauthenticated and binds to loopback only "
                         f"(127.0.0.1, ::1, localhost or unix:), found {spec!r}")
    return address


def line_of(document: object, dotted: str) -> int:
    """The line of a field such as ``providers[1].jwks`` in a document loaded with line numbers."""
    node = document
    line = 1
    for part in dotted.replace("[", ".[").split("."):
        if not part:
            continue
        if part.startswith("[") and isinstance(node, LList):
            index = int(part[1:-1])
            if index >= len(node):
                break
            line, node = node.lines[index], node[index]
        elif isinstance(node, LDict) and part in node:
            line, node = node.lines[part], node[part]
        else:
            break
    return line


def parse_http_address(spec: str) -> ListenAddress:
    """Loopback or a Unix socket only; raises ValueError.

    An allow answer carries the upstream credential and the caller's identity
    headers, and this listener has no TLS: only Envoy in the same pod may ask
    (the gRPC listener is the one for TLS/mTLS across a network).
    """
    address = parse_address(spec)
    if not address.is_loopback:
        raise ValueError(f"the HTTP ext_authz listener has no TLS and binds to loopback only "
                         f"(127.0.0.1, ::1, localhost or unix:), found {spec!r}")
    return address


CLEARTEXT_GRPC_FIX = "set server.tls or bind 127.0.0.1/unix:"


def parse_grpc_address(spec: str, tls: bool) -> ListenAddress:
    """Any address with TLS; without it, loopback or a Unix socket only; raises ValueError.

    Every Check carries a caller's bearer token and an allow answer the
    upstream credential: in cleartext, only a peer on the same host (Envoy in
    the pod) may see them.
    """
    address = parse_address(spec)
    if not tls and not address.is_loopback:
        raise ValueError(f"the gRPC listener without TLS binds to loopback only (Checks carry callers' "
                         f"tokens, allow answers the upstream credential): {CLEARTEXT_GRPC_FIX}, found {spec!r}")
    return address


def serving_issues(policy: Policy, text: bytes | str) -> list[Issue]:
    """Everything that would stop ``extauthz serve`` from running this policy."""
    try:
        document: object = read_document(text.encode() if isinstance(text, str) else text, policy.source)
    except PolicyError:
        document = None
    issues: list[Issue] = []

    def issue(field: str, message: str) -> None:
        issues.append(Issue(policy.source, line_of(document, field), field, message))

    server = policy.server
    checks: list[tuple[str, str, Callable[[str], ListenAddress]]] = [
        ("server.grpcAddress", server.grpc_address, lambda s: parse_grpc_address(s, server.tls is not None)),
        ("server.httpAddress", server.http_address, parse_http_address),
        ("server.metricsAddress", server.metrics_address, lambda s: parse_address(s, unix=False)),
        ("server.adminAddress", server.admin_address, parse_admin_address),
    ]
    for field, value, parse in checks:
        if value:
            try:
                parse(value)
            except ValueError as exc:
                issue(field, str(exc))
    if server.tls is not None:
        try:
            read_material(server.tls)
        except TlsError as exc:
            issue(f"server.tls.{exc.field}", exc.message)
    for index, provider in enumerate(policy.providers.values()):
        field = f"providers[{index}]"
        if provider.jwks_inline is not None:
            try:
                parse_jwks(thaw(provider.jwks_inline))
            except ValueError as exc:
                issue(f"{field}.jwks", f"provider {provider.name}: {exc}")
        if provider.jwks_file:
            try:
                parse_jwks(json.loads(Path(provider.jwks_file).read_bytes()))
            except OSError as exc:
                issue(f"{field}.jwksFile", f"cannot read {provider.jwks_file}: {exc.strerror}")
            except ValueError as exc:  # JSONDecodeError is a ValueError
                issue(f"{field}.jwksFile", f"{provider.jwks_file}: {exc}")
    return sorted(issues, key=lambda i: i.line)


def load_for_serving(path: str | os.PathLike[str], *, shape_in_child: bool = False,
                     started: ShapeCheck | None = None) -> Policy:
    """Load a policy and run the server's checks; raises :class:`PolicyError` with every issue.

    The file is read once, so the line numbers of the server checks refer to the
    very bytes that were parsed even if the file is swapped meanwhile.
    ``shape_in_child`` is for long-running processes (the server, the workers'
    supervisor): the loader's shape pass then runs in a short child process,
    so pydantic's memory is not held for the life of the server (see
    :func:`extauthz.policy.loader.parse_policy`); the checks are the same.
    """
    file = Path(path)
    try:
        text = file.read_bytes()
    except OSError as exc:
        raise PolicyError([Issue(str(file), 0, "", f"cannot read policy: {exc.strerror}")]) from None
    policy = parse_policy(text, str(file), policy_directory(file), shape_in_child=shape_in_child, started=started)
    issues = serving_issues(policy, text)
    if issues:
        raise PolicyError(issues)
    return policy
