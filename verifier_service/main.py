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
    p.add_argument("--tp", type=int, default=env_default("tp", 1), help="tensor-parallel ranks (SPECD_TP)")
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
    tracing = setup_tracing(VERIFIER)
    host = ServiceHost(server_config(args), ["specd.v1.VerifierService"],
                       interceptors=server_interceptors(tracing))
    metrics.start_metrics_server(args.metrics_port, args.host)
    t0 = time.perf_counter()

    def on_rank_loss(err: Exception) -> None:
        # On the executor's watch thread. The engine thread may be stuck in a collective and cannot be joined, so
        # the process ends here, without the orderly drain.
        health = host.mark_unavailable(str(err))
        if health is not None:
            try:
                health.result(timeout=RANK_LOSS_GRACE_S)
            except Exception:  # noqa: BLE001 - exiting anyway
                pass
        time.sleep(RANK_LOSS_GRACE_S)
        log.critical("exiting with code %d: %s", EXIT_RANK_LOST, err)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_RANK_LOST)

    executor = TPExecutor(EngineConfig(model=args.model, dtype=args.dtype, device=args.device, tp_size=args.tp,
                                       kv_cache_memory_gib=args.kv_cache_gib,
                                       max_model_len=args.max_model_len or None, max_num_seqs=args.max_sessions,
                                       prefix_cache=prefix_cache_config(args),
                                       batch_invariant=args.batch_invariant),
                          on_rank_loss=on_rank_loss)
    engine = VerifierEngine(executor, k_max=args.k_max, max_queue=args.max_queue,
                            session_ttl_s=args.session_ttl_s, max_sessions=args.max_sessions,
                            max_waiting=args.max_waiting, max_wait_s=args.max_wait_s)
    metrics.watch_engine(metrics.VERIFIER_QUEUE_DEPTH, lambda: engine.queue_depth, executor.allocator)
    metrics.VERIFIER_SESSIONS.set_function(lambda: len(engine.sessions))
    metrics.VERIFIER_WAITING.set_function(lambda: engine.waiting)
    info = model_info(args.model, executor.runner, args.dtype, args.device, args.tp, args.k_max)
    servicer = VerifierServicer(engine, info, draining=lambda: host.admission.draining)
    verifier_pb2_grpc.add_VerifierServiceServicer_to_server(servicer, host.server)
    log.info("verifier loaded %s (tp=%d) in %.1fs", args.model, args.tp, time.perf_counter() - t0)

    async def warm_up():
        call = VerifyCall("__warmup__", 0, 4, [1, 2, 3, 4], DraftProposal([5, 6]), SamplingParams())
        await asyncio.wrap_future(engine.submit(call))
        await asyncio.get_running_loop().run_in_executor(None, engine.release, "__warmup__")

    async def drained():
        engine.shutdown()
        executor.shutdown()
        shutdown_tracing(tracing)

    await host.run(warm_up, drained)
