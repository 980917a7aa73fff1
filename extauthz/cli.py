"""The ``extauthz`` command: serve, validate, demo."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from extauthz.policy.errors import PolicyError
from extauthz.policy.loader import load_policy

EXAMPLE_POLICY = Path(__file__).parent / "examples" / "policy.yaml"


def _serve(args: argparse.Namespace) -> int:
    from extauthz.observability.logging import configure
    from extauthz.server.app import serve

    configure(args.log_format, args.log_level)
    try:
        asyncio.run(serve(Path(args.config), args.grpc_address))
    except PolicyError as exc:
        print(f"extauthz: policy rejected:\n{exc}", file=sys.stderr)
        return 2
    return 0


def _validate(args: argparse.Namespace) -> int:
    status = 0
    for file in args.files:
        try:
            policy = load_policy(file)
        except PolicyError as exc:
            print(exc, file=sys.stderr)
            status = 1
            continue
        rules = sum(len(p.rules) for p in policy.proxies)
        filters = sum(len(p.filters) for p in policy.proxies)
        print(f"{file}: OK (digest {policy.digest}; {len(policy.providers)} providers, "
              f"{len(policy.proxies)} proxies, {rules} rules, {filters} filters)")
    return status


def _demo(args: argparse.Namespace) -> int:
    from extauthz.demo.runner import run_demo

    return run_demo(listen_port=args.port, idp_port=args.idp_port)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="extauthz", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the gRPC ext_authz/ext_proc server")
    serve.add_argument("--config", required=True, help="policy file (YAML or JSON)")
    serve.add_argument("--grpc-address", help="HOST:PORT to listen on (overrides server.grpcAddress)")
    serve.add_argument("--log-format", choices=["json", "console"], default="json")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=_serve)

    validate = commands.add_parser("validate", help="check policy files; exit 1 on any error")
    validate.add_argument("files", nargs="+")
    validate.set_defaults(func=_validate)

    demo = commands.add_parser("demo", help="run Envoy + extauthz + a sample app on the sample policy")
    demo.add_argument("--port", type=int, default=8080, help="Envoy listener port")
    demo.add_argument("--idp-port", type=int, default=8090, help="port of the local identity provider")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    result: int = args.func(args)
    return result
