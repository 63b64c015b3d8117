"""`specd gateway`: check the services agree on the tokenizer, then serve Generate / GenerateStream."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import time

import grpc

from common.rpc.flags import add_server_flags, env_default, server_config

log = logging.getLogger("specd.gateway")


class TokenizerMismatchError(RuntimeError):
    """Draft, verifier and gateway must share one tokenizer, or token ids mean different things."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p, port=50051)
    p.add_argument("--verifier", default=env_default("verifier", "127.0.0.1:50053"), help="host:port")
    p.add_argument("--draft", default=env_default("draft", "127.0.0.1:50052"),
                   help="host:port of the draft service; empty = no speculation")
    p.add_argument("--tokenizer", default=env_default("tokenizer", None),
                   help="folder with the shared tokenizer (default: the fetched target model)")
    p.add_argument("--k", default=env_default("k", "auto"), help="speculative tokens per round: N or 'auto'")
    p.add_argument("--k-max", type=int, default=env_default("k_max", 8))
    p.add_argument("--draft-timeout-s", type=float, default=env_default("draft_timeout_s", 5.0))
    p.add_argument("--verify-timeout-s", type=float, default=env_default("verify_timeout_s", 120.0))
    p.add_argument("--startup-timeout-s", type=float, default=env_default("startup_timeout_s", 600.0),
                   help="how long to wait for the verifier to come up")


def _service_config(service: str) -> str:
    # Transient UNAVAILABLE is retried by gRPC itself; Verify is idempotent per (session, round).
    return json.dumps({"methodConfig": [{"name": [{"service": service}], "retryPolicy": {
        "maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]}}]})


def channel(target: str, service: str, options, interceptors=None) -> grpc.aio.Channel:
    # Short reconnect backoff: a restarted replica is used again within seconds, not after gRPC's default
    # exponential backoff (up to 120 s).
    return grpc.aio.insecure_channel(target, options=[*options, ("grpc.service_config", _service_config(service)),
                                                      ("grpc.enable_retries", 1),
                                                      ("grpc.initial_reconnect_backoff_ms", 200),
                                                      ("grpc.min_reconnect_backoff_ms", 200),
                                                      ("grpc.max_reconnect_backoff_ms", 2000)],
                                     interceptors=interceptors or None)


async def wait_for_info(stub, what: str, timeout_s: float):
    from common.rpc.generated.specd.v1 import common_pb2
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await stub.Info(common_pb2.InfoRequest(), timeout=5)
        except grpc.aio.AioRpcError as e:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not answer within {timeout_s:.0f}s: {e.code().name} "
                                   f"{e.details()}") from None
            await asyncio.sleep(0.5)


async def serve(args) -> None:
    from common.models.fetch import TARGET_MODEL, model_path
    from common.rpc.generated.specd.v1 import draft_pb2_grpc, gateway_pb2_grpc, verifier_pb2_grpc
    from common.rpc.server import ServiceHost
    from common.spec.adaptive_k import CostModel
    from common.tokenizer import load_tokenizer, stop_string_checker, stop_token_ids, vocab_fingerprint
    from common.llm import parse_num_speculative_tokens
    from common.telemetry import metrics
    from common.telemetry.client_interceptors import TracingAioClientInterceptor
    from common.telemetry.server_interceptor import server_interceptors
    from common.telemetry.tracing import GATEWAY, setup_tracing, shutdown_tracing
    from gateway.rounds import RoundRunner, RoundSettings
    from gateway.servicer import GatewayServicer

    k = parse_num_speculative_tokens(args.k, args.k_max)
    settings = RoundSettings(draft_timeout_s=args.draft_timeout_s, verify_timeout_s=args.verify_timeout_s)
    tokenizer = load_tokenizer(args.tokenizer or str(model_path(TARGET_MODEL)))
    fingerprint = vocab_fingerprint(tokenizer)
    cfg = server_config(args)
    tracing = setup_tracing(GATEWAY)
    traced = [TracingAioClientInterceptor(tracing)] if tracing is not None else None
    host = ServiceHost(cfg, ["specd.v1.Gateway"], interceptors=server_interceptors(tracing))
    metrics.start_metrics_server(args.metrics_port, args.host)
    verifier = verifier_pb2_grpc.VerifierServiceStub(channel(args.verifier, "specd.v1.VerifierService",
                                                             cfg.channel_options(), traced))
    v_info = await wait_for_info(verifier, f"verifier at {args.verifier}", args.startup_timeout_s)
    if v_info.vocab_fingerprint != fingerprint:
        raise TokenizerMismatchError(f"verifier tokenizer fingerprint {v_info.vocab_fingerprint} differs from the "
                                     f"gateway's {fingerprint}: refusing to serve")
    draft = None
    if args.draft:
        draft = draft_pb2_grpc.DraftServiceStub(channel(args.draft, "specd.v1.DraftService", cfg.channel_options(),
                                                        traced))
        try:
            d_info = await wait_for_info(draft, f"draft at {args.draft}", min(args.startup_timeout_s, 60))
        except RuntimeError as e:
            log.warning("%s; starting with plain decoding until it answers", e)
        else:
            if d_info.vocab_fingerprint != v_info.vocab_fingerprint:
                raise TokenizerMismatchError(
                    f"draft tokenizer fingerprint {d_info.vocab_fingerprint} differs from the verifier's "
                    f"{v_info.vocab_fingerprint}: refusing to serve")
    eos = frozenset(stop_token_ids(tokenizer, tuple(v_info.eos_token_ids)))
    rounds = RoundRunner(verifier, draft, eos, v_info.max_model_len, settings, CostModel(),
                         stop_check=stop_string_checker(tokenizer))
    gateway_pb2_grpc.add_GatewayServicer_to_server(GatewayServicer(rounds, tokenizer, k, args.k_max, v_info.vocab_size),
                                                   host.server)
    log.info("gateway: verifier %s (%s), draft %s, K=%s", args.verifier, v_info.model_id, args.draft or "none", k)

    async def drained():
        shutdown_tracing(tracing)

    await host.run(on_drained=drained)
