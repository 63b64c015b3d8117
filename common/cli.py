"""The `specd` command line: model fetching, the demo, and (later) the services."""
from __future__ import annotations

import argparse
import logging
import sys


def _cmd_models_fetch(args) -> int:
    from common.models.fetch import MODELS, ModelFetchError, fetch_all
    keys = args.only or list(MODELS)
    try:
        fetch_all(keys, args.models_dir)
    except ModelFetchError as e:
        print(f"specd models fetch: {e}", file=sys.stderr)
        return 1
    return 0


def _cmd_models_list(args) -> int:
    from common.models.fetch import MODELS, is_fetched, model_path
    for key, src in MODELS.items():
        state = "fetched" if is_fetched(key, args.models_dir) else "missing"
        print(f"{key:32s} {src.role:8s} {state:8s} {model_path(key, args.models_dir)}")
    return 0


def _cmd_demo(args) -> int:
    from common.engine.demo import run_demo
    from common.models.fetch import TARGET_MODEL, model_path
    run_demo(args.model or str(model_path(TARGET_MODEL)), dtype=args.dtype, max_new_tokens=args.max_tokens,
             tp_size=args.tp)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="specd", description="Speculative decoding as gRPC microservices.")
    p.add_argument("--log-level", default="WARNING")
    sub = p.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="fetch or list the shipped model pair").add_subparsers(
        dest="models_command", required=True)
    fetch = models.add_parser("fetch", help="download, verify and convert the models (idempotent)")
    fetch.add_argument("--models-dir", default=None, help="default: $SPECD_MODELS_DIR or ~/.cache/specd/models")
    fetch.add_argument("--only", nargs="*", help="model keys to fetch (default: all)")
    fetch.set_defaults(func=_cmd_models_fetch)
    lst = models.add_parser("list", help="show the known models and whether they are fetched")
    lst.add_argument("--models-dir", default=None)
    lst.set_defaults(func=_cmd_models_list)

    demo = sub.add_parser("demo", help="generate with the real target model and print tokens/s")
    demo.add_argument("--model", default=None, help="model folder (default: the fetched target)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    demo.add_argument("--max-tokens", type=int, default=64)
    demo.add_argument("--tp", type=int, default=1)
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
