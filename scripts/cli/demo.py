"""`specd demo`: the real pair as local services (or in one process): the same prompts target-only and speculative,
tokens/s side by side, then one call through the OpenAI-compatible HTTP API."""
from __future__ import annotations


def add_commands(sub) -> None:
    demo = sub.add_parser("demo", help="the real pair as services (or in process): target-only vs speculative")
    demo.add_argument("--target", default=None, help="target folder (default: the fetched 1.5B)")
    demo.add_argument("--draft", default=None, help="draft folder (default: the fetched 0.5B)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--tp", type=int, default=None,
                      help="verifier tensor-parallel ranks (default: chosen from the cores, see the log line)")
    demo.add_argument("--in-process", action="store_true",
                      help="no services: target-only vs speculative in one process (tp=1 unless --tp)")
    demo.set_defaults(func=run_demo)


def run_demo(args) -> int:
    from common.models.fetch import DRAFT_MODEL, TARGET_MODEL, model_path
    target = args.target or str(model_path(TARGET_MODEL))
    draft = args.draft or str(model_path(DRAFT_MODEL))
    if args.in_process:
        from scripts.dev.demo_in_process import run_demo as run_in_process
        run_in_process(target, draft, dtype=args.dtype, max_new_tokens=args.max_tokens, tp_size=args.tp or 1)
    else:
        from scripts.dev.demo_services import run_services_demo
        run_services_demo(target, draft, dtype=args.dtype, tp=args.tp, max_tokens=args.max_tokens)
    return 0
