"""`specd draft`: serve the draft model for Propose."""
from __future__ import annotations

import argparse
import asyncio
import logging
import time

from common.rpc.flags import add_model_flags, add_server_flags, env_default, prefix_cache_config, server_config

log = logging.getLogger("specd.draft")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p, port=50052)
    add_model_flags(p)
    p.add_argument("--max-cached-sequences", type=int, default=env_default("max_cached_sequences", 64),
                   help="soft KV cache bound (LRU)")
    p.add_argument("--max-queue", type=int, default=env_default("max_queue", 256),
                   help="Propose calls waiting beyond this are refused with RESOURCE_EXHAUSTED (SPECD_MAX_QUEUE)")


async def warm_up(drafter, timeout_s: float = 600.0) -> None:
    """One proposal before SERVING, awaited on the engine thread: the event loop (and the health service on it,
    answering NOT_SERVING) never waits while the first pass runs."""
    from common.speculative.params import SamplingParams
    call = drafter.submit("__warmup__", [1, 2, 3, 4], 2, SamplingParams(), 0)
    await asyncio.wait_for(asyncio.wrap_future(call), timeout=timeout_s)


async def serve(args) -> None:
    from common.config import EngineConfig, draft_lm_head_quantization
    from common.engine.model_runner import ModelRunner
    from common.rpc.generated.specd.v1 import draft_pb2_grpc
    from common.rpc.model_info import model_info
    from common.rpc.server import ServiceHost
    from common.telemetry import metrics
    from common.telemetry.server_interceptor import server_interceptors
    from common.telemetry.tracing import DRAFT, setup_tracing, shutdown_tracing
    from common.engine.pass_probe import describe, measure_pass_costs
    from draft_service.drafter import Drafter
    from draft_service.servicer import DraftServicer

    if not args.model:
        raise SystemExit("specd draft: --model (or SPECD_MODEL) is required")
    tracing = setup_tracing(DRAFT)
    host = ServiceHost(server_config(args), ["specd.v1.DraftService"], interceptors=server_interceptors(tracing))
    metrics.start_metrics_server(args.metrics_port, args.host)
    t0 = time.perf_counter()
    runner = ModelRunner(EngineConfig(model=args.model, dtype=args.dtype, device=args.device,
                                      kv_cache_memory_gib=args.kv_cache_gib, max_model_len=args.max_model_len or None,
                                      max_num_seqs=args.max_cached_sequences + 1,
                                      prefix_cache=prefix_cache_config(args), quantization=args.quantization,
                                      gguf=args.gguf,
                                      lm_head_quantization=draft_lm_head_quantization(args.quantization)))
    costs = measure_pass_costs(runner, max_tokens=min(9, args.k_max + 1), reps=1)   # ~10 passes at start
    log.info("draft pass cost over a 1-token pass (tokens: ratio): %s", describe(costs))
    drafter = Drafter(runner, k_max=args.k_max, max_cached_sequences=args.max_cached_sequences,
                      max_queue=args.max_queue)
    metrics.watch_engine(metrics.DRAFT_QUEUE_DEPTH, lambda: drafter.queue_depth, runner.allocator)
    info = model_info(args.model, runner, args.dtype, args.device, 1, args.k_max, costs)
    draft_pb2_grpc.add_DraftServiceServicer_to_server(DraftServicer(drafter, info), host.server)
    log.info("draft loaded %s in %.1fs", args.model, time.perf_counter() - t0)

    async def drained():
        drafter.shutdown()
        runner.close()
        shutdown_tracing(tracing)

    await host.run(lambda: warm_up(drafter), drained)
