"""`specd gateway`: check the services agree on the tokenizer, then serve Generate / GenerateStream."""
from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import time

import grpc

from common.errors import TokenizerMismatchError
from common.rpc.flags import add_server_flags, env_default, server_config

log = logging.getLogger("specd.gateway")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_server_flags(p, port=50051)
    p.add_argument("--http-port", type=int, default=env_default("http_port", 8000),
                   help="port of the OpenAI-compatible HTTP API, beside gRPC on --port, with the same TLS and API "
                        "keys (SPECD_HTTP_PORT; 0 = off)")
    p.add_argument("--served-model-name", default=env_default("served_model_name", None),
                   help="the model id the HTTP API answers to (default: the verifier's model folder name)")
    p.add_argument("--verifier", default=env_default("verifier", "127.0.0.1:50053"),
                   help="host:port[,host:port...]: the verifier replicas; each name is resolved to all its addresses "
                        "(a headless Service's pods) and re-resolved every --verifier-refresh-s; each new session "
                        "goes to the least-loaded healthy replica and stays there")
    p.add_argument("--verifier-refresh-s", type=float, default=env_default("verifier_refresh_s", 5.0),
                   help="how often the replicas are re-resolved and asked for their load")
    p.add_argument("--draft", default=env_default("draft", "127.0.0.1:50052"),
                   help="host:port of the draft service; empty = no speculation")
    p.add_argument("--tokenizer", default=env_default("tokenizer", None),
                   help="folder with the shared tokenizer (default: the fetched target model)")
    p.add_argument("--k", default=env_default("k", "auto"), help="speculative tokens per round: N or 'auto'")
    p.add_argument("--k-max", type=int, default=env_default("k_max", 8))
    p.add_argument("--pre-draft", choices=("on", "off"), default=env_default("pre_draft", "on"),
                   help="draft round r+1 while round r is verified, for the outcome 'all drafts accepted, bonus "
                        "token = the draft's guess' (a hit hides the next draft call; exactness is unchanged)")
    p.add_argument("--k-cost-model", choices=("network", "per-step"), default=env_default("k_cost_model", "network"),
                   help="adaptive K's cost model: 'network' keeps each call's fixed cost (round trip, "
                        "serialization) apart from per-step compute; 'per-step' is the older model that divides "
                        "a draft call's whole time by its steps (kept for comparison)")
    p.add_argument("--draft-timeout-s", type=float, default=env_default("draft_timeout_s", 5.0))
    p.add_argument("--verify-timeout-s", type=float, default=env_default("verify_timeout_s", 120.0))
    p.add_argument("--startup-timeout-s", type=float, default=env_default("startup_timeout_s", 600.0),
                   help="how long to wait for the verifier to come up")
    up = p.add_argument_group("upstream TLS (the gateway's calls to the draft service and the verifier)")
    up.add_argument("--upstream-tls-ca", default=env_default("upstream_tls_ca", None),
                    help="PEM CA bundle the draft's and verifier's certificates must chain to (SPECD_UPSTREAM_TLS_CA)")
    up.add_argument("--upstream-tls-cert", default=env_default("upstream_tls_cert", None),
                    help="the gateway's client certificate, for upstreams that require one (mTLS) "
                         "(SPECD_UPSTREAM_TLS_CERT)")
    up.add_argument("--upstream-tls-key", default=env_default("upstream_tls_key", None),
                    help="its private key (SPECD_UPSTREAM_TLS_KEY)")
    up.add_argument("--upstream-tls-server-name", default=env_default("upstream_tls_server_name", None),
                    help="name to expect in the upstreams' certificates instead of the --draft/--verifier host "
                         "(SPECD_UPSTREAM_TLS_SERVER_NAME)")
    up.add_argument("--upstream-insecure", action="store_true", default=env_default("upstream_insecure", False),
                    help="plaintext calls to the draft and verifier (SPECD_UPSTREAM_INSECURE=1); --insecure "
                         "implies it when no --upstream-tls-* flag is given")
    auth = p.add_argument_group("API keys (none configured = no authentication)")
    auth.add_argument("--api-keys-file", default=env_default("api_keys_file", None),
                      help="file with one API key per line, '#' comments (SPECD_API_KEYS_FILE); keys are also read "
                           "from SPECD_API_KEYS (comma separated). Clients send 'authorization: Bearer <key>'")
    auth.add_argument("--rate-limit-rps", type=float, default=env_default("rate_limit_rps", 10.0),
                      help="requests per second per API key, sustained (SPECD_RATE_LIMIT_RPS; 0 = no limit)")
    auth.add_argument("--rate-limit-burst", type=int, default=env_default("rate_limit_burst", 20),
                      help="requests a key may send at once (SPECD_RATE_LIMIT_BURST)")
    auth.add_argument("--shared-prefix-cache", action="store_true", default=env_default("shared_prefix_cache", False),
                      help="all API keys share one prefix-cache namespace (SPECD_SHARED_PREFIX_CACHE=1); by default "
                           "each key's prompts hit only blocks that key published, so neither cached-token counts "
                           "nor time to first token tell one tenant what another sent")
    auth.add_argument("--report-cached-tokens", choices=("on", "off"),
                      default=env_default("report_cached_tokens", None),
                      help="return SpecStats.prefix_cached_tokens to clients, else 0 (SPECD_REPORT_CACHED_TOKENS; "
                           "default: off when API keys are configured, on otherwise)")


def upstream_tls_config(args):
    """TLS of the gateway's channels to the draft service and the verifier. Plaintext only when asked for:
    --upstream-insecure, or --insecure with no --upstream-tls-* flag (local development: one flag for both hops)."""
    from common.errors import ConfigError
    from common.rpc.tls import TLSConfig
    given = any((args.upstream_tls_ca, args.upstream_tls_cert, args.upstream_tls_key))
    if args.upstream_insecure or (args.insecure and not given):
        if given:
            raise ConfigError("gateway: --upstream-insecure contradicts the --upstream-tls-* flags; pass one or "
                              "the other")
        return TLSConfig(insecure=True)
    if not given:
        raise ConfigError("gateway: calls to the draft service and the verifier need TLS settings: "
                          "--upstream-tls-ca (and --upstream-tls-cert/--upstream-tls-key for mTLS), or "
                          "--upstream-insecure (or --insecure) for plaintext local development")
    return TLSConfig(cert=args.upstream_tls_cert, key=args.upstream_tls_key, ca=args.upstream_tls_ca,
                     server_name=args.upstream_tls_server_name)


def _service_config(service: str, balanced: bool = False) -> str:
    # Transient UNAVAILABLE is retried by gRPC itself; Verify is idempotent per (session, round). `balanced`: every
    # call goes round robin over all resolved addresses that pass gRPC health checking (the draft pool).
    config = {"methodConfig": [{"name": [{"service": service}], "retryPolicy": {
        "maxAttempts": 3, "initialBackoff": "0.1s", "maxBackoff": "1s", "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"]}}]}
    if balanced:
        config |= {"loadBalancingConfig": [{"round_robin": {}}], "healthCheckConfig": {"serviceName": service}}
    return json.dumps(config)


def channel(target: str, service: str, options, interceptors=None, tls=None, balanced: bool = False
            ) -> grpc.aio.Channel:
    """A channel to an upstream service; `tls` (a TLSConfig) None = plaintext; `balanced`: round robin over every
    address of `target`, health-checked."""
    from common.rpc.tls import PLAINTEXT, aio_channel
    # Short reconnect backoff: a restarted replica is used again within seconds, not after gRPC's default
    # exponential backoff (up to 120 s).
    return aio_channel(target, tls or PLAINTEXT, options=[*options, ("grpc.service_config",
                                                                     _service_config(service, balanced)),
                                                          ("grpc.enable_retries", 1),
                                                          ("grpc.initial_reconnect_backoff_ms", 200),
                                                          ("grpc.min_reconnect_backoff_ms", 200),
                                                          ("grpc.max_reconnect_backoff_ms", 2000)],
                       interceptors=interceptors or None)


def check_args(args) -> None:
    """Everything about the flags that can be checked without loading anything (`specd gateway` runs it first)."""
    from common.errors import ConfigError
    from gateway.auth import RateLimit, load_api_keys
    from gateway.verifier_pool import split_targets
    upstream_tls_config(args)
    try:
        split_targets(args.verifier)
        if args.draft:
            draft_target(args.draft)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if args.verifier_refresh_s <= 0:
        raise ConfigError(f"--verifier-refresh-s={args.verifier_refresh_s}: must be > 0")
    load_api_keys(args.api_keys_file)
    RateLimit(args.rate_limit_rps, args.rate_limit_burst)
    report_cached_tokens(args, False)


def report_cached_tokens(args, keys_configured: bool) -> bool:
    """--report-cached-tokens, or its default: off when API keys are configured (a shared namespace's count says
    what others sent), on otherwise."""
    from common.errors import ConfigError
    choice = args.report_cached_tokens
    if choice is None:
        return not keys_configured
    value = {"on": True, "1": True, "true": True, "yes": True, "off": False, "0": False, "false": False,
             "no": False}.get(str(choice).lower())
    if value is None:
        raise ConfigError(f"--report-cached-tokens={choice!r}: must be on or off")
    return value


def verifier_ready(pool):
    """An async check: is any verifier replica SERVING (its gRPC health service)? For the HTTP door's /health."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    async def one(replica) -> bool:
        try:
            reply = await health_pb2_grpc.HealthStub(replica.channel).Check(
                health_pb2.HealthCheckRequest(service="specd.v1.VerifierService"), timeout=2)
        except grpc.aio.AioRpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    async def ready() -> bool:
        replicas = [r for r in pool.replicas.values() if r.channel is not None and r.checked and not r.gone]
        return any(await asyncio.gather(*(one(r) for r in replicas)))
    return ready


def draft_target(spec: str) -> str:
    """`--draft` as one gRPC target that balances over every replica: a name (dns:///, all its addresses, as a
    headless Service's pods) or a list of IP:port (ipv4:/ipv6:); round_robin with health checking picks among them."""
    import ipaddress
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    if len(targets) == 1:
        host = targets[0].rpartition(":")[0].strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return f"dns:///{targets[0]}"
        return targets[0]
    hosts = [t.rpartition(":")[0].strip("[]") for t in targets]
    try:
        versions = {ipaddress.ip_address(h).version for h in hosts}
    except ValueError:
        raise ValueError(f"--draft {spec!r}: a list must be IP:port entries (or give one name that resolves to all "
                         "replicas)") from None
    if len(versions) > 1:
        raise ValueError(f"--draft {spec!r}: mixes IPv4 and IPv6 addresses")
    return f"ipv{versions.pop()}:{','.join(targets)}"


def api_key_interceptors(args, tls) -> list:
    """[ApiKeyInterceptor] when keys are configured (file and/or SPECD_API_KEYS), else [] (no authentication)."""
    from gateway.auth import ApiKeyAuth, ApiKeyInterceptor, RateLimit, load_api_keys
    keys = load_api_keys(args.api_keys_file)
    limit = RateLimit(args.rate_limit_rps, args.rate_limit_burst)
    if not keys:
        if tls is None or tls.insecure:
            log.warning("gateway: no API keys and PLAINTEXT: anyone who can reach the port can generate "
                        "(set --api-keys-file or SPECD_API_KEYS)")
        else:
            log.info("gateway: no API keys configured: requests are not authenticated")
        return []
    auth = ApiKeyAuth(keys, limit)
    log.info("gateway: %d API key(s) (ids %s), rate limit %s", len(keys), ", ".join(auth.key_ids), limit.describe())
    return [ApiKeyInterceptor(auth)]


async def wait_for_replica(pool, what: str, timeout_s: float):
    """Start the verifier pool and wait until one replica has answered Info; that replica's ModelInfo."""
    deadline = time.monotonic() + timeout_s
    await pool.start()
    while pool.info is None:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: no replica answered within {timeout_s:.0f}s "
                               f"({sorted(pool.replicas) or 'none resolved'})")
        await asyncio.sleep(0.5)
        await pool.refresh()
    return pool.info


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
    from common.speculative.adaptive_k import CostModel
    from common.speculative.request import parse_num_speculative_tokens
    from common.fast_tokenizer import load_fast_tokenizer
    from common.tokenizer import stop_string_checker, stop_token_ids, vocab_fingerprint
    from common.telemetry import metrics
    from common.telemetry.client_interceptors import TracingAioClientInterceptor
    from common.telemetry.server_interceptor import server_interceptors
    from common.telemetry.tracing import GATEWAY, setup_tracing, shutdown_tracing
    from gateway.rounds import RoundRunner, RoundSettings
    from gateway.generation import Generator
    from gateway.servicer import GatewayServicer
    from gateway.verifier_pool import VerifierPool, split_targets

    k = parse_num_speculative_tokens(args.k, args.k_max)
    settings = RoundSettings(draft_timeout_s=args.draft_timeout_s, verify_timeout_s=args.verify_timeout_s)
    cfg = server_config(args)
    upstream_tls = upstream_tls_config(args)
    if upstream_tls.insecure:
        log.warning("gateway: PLAINTEXT calls to the draft service and the verifier (--insecure/--upstream-insecure)")
    auth = api_key_interceptors(args, cfg.tls)
    # torch-free (the gateway does no tensor math): same ids, text and vocab fingerprint as the services' tokenizer
    tokenizer = load_fast_tokenizer(args.tokenizer or str(model_path(TARGET_MODEL)))
    fingerprint = vocab_fingerprint(tokenizer)
    tracing = setup_tracing(GATEWAY)
    traced = [TracingAioClientInterceptor(tracing)] if tracing is not None else None
    # Authentication first: a refused call ends before the tracing interceptor opens a span or the request is
    # even parsed.
    host = ServiceHost(cfg, ["specd.v1.Gateway"], interceptors=[*auth, *server_interceptors(tracing)])
    metrics.start_metrics_server(args.metrics_port, args.host)
    def connect(address: str, host: str):
        # A resolved replica is dialled by IP: its certificate still names the host it was resolved from.
        tls = upstream_tls
        if tls is not None and not tls.insecure and not tls.server_name and address.rpartition(":")[0] != host:
            tls = dataclasses.replace(tls, server_name=host)
        ch = channel(address, "specd.v1.VerifierService", cfg.channel_options(), traced, tls)
        return ch, verifier_pb2_grpc.VerifierServiceStub(ch)
    verifiers = VerifierPool(split_targets(args.verifier), connect, fingerprint=fingerprint,
                             refresh_s=args.verifier_refresh_s)
    v_info = await wait_for_replica(verifiers, f"verifier at {args.verifier}", args.startup_timeout_s)
    if v_info.vocab_fingerprint != fingerprint:
        raise TokenizerMismatchError(f"verifier tokenizer fingerprint {v_info.vocab_fingerprint} differs from the "
                                     f"gateway's {fingerprint}: refusing to serve")
    draft = None
    if args.draft:
        draft = draft_pb2_grpc.DraftServiceStub(channel(draft_target(args.draft), "specd.v1.DraftService",
                                                        cfg.channel_options(), traced, upstream_tls, balanced=True))
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
    rounds = RoundRunner(verifiers, draft, eos, v_info.max_model_len, settings,
                         # the verifier's own load-time probe of pass lengths (empty from a v1.3 verifier)
                         CostModel(fixed_call_costs=args.k_cost_model == "network",
                                   verify_shape=list(v_info.pass_cost_ratio)),
                         stop_check=stop_string_checker(tokenizer), fingerprint=v_info.vocab_fingerprint,
                         verifier_k_max=v_info.k_max, pre_draft=args.pre_draft == "on")
    report = report_cached_tokens(args, bool(auth))
    generator = Generator(rounds, tokenizer, k, args.k_max, v_info.vocab_size,
                          tenant_prefix_cache=not args.shared_prefix_cache)
    servicer = GatewayServicer(generator, report_cached_tokens=report)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, host.server)
    if auth:
        log.info("gateway: prefix cache %s; cached-token counts %s",
                 "shared by all API keys" if args.shared_prefix_cache else "one namespace per API key",
                 "reported" if report else "not reported (0)")
    log.info("gateway: verifier %s (%s; %d replica(s) serving), draft %s, K=%s, pre-draft %s, K cost model %s",
             args.verifier, v_info.model_id, verifiers.healthy_count(), args.draft or "none", k, args.pre_draft,
             args.k_cost_model)
    door = None
    if args.http_port:
        from gateway.openai_api.server import HttpDoor
        door = HttpDoor(generator, model=args.served_model_name or v_info.model_id, admission=host.admission,
                        auth=auth[0].auth if auth else None, verifier_ready=verifier_ready(verifiers),
                        report_cached_tokens=report, max_concurrent=cfg.max_concurrent_rpcs,
                        max_body_bytes=cfg.max_message_bytes)

    async def open_http():
        if door is not None:
            port = await door.start(cfg.host, args.http_port, cfg.tls.ssl_server_context("gateway HTTP")
                                    if cfg.tls is not None else None)
            print(f"SERVING HTTP on {cfg.host}:{port}", flush=True)

    async def drained():
        if door is not None:
            await door.stop()
        await verifiers.close()
        shutdown_tracing(tracing)

    await host.run(warm_up=open_http, on_drained=drained)
