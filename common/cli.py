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
    from common.models.fetch import DRAFT_MODEL, TARGET_MODEL, model_path
    run_demo(args.target or str(model_path(TARGET_MODEL)), args.draft or str(model_path(DRAFT_MODEL)),
             dtype=args.dtype, max_new_tokens=args.max_tokens, tp_size=args.tp)
    return 0


def _cmd_generate(args) -> int:
    import json
    import time

    from common.errors import SpecdError
    from common.llm import LLM
    from common.models.fetch import TARGET_MODEL, model_path
    from common.spec.sampling import SamplingParams
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, stop=args.stop or [], seed=args.seed)
        t0 = time.perf_counter()
        with LLM(args.target or str(model_path(TARGET_MODEL)), args.draft, num_speculative_tokens=args.k,
                 tp_size=args.tp, dtype=args.dtype, k_max=args.k_max) as llm:
            if not args.json:
                print(f"loaded in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
            for prompt in args.prompts:
                t = time.perf_counter()
                [out] = llm.generate([prompt], params, use_chat_template=args.chat)
                dt = time.perf_counter() - t
                if args.json:
                    print(json.dumps({**out.as_dict(), "prompt": prompt, "seconds": round(dt, 4)}))
                else:
                    s = out.stats
                    print(out.text)
                    print(f"[{len(out.token_ids)} tokens in {dt:.2f}s = {len(out.token_ids) / dt:.1f} tokens/s; "
                          f"finish={out.finish_reason}; rounds={s.rounds} drafted={s.drafted} accepted={s.accepted} "
                          f"acceptance={s.acceptance_rate:.2f} mean_acceptance_length={s.mean_acceptance_length:.2f}]",
                          file=sys.stderr)
    except (SpecdError, ValueError) as e:
        print(f"specd generate: {e}", file=sys.stderr)
        return 2
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

    demo = sub.add_parser("demo", help="target-only vs speculative generation on the real pair, with tokens/s")
    demo.add_argument("--target", default=None, help="target folder (default: the fetched 1.5B)")
    demo.add_argument("--draft", default=None, help="draft folder (default: the fetched 0.5B)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--tp", type=int, default=1)
    demo.set_defaults(func=_cmd_demo)
    gen = sub.add_parser("generate", help="generate text in process (speculative decoding)")
    gen.add_argument("prompts", nargs="+", help="one or more prompts")
    gen.add_argument("--target", default=None, help="target model folder (default: the fetched 1.5B)")
    gen.add_argument("--draft", default=None, help="draft model folder, or 'ngram' (default: none)")
    gen.add_argument("--k", default="4", help="speculative tokens per round: an integer or 'auto'")
    gen.add_argument("--k-max", type=int, default=8)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    gen.add_argument("--tp", type=int, default=1)
    gen.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt: text, token_ids, stats")
    gen.set_defaults(func=_cmd_generate)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
