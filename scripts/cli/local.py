"""`specd up-local` / `specd down-local`: the whole topology (redis, verifier TP, draft, gateway) as local
processes for development, in the foreground or detached with a state file that `down-local` reads."""
from __future__ import annotations

import sys


def add_commands(sub) -> None:
    up = sub.add_parser("up-local", help="run redis, verifier (TP), draft and gateway as local processes "
                        "(plaintext gRPC on 127.0.0.1: local development)")
    up.add_argument("--target", default=None)
    up.add_argument("--draft", default=None)
    up.add_argument("--tp", type=int, default=2)
    up.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    up.add_argument("--k", default="auto")
    up.add_argument("--quantization", default="none", choices=["none", "int8", "int4"],
                    help="the verifier's weight-only quantization (SPECD_QUANTIZATION)")
    up.add_argument("--draft-quantization", default="none", choices=["none", "int8", "int4"],
                    help="the draft service's (its SPECD_QUANTIZATION)")
    up.add_argument("--detach", action="store_true",
                    help="start in the background, return once all are SERVING; `specd down-local` stops them")
    up.add_argument("--state-dir", default=".specd-local", help="--detach: state file (pids, ports) and logs")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for every service to serve")
    up.add_argument("--gateway-port", type=int, default=50051)
    up.add_argument("--http-port", type=int, default=8000, help="the gateway's OpenAI-compatible HTTP API (0 = off)")
    up.add_argument("--draft-port", type=int, default=50052)
    up.add_argument("--verifier-port", type=int, default=50053)
    up.add_argument("--metrics-ports", default="9101,9102,9103",
                    help="Prometheus ports of gateway,draft,verifier, or 'off'")
    up.add_argument("--redis-port", type=int, default=0, help="0: a free port")
    up.add_argument("--no-redis", action="store_true", help="do not start redis-server")
    up.set_defaults(func=up_local)

    down = sub.add_parser("down-local", help="stop what `specd up-local --detach` started; fail if anything is left")
    down.add_argument("--state-dir", default=".specd-local")
    down.add_argument("--grace-s", type=float, default=30.0, help="SIGTERM drain time before SIGKILL")
    down.set_defaults(func=down_local)


def up_local(args) -> int:
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
        metrics = metrics_ports(args.metrics_ports)
    except ValueError as e:
        print(f"specd up-local: {e}", file=sys.stderr)
        return 2
    ports = {"gateway": args.gateway_port, "draft": args.draft_port, "verifier": args.verifier_port,
             **({"gateway-http": args.http_port} if args.http_port else {}),
             **{f"{name}-metrics": port for name, port in metrics.items()}}
    # gRPC binds with SO_REUSEPORT: a second gateway on a busy port would start, and health checks would then
    # reach the first one. Refuse instead.
    busy = {name: port for name, port in ports.items() if not port_free(port)}
    if busy:
        print(f"specd up-local: ports already in use: {busy} (pick others with --gateway-port/--draft-port/"
              f"--verifier-port/--http-port/--metrics-ports, or stop what holds them)", file=sys.stderr)
        return 1
    topo = LocalTopology(args.target or str(model_path(TARGET_MODEL)), args.draft or str(model_path(DRAFT_MODEL)),
                         tp=args.tp, dtype=args.dtype, k=args.k,
                         ports=(args.gateway_port, args.draft_port, args.verifier_port),
                         log_dir=state_dir / "logs" if args.detach else None, http_port=args.http_port)
    for name, port in metrics.items():
        topo.service_env[name] = {"SPECD_METRICS_PORT": str(port)}
    topo.service_env["verifier"]["SPECD_QUANTIZATION"] = args.quantization
    topo.service_env["draft"]["SPECD_QUANTIZATION"] = args.draft_quantization
    if args.detach:
        return _up_detached(topo, args, state_dir)
    print(f"starting redis, verifier (tp={args.tp}), draft and gateway as local processes …", flush=True)
    try:
        _start_redis(topo, args)
        topo.start(timeout_s=args.timeout)
        print(f"up (plaintext, local only): {_describe(topo)}\n"
              f"try: specd generate --insecure --gateway 127.0.0.1:{topo.gateway_port} 'def fib(n):'"
              f"{_http_hint(topo)}   (Ctrl-C stops everything)", flush=True)
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
          f"try:  specd generate --insecure --gateway 127.0.0.1:{topo.gateway_port} 'def fib(n):'{_http_hint(topo)}\n"
          f"stop: specd down-local --state-dir {state_dir}", flush=True)
    return 0


def _http_hint(topo) -> str:
    if not topo.http_port:
        return ""
    return f"\n  or:  OpenAI clients at base_url=http://127.0.0.1:{topo.http_port}/v1 (e.g. curl .../v1/models)"


def _start_redis(topo, args) -> None:
    if args.no_redis:
        return
    if not topo.start_redis(args.redis_port):
        print("specd up-local: warning: redis-server is not on PATH; starting without Redis (each service keeps "
              "its in-process prefix cache). Install it: apt-get install redis-server", file=sys.stderr, flush=True)


def _describe(topo) -> str:
    return "  ".join(f"{name} 127.0.0.1:{port}" for name, port in topo.ports().items())


def metrics_ports(spec: str) -> dict[str, int]:
    """'G,D,V' → the gateway's, draft's and verifier's Prometheus ports; 'off' → none."""
    if spec.strip().lower() in ("off", "", "0"):
        return {}
    parts = spec.split(",")
    if len(parts) != 3 or not all(p.strip().isdigit() and 0 < int(p) < 65536 for p in parts):
        raise ValueError(f"--metrics-ports={spec!r}: must be three ports GATEWAY,DRAFT,VERIFIER or 'off'")
    return dict(zip(("gateway", "draft", "verifier"), map(int, parts)))


def port_free(port: int) -> bool:
    import socket
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def down_local(args) -> int:
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
