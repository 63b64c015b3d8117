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
        from scripts.dev.demo_in_process import run_demo
        run_demo(target, draft, dtype=args.dtype, max_new_tokens=args.max_tokens, tp_size=args.tp)
    else:
        from scripts.dev.demo_services import run_services_demo
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
    from common.speculative.sampling import SamplingParams
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
    import os

    from common.errors import ConfigError
    from common.rpc.flags import tls_config
    from common.telemetry.tracing import CLIENT, setup_tracing, shutdown_tracing
    from gateway.client import SpecdClient
    try:
        tls = tls_config(args)
        api_key = _read_api_key(args.api_key_file) if args.api_key_file else os.environ.get("SPECD_API_KEY") or None
        client = SpecdClient(args.gateway, tls=tls, api_key=api_key)
    except ConfigError as e:
        print(f"specd generate: {e}", file=sys.stderr)
        return 2
    tracing = setup_tracing(CLIENT)            # OTEL_EXPORTER_OTLP_ENDPOINT set: the trace starts here
    try:
        return _generate_with(client, args)
    finally:
        shutdown_tracing(tracing)


def _read_api_key(path: str) -> str:
    from pathlib import Path

    from common.errors import ConfigError
    try:
        lines = [ln.strip() for ln in Path(path).read_text().splitlines()]
    except OSError as e:
        raise ConfigError(f"--api-key-file {path!r}: cannot be read ({e.strerror})") from None
    keys = [ln for ln in lines if ln and not ln.startswith("#")]
    if len(keys) != 1:
        raise ConfigError(f"--api-key-file {path!r}: must hold exactly one key, found {len(keys)}")
    return keys[0]


def _generate_with(client, args) -> int:
    import json

    import grpc

    with client:
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


def _cmd_up_local(args) -> int:
    import signal
    import time
    from pathlib import Path

    from common.models.fetch import DRAFT_MODEL, TARGET_MODEL, model_path
    from scripts.dev.topology import LocalTopology, read_state, running_processes
    state_dir = Path(args.state_dir)
    if args.detach and (state := read_state(state_dir)) and running_processes(state):
        print(f"specd up-local: already up (see {state_dir}); run `specd down-local --state-dir {state_dir}` first",
              file=sys.stderr)
        return 1
    try:
        metrics = _metrics_ports(args.metrics_ports)
    except ValueError as e:
        print(f"specd up-local: {e}", file=sys.stderr)
        return 2
    ports = {"gateway": args.gateway_port, "draft": args.draft_port, "verifier": args.verifier_port,
             **{f"{name}-metrics": port for name, port in metrics.items()}}
    # gRPC binds with SO_REUSEPORT: a second gateway on a busy port would start, and health checks would then
    # reach the first one. Refuse instead.
    busy = {name: port for name, port in ports.items() if not _port_free(port)}
    if busy:
        print(f"specd up-local: ports already in use: {busy} (pick others with --gateway-port/--draft-port/"
              f"--verifier-port/--metrics-ports, or stop what holds them)", file=sys.stderr)
        return 1
    topo = LocalTopology(args.target or str(model_path(TARGET_MODEL)), args.draft or str(model_path(DRAFT_MODEL)),
                         tp=args.tp, dtype=args.dtype, k=args.k,
                         ports=(args.gateway_port, args.draft_port, args.verifier_port),
                         log_dir=state_dir / "logs" if args.detach else None)
    for name, port in metrics.items():
        topo.service_env[name] = {"SPECD_METRICS_PORT": str(port)}
    if args.detach:
        return _up_detached(topo, args, state_dir)
    print(f"starting redis, verifier (tp={args.tp}), draft and gateway as local processes …", flush=True)
    try:
        _start_redis(topo, args)
        topo.start(timeout_s=args.timeout)
        print(f"up (plaintext, local only): {_describe(topo)}\n"
              f"try: specd generate --insecure --gateway 127.0.0.1:{topo.gateway_port} 'def fib(n):'"
              "   (Ctrl-C stops everything)", flush=True)
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


def _up_detached(topo, args, state_dir) -> int:
    """Start everything in the background, wait until all are SERVING, record pids and ports, return."""
    from scripts.dev.topology import STATE_FILE, down
    topo.log_dir.mkdir(parents=True, exist_ok=True)
    topo.on_spawn = lambda t: t.write_state(state_dir, "starting")   # a killed `up` still leaves a usable record
    print(f"starting redis, verifier (tp={args.tp}), draft and gateway in the background (logs: {topo.log_dir}) …",
          flush=True)
    try:
        _start_redis(topo, args)
        topo.start(timeout_s=args.timeout)
    except (RuntimeError, TimeoutError, OSError, KeyboardInterrupt) as e:
        print(f"specd up-local: {e or type(e).__name__}; stopping what started", file=sys.stderr)
        for name, proc in topo.procs.items():
            if proc.poll() is not None:
                log = topo.log_dir / f"{name}.log"
                tail = log.read_text(errors="replace").splitlines()[-20:] if log.exists() else []
                print(f"--- {log} (exit code {proc.returncode}), last lines:", *tail, sep="\n  ", file=sys.stderr)
        topo.stop()
        down(state_dir, grace_s=5, log=lambda _: None)
        return 1
    topo.write_state(state_dir, "up")
    print(f"up: {_describe(topo)}\nstate: {state_dir / STATE_FILE}\n"
          f"try:  specd generate --insecure --gateway 127.0.0.1:{topo.gateway_port} 'def fib(n):'\n"
          f"stop: specd down-local --state-dir {state_dir}", flush=True)
    return 0


def _start_redis(topo, args) -> None:
    if args.no_redis:
        return
    if not topo.start_redis(args.redis_port):
        print("specd up-local: warning: redis-server is not on PATH; starting without Redis (each service keeps "
              "its in-process prefix cache). Install it: apt-get install redis-server", file=sys.stderr, flush=True)


def _describe(topo) -> str:
    return "  ".join(f"{name} 127.0.0.1:{port}" for name, port in topo.ports().items())


def _metrics_ports(spec: str) -> dict[str, int]:
    """'G,D,V' → the gateway's, draft's and verifier's Prometheus ports; 'off' → none."""
    if spec.strip().lower() in ("off", "", "0"):
        return {}
    parts = spec.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and 0 < int(p) < 65536 for p in parts):
        raise ValueError(f"--metrics-ports={spec!r}: must be three ports GATEWAY,DRAFT,VERIFIER or 'off'")
    return dict(zip(("gateway", "draft", "verifier"), map(int, parts)))


def _port_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cmd_down_local(args) -> int:
    from pathlib import Path

    from scripts.dev.topology import STATE_FILE, down, read_state
    state_dir = Path(args.state_dir)
    if read_state(state_dir) is None:
        print(f"nothing to stop: no {state_dir / STATE_FILE}")
        return 0
    left = down(state_dir, grace_s=args.grace_s)
    if left:
        print("specd down-local: still there after stopping:\n  " + "\n  ".join(left), file=sys.stderr)
        return 1
    print("down: every process stopped, every port closed")
    return 0


def _cmd_health(args) -> int:
    from common.errors import ConfigError
    from common.rpc.flags import tls_config
    from common.rpc.health_check import check
    try:
        tls = tls_config(args)
    except ConfigError as e:
        print(f"specd health: {e}", file=sys.stderr)
        return 2
    ok, message = check(args.target, args.service, args.timeout, tls=tls)
    print(message)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    from common.rpc.flags import add_client_tls_flags
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
    add_client_tls_flags(gen)
    gen.add_argument("--api-key-file", default=None,
                     help="--gateway: file holding the API key to send (default: $SPECD_API_KEY, else none)")
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

    up = sub.add_parser("up-local", help="run redis, verifier (TP), draft and gateway as local processes "
                        "(plaintext gRPC on 127.0.0.1: local development)")
    up.add_argument("--target", default=None)
    up.add_argument("--draft", default=None)
    up.add_argument("--tp", type=int, default=2)
    up.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    up.add_argument("--k", default="auto")
    up.add_argument("--detach", action="store_true",
                    help="start in the background, return once all are SERVING; `specd down-local` stops them")
    up.add_argument("--state-dir", default=".specd-local", help="--detach: state file (pids, ports) and logs")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every service to serve")
    up.add_argument("--gateway-port", type=int, default=50051)
    up.add_argument("--draft-port", type=int, default=50052)
    up.add_argument("--verifier-port", type=int, default=50053)
    up.add_argument("--metrics-ports", default="9101,9102,9103",
                    help="Prometheus ports of gateway,draft,verifier, or 'off'")
    up.add_argument("--redis-port", type=int, default=0, help="0: a free port")
    up.add_argument("--no-redis", action="store_true", help="do not start redis-server")
    up.set_defaults(func=_cmd_up_local)

    down = sub.add_parser("down-local", help="stop what `specd up-local --detach` started; fail if anything is left")
    down.add_argument("--state-dir", default=".specd-local")
    down.add_argument("--grace-s", type=float, default=30.0, help="SIGTERM drain time before SIGKILL")
    down.set_defaults(func=_cmd_down_local)

    health = sub.add_parser("health", help="exit 0 if a service reports SERVING, else 1")
    health.add_argument("target", help="host:port")
    health.add_argument("--service", default="", help="service name (default: the server as a whole)")
    health.add_argument("--timeout", type=float, default=3.0)
    add_client_tls_flags(health)
    health.set_defaults(func=_cmd_health)
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


if __name__ == "__main__":
    sys.exit(main())
