"""`specd models fetch|list`: download, verify and convert the shipped model pair, or show what is fetched."""
from __future__ import annotations

import sys


def add_commands(sub) -> None:
    models = sub.add_parser("models", help="fetch or list the shipped model pair").add_subparsers(
        dest="models_command", required=True)
    fetch = models.add_parser("fetch", help="download, verify and convert the models (idempotent)")
    fetch.add_argument("--models-dir", default=None, help="default: $SPECD_MODELS_DIR or ~/.cache/specd/models")
    fetch.add_argument("--only", nargs="*", help="model keys to fetch (default: all)")
    fetch.set_defaults(func=fetch_models)
    lst = models.add_parser("list", help="show the known models and whether they are fetched")
    lst.add_argument("--models-dir", default=None)
    lst.set_defaults(func=list_models)


def fetch_models(args) -> int:
    from common.models.errors import ModelFetchError
    from common.models.fetch import MODELS, fetch_all
    keys = args.only or list(MODELS)
    try:
        fetch_all(keys, args.models_dir)
    except ModelFetchError as e:
        print(f"specd models fetch: {e}", file=sys.stderr)
        return 1
    return 0


def list_models(args) -> int:
    from common.models.fetch import MODELS, is_fetched, model_path
    for key, src in MODELS.items():
        state = "fetched" if is_fetched(key, args.models_dir) else "missing"
        print(f"{key:32s} {src.role:8s} {state:8s} {model_path(key, args.models_dir)}")
    return 0
