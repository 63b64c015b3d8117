"""`specd generate`: speculative decoding in this process, or through a running gateway with `--gateway`."""
from __future__ import annotations

import sys


def add_commands(sub) -> None:
    from common.rpc.flags import add_client_tls_flags
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
    gen.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                     help="the target's weight-only quantization (activations stay in --dtype)")
    gen.add_argument("--draft-quantization", default="none", choices=["none", "int8", "int4"],
                     help="the draft model's weight-only quantization")
    gen.add_argument("--gguf", default=None, help="with --quantization int4: the target's GGUF, whose Q4_K codes "
                                                  "load as they are")
    gen.add_argument("--draft-gguf", default=None, help="the same for the draft")
    gen.add_argument("--json", action="store_true", help="one JSON object per prompt: text, token_ids, stats")
    gen.add_argument("--gateway", default=None, help="host:port: generate through a running gateway instead")
    add_client_tls_flags(gen)
    gen.add_argument("--api-key-file", default=None,
                     help="--gateway: file holding the API key to send (default: $SPECD_API_KEY, else none)")
    gen.set_defaults(func=generate)


def generate(args) -> int:
    if args.gateway:
        from scripts.cli.generate_remote import generate_via_gateway
        return generate_via_gateway(args)
    return generate_in_process(args)


def generate_in_process(args) -> int:
    import json
    import time

    from common.errors import SpecdError
    from common.llm import LLM
    from common.models.fetch import TARGET_MODEL, model_path
    from common.speculative.params import SamplingParams
    try:
        params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                                max_tokens=args.max_tokens, stop=args.stop or [], seed=args.seed)
        t0 = time.perf_counter()
        with LLM(args.target or str(model_path(TARGET_MODEL)), args.draft, num_speculative_tokens=args.k,
                 tp_size=args.tp, dtype=args.dtype, k_max=args.k_max, quantization=args.quantization,
                 draft_quantization=args.draft_quantization, gguf=args.gguf, draft_gguf=args.draft_gguf) as llm:
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
