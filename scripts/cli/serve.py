"""`specd draft|verifier|gateway`: serve one service. Each service's flags, checks and server live in its own
`<service>/main.py` (`add_arguments`, optional `check_args`, `serve`); this module only wires them in."""
from __future__ import annotations

import sys

SERVICES = (  # (subcommand, module, help)
    ("draft", "draft_service.main", "serve the draft model (DraftService)"),
    ("verifier", "verifier_service.main", "serve the target model (VerifierService)"),
    ("gateway", "gateway.main", "serve the public Gateway API"),
)


def add_commands(sub) -> None:
    import importlib
    for name, module, helptext in SERVICES:
        sp = sub.add_parser(name, help=helptext)
        importlib.import_module(module).add_arguments(sp)
        sp.set_defaults(func=_serve(module))


def _serve(module: str):
    def run(args) -> int:
        import asyncio
        import importlib

        from common.errors import ConfigError
        from common.rpc.flags import server_config
        service = importlib.import_module(module)
        try:
            server_config(args)            # TLS or --insecure, readable certificates: checked before any model loads
            if hasattr(service, "check_args"):
                service.check_args(args)
        except ValueError as e:            # ConfigError included
            print(f"specd {args.command}: {e}", file=sys.stderr)
            return 2
        try:
            asyncio.run(service.serve(args))
        except ConfigError as e:
            print(f"specd {args.command}: {e}", file=sys.stderr)
            return 2
        return 0
    return run
