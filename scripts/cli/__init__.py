"""The `specd` command line: `build_parser()` gathers the subcommands (one module each in this package), `main()`
runs one. Heavy imports (torch, grpc) wait inside the commands, so `specd --help` stays quick."""
from __future__ import annotations

import argparse
import logging

from scripts.cli import demo, generate, health, local, models, serve

# Subcommands in the order `specd --help` lists them.
COMMAND_MODULES = (models, demo, generate, serve, local, health)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specd", description="Speculative decoding as gRPC microservices.")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "command", None) in ("draft", "verifier"):
        # Before torch starts its OpenMP pool: CPU services take turns on the same cores (draft, then verify),
        # and idle threads that spin-wait steal them from the neighbour (measured: ~5% of gateway tokens/s).
        import os
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)
