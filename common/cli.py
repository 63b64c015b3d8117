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
    from common.models.fetch import DRAFT_MODEL, TARGET_MODEL, model_path
    target = args.target or str(model_path(TARGET_MODEL))
    draft = args.draft or str(model_path(DRAFT_MODEL))
    if args.in_process:
        from common.engine.demo import run_demo
        run_demo(target, draft, dtype=args.dtype, max_new_tokens=args.max_tokens, tp_size=args.tp)
    else:
        from gateway.demo import run_services_demo
        run_services_demo(target, draft, dtype=args.dtype, tp=args.tp, max_tokens=args.max_tokens)
    return 0


def _cmd_generate(args) -> int:
    import json
    import time

    if args.gateway:
        return _generate_via_gateway(args)

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


def _generate_via_gateway(args) -> int:
    import json

    import grpc

    from gateway.client import SpecdClient
    with SpecdClient(args.gateway) as client:
        for prompt in args.prompts:
            kwargs = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, seed=args.seed, stop=args.stop, use_chat_template=args.chat,
                          num_speculative_tokens=args.k)
            try:
                if args.json:
                    r = client.generate(prompt, **kwargs)
                    print(json.dumps({"prompt": prompt, "text": r.text, "token_ids": list(r.token_ids),
                                      "finish_reason": r.finish_reason, "stats": {
                                          "rounds": r.stats.rounds, "drafted": r.stats.drafted,
                                          "accepted": r.stats.accepted, "acceptance_rate": r.stats.acceptance_rate,
                                          "mean_acceptance_length": r.stats.mean_acceptance_length,
                                          "total_ms": r.stats.total_ms}}))
                    continue
                for chunk in client.stream(prompt, **kwargs):
                    print(chunk.text, end="", flush=True)
                    if chunk.finish_reason:
                        s = chunk.stats
                        n = sum(s.accepted_per_position) + s.rounds
                        print(f"\n[finish={chunk.finish_reason} rounds={s.rounds} acceptance={s.acceptance_rate:.2f}"
                              f" mean_acceptance_length={s.mean_acceptance_length:.2f} "
                              f"{n / max(s.total_ms, 1e-9) * 1000:.1f} tokens/s]", file=sys.stderr)
            except grpc.RpcError as e:
                print(f"specd generate: {e.code().name}: {e.details()}", file=sys.stderr)
                return 2
    return 0


def _serve(module: str):
    def run(args) -> int:
        import asyncio
        import importlib
        asyncio.run(importlib.import_module(module).serve(args))
        return 0
    return run


def _cmd_up_local(args) -> int:
    import signal
    import time

    from common.models.fetch import DRAFT_MODEL, TARGET_MODEL, model_path
    from gateway.topology import LocalTopology
    topo = LocalTopology(args.target or str(model_path(TARGET_MODEL)), args.draft or str(model_path(DRAFT_MODEL)),
                         tp=args.tp, dtype=args.dtype, k=args.k)
    print(f"starting verifier (tp={args.tp}), draft and gateway as local processes …", flush=True)
    try:
        topo.start()
        print(f"up: gateway 127.0.0.1:{topo.gateway_port}  draft :{topo.draft_port}  verifier :{topo.verifier_port}"
              "\ntry: specd generate --gateway 127.0.0.1:50051 'def fib(n):'   (Ctrl-C stops everything)", flush=True)
        signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
        while all(p.poll() is None for p in topo.procs.values()):
            time.sleep(1)
        print("a service exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        topo.stop()
        print("stopped", flush=True)


def _cmd_health(args) -> int:
    from common.rpc.health_check import check
    ok, message = check(args.target, args.service, args.timeout)
    print(message)
    return 0 if ok else 1


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

    demo = sub.add_parser("demo", help="the real pair as services (or in process), streamed, with stats")
    demo.add_argument("--target", default=None, help="target folder (default: the fetched 1.5B)")
    demo.add_argument("--draft", default=None, help="draft folder (default: the fetched 0.5B)")
    demo.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    demo.add_argument("--max-tokens", type=int, default=96)
    demo.add_argument("--tp", type=int, default=2, help="verifier tensor-parallel ranks")
    demo.add_argument("--in-process", action="store_true",
                      help="no services: target-only vs speculative in one process (tp=1 unless --tp)")
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
    gen.add_argument("--gateway", default=None, help="host:port: generate through a running gateway instead")
    gen.set_defaults(func=_cmd_generate)

    from draft_service.main import add_arguments as draft_args
    from gateway.main import add_arguments as gateway_args
    from verifier_service.main import add_arguments as verifier_args
    for name, add, module, helptext in (
            ("draft", draft_args, "draft_service.main", "serve the draft model (DraftService)"),
            ("verifier", verifier_args, "verifier_service.main", "serve the target model (VerifierService)"),
            ("gateway", gateway_args, "gateway.main", "serve the public Gateway API")):
        sp = sub.add_parser(name, help=helptext)
        add(sp)
        sp.set_defaults(func=_serve(module))

    up = sub.add_parser("up-local", help="run verifier (TP), draft and gateway as local processes")
    up.add_argument("--target", default=None)
    up.add_argument("--draft", default=None)
    up.add_argument("--tp", type=int, default=2)
    up.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    up.add_argument("--k", default="auto")
    up.set_defaults(func=_cmd_up_local)

    health = sub.add_parser("health", help="exit 0 if a service reports SERVING, else 1")
    health.add_argument("target", help="host:port")
    health.add_argument("--service", default="", help="service name (default: the server as a whole)")
    health.add_argument("--timeout", type=float, default=3.0)
    health.set_defaults(func=_cmd_health)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
