"""`specd verifier`: serve the target model (tensor-parallel) for Verify/Release."""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time

from common.rpc.flags import add_model_flags, add_server_flags, env_default, prefix_cache_config, server_config

log = logging.getLogger("specd.verifier")

# A dead TP rank: the exit code (the orchestrator restarts the process), and how long the process stays up first so
# the calls that already failed get their UNAVAILABLE on the wire and probes can read NOT_SERVING.
EXIT_RANK_LOST = 3
RANK_LOSS_GRACE_S = 0.5


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p, port=50053)
    add_model_flags(p)
    p.add_argument("--tp", type=int, default=env_default("tp", 1),
                   help="tensor-parallel ranks in all, over every node (SPECD_TP)")
    g = p.add_argument_group("multi-node tensor parallelism (start one `specd verifier` per node, the same flags on "
                             "each but --node-rank; node 0 serves gRPC, the others only compute)")
    g.add_argument("--nnodes", type=int, default=env_default("nnodes", None),
                   help="nodes the --tp ranks span (SPECD_NNODES, else NNODES or LWS_GROUP_SIZE; default 1)")
    g.add_argument("--node-rank", type=int, default=env_default("node_rank", None),
                   help="this node's index, 0 = the driver (SPECD_NODE_RANK, else NODE_RANK or LWS_WORKER_INDEX)")
    g.add_argument("--nproc-per-node", type=int, default=env_default("nproc_per_node", None),
                   help="ranks on each node, = tp / nnodes (optional; checked when given)")
    g.add_argument("--rdzv-endpoint", default=env_default("rdzv_endpoint", None),
                   help="host:port where node 0 hosts the c10d rendezvous store (SPECD_RDZV_ENDPOINT, else "
                        "MASTER_ADDR:MASTER_PORT or LWS_LEADER_ADDRESS:29400)")
    p.add_argument("--max-queue", type=int, default=env_default("max_queue", 256),
                   help="verify calls waiting beyond this are refused with RESOURCE_EXHAUSTED")
    p.add_argument("--session-ttl-s", type=float, default=env_default("session_ttl_s", 300.0))
    p.add_argument("--max-sessions", type=int, default=env_default("max_sessions", 1024))
    p.add_argument("--max-waiting", type=int, default=env_default("max_waiting", 64),
                   help="new sessions that may wait for free KV blocks; one more is refused with RESOURCE_EXHAUSTED "
                        "(SPECD_MAX_WAITING)")
    p.add_argument("--max-wait-s", type=float, default=env_default("max_wait_s", 60.0),
                   help="a session waiting longer than this for KV blocks is refused (SPECD_MAX_WAIT_S)")
    p.add_argument("--batch-invariant", action="store_true", default=env_default("batch_invariant", False),
                   help="batch-invariant numerics: a token's logits do not depend on what shares its forward pass, "
                        "so bf16 speculation equals bf16 target-only bit for bit (CPU; SPECD_BATCH_INVARIANT)")


async def serve(args) -> None:
    from common.config import EngineConfig
    from common.engine.pass_probe import describe, measure_pass_costs
    from common.engine.tp_executor import TPExecutor
    from common.rpc.generated.specd.v1 import verifier_pb2_grpc
    from common.rpc.model_info import model_info
    from common.rpc.server import ServiceHost
    from verifier_service.engine import VerifierEngine, VerifyCall
    from verifier_service.servicer import VerifierServicer
    from common.speculative.proposal import DraftProposal
    from common.speculative.params import SamplingParams
    from common.telemetry import metrics
    from common.telemetry.server_interceptor import server_interceptors
    from common.telemetry.tracing import VERIFIER, setup_tracing, shutdown_tracing

    if not args.model:
        raise SystemExit("specd verifier: --model (or SPECD_MODEL) is required")
    layout = tp_layout(args)
    config = EngineConfig(model=args.model, dtype=args.dtype, device=args.device, tp_size=args.tp,
                          kv_cache_memory_gib=args.kv_cache_gib, max_model_len=args.max_model_len or None,
                          max_num_seqs=args.max_sessions, prefix_cache=prefix_cache_config(args),
                          batch_invariant=args.batch_invariant, quantization=args.quantization,
                          gguf=args.gguf)
    if not layout.is_driver_node:
        return await serve_worker_node(args, layout, config)
    tracing = setup_tracing(VERIFIER)
    host = ServiceHost(server_config(args), ["specd.v1.VerifierService"],
                       interceptors=server_interceptors(tracing))
    metrics.start_metrics_server(args.metrics_port, args.host)
    t0 = time.perf_counter()

    def on_rank_loss(err: Exception) -> None:
        # On the executor's watch thread. The engine thread may be stuck in a collective and cannot be joined, so
        # the process ends here, without the orderly drain.
        exit_lost(host, str(err))

    executor = TPExecutor(config, layout=layout, on_rank_loss=on_rank_loss)
    costs = measure_pass_costs(executor, max_tokens=min(9, args.k_max + 1), reps=1)   # before the engine runs
    log.info("verify pass cost over a 1-token pass (tokens: ratio): %s", describe(costs))
    engine = VerifierEngine(executor, k_max=args.k_max, max_queue=args.max_queue,
                            session_ttl_s=args.session_ttl_s, max_sessions=args.max_sessions,
                            max_waiting=args.max_waiting, max_wait_s=args.max_wait_s)
    metrics.watch_engine(metrics.VERIFIER_QUEUE_DEPTH, lambda: engine.queue_depth, executor.allocator)
    metrics.VERIFIER_SESSIONS.set_function(lambda: len(engine.sessions))
    metrics.VERIFIER_WAITING.set_function(lambda: engine.waiting)
    info = model_info(args.model, executor.runner, args.dtype, args.device, args.tp, args.k_max, costs)
    servicer = VerifierServicer(engine, info, draining=lambda: host.admission.draining)
    verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, host.server)
    log.info("verifier loaded %s (tp=%d over %d node(s)) in %.1fs", args.model, args.tp, layout.nnodes,
             time.perf_counter() - t0)

    async def warm_up():
        call = VerifyCall("__warmup__", 0, 4, [1, 2, 3, 4], DraftProposal([5, 6]), SamplingParams())
        await asyncio.wrap_future(engine.submit(call))
        await asyncio.get_running_loop().run_in_executor(None, engine.release, "__warmup__")

    async def drained():
        engine.shutdown()
        executor.shutdown()
        shutdown_tracing(tracing)

    await host.run(warm_up, drained)


def tp_layout(args):
    from common.engine.tp_layout import TPLayout
    from common.errors import ConfigError
    try:
        return TPLayout.build(args.tp, args.nnodes, args.node_rank, args.nproc_per_node, args.rdzv_endpoint)
    except ConfigError as e:
        raise SystemExit(f"specd verifier: {e}") from None


def exit_lost(host, reason: str) -> None:
    """A rank or node of the group is gone (from a watch thread): NOT_SERVING for a moment, then exit so the
    orchestrator restarts this process (every node of the group does the same)."""
    health = host.mark_unavailable(reason)
    if health is not None:
        try:
            health.result(timeout=RANK_LOSS_GRACE_S)
        except Exception:  # noqa: BLE001 - exiting anyway
            pass
    time.sleep(RANK_LOSS_GRACE_S)
    log.critical("exiting with code %d: %s", EXIT_RANK_LOST, reason)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(EXIT_RANK_LOST)


async def serve_worker_node(args, layout, config) -> None:
    """Node >= 1 of a multi-node verifier: its ranks only, and a health-only gRPC server for probes (SERVING once
    they are loaded, NOT_SERVING once anything is lost). It ends when the driver shuts the group down; a SIGTERM
    waits for that (the driver drains first), at most the grace period, then ends the ranks."""
    from common.engine.worker_node import WorkerNode
    from common.rpc.server import ServiceHost

    host = ServiceHost(server_config(args), [])
    node = WorkerNode(config, layout, on_loss=lambda reason: exit_lost(host, reason))
    loop = asyncio.get_running_loop()
    watching: list[asyncio.Task] = []                  # the event loop keeps only weak references to tasks

    async def ended():
        await loop.run_in_executor(None, node.wait)
        if node.ended_orderly:                  # else exit_lost (on the watch thread) ends the process
            log.info("worker node %d: the group was shut down; exiting", layout.node_rank)
            host.stop()

    async def warm_up():
        await loop.run_in_executor(None, node.wait_ready)
        watching.append(loop.create_task(ended()))

    async def drained():
        if not await loop.run_in_executor(None, node.wait, args.grace_s + 5):
            node.kill()

    await host.run(warm_up, drained)
