"""`specd generate --gateway HOST:PORT`: the same command through a running gateway (TLS, API key, tracing)."""
from __future__ import annotations

import sys


def generate_via_gateway(args) -> int:
    import os

    from common.errors import ConfigError
    from common.rpc.flags import tls_config
    from common.telemetry.tracing import CLIENT, setup_tracing, shutdown_tracing
    from gateway.client import SpecdClient
    try:
        tls = tls_config(args)
        api_key = read_api_key(args.api_key_file) if args.api_key_file else os.environ.get("SPECD_API_KEY") or None
        client = SpecdClient(args.gateway, tls=tls, api_key=api_key)
    except ConfigError as e:
        print(f"specd generate: {e}", file=sys.stderr)
        return 2
    tracing = setup_tracing(CLIENT)            # OTEL_EXPORTER_OTLP_ENDPOINT set: the trace starts here
    try:
        return _generate_with(client, args)
    finally:
        shutdown_tracing(tracing)


def read_api_key(path: str) -> str:
    """The one key in an --api-key-file (blank lines and # comments ignored)."""
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
