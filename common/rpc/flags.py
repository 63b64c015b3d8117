"""Command-line flags shared by the services, each defaulting to a SPECD_* environment variable."""
from __future__ import annotations

import argparse
import os


def env_default(name: str, default):
    """SPECD_<NAME> from the environment, converted to the default's type, else the default."""
    raw = os.environ.get(f"SPECD_{name.upper()}")
    if raw is None:
        return default
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes", "on")
    return type(default)(raw) if default is not None else raw


def add_server_flags(p: argparse.ArgumentParser, port: int) -> None:
    p.add_argument("--host", default=env_default("host", "127.0.0.1"), help="bind address (SPECD_HOST)")
    p.add_argument("--port", type=int, default=env_default("port", port), help=f"gRPC port (SPECD_PORT, {port})")
    p.add_argument("--max-concurrent-rpcs", type=int, default=env_default("max_concurrent_rpcs", 256))
    p.add_argument("--grace-s", type=float, default=env_default("grace_s", 30.0),
                   help="SIGTERM drain grace period in seconds")
    p.add_argument("--metrics-port", type=int, default=env_default("metrics_port", 0),
                   help="Prometheus /metrics port (SPECD_METRICS_PORT; 0 = off; by convention gateway 9101, "
                        "draft 9102, verifier 9103)")


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=env_default("model", None), help="model folder (SPECD_MODEL)")
    p.add_argument("--dtype", default=env_default("dtype", "bfloat16"), choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=env_default("device", "cpu"))
    p.add_argument("--k-max", type=int, default=env_default("k_max", 8))
    p.add_argument("--kv-cache-gib", type=float, default=env_default("kv_cache_gib", 1.0))
    p.add_argument("--max-model-len", type=int, default=env_default("max_model_len", 0),
                   help="0 = the model's own limit")
    p.add_argument("--prefix-cache-mib", type=int, default=env_default("prefix_cache_mib", 256),
                   help="in-process prefix cache of full KV blocks, MiB (0 = Redis only)")
    p.add_argument("--redis-url", default=os.environ.get("REDIS_URL") or None,
                   help="shared prefix cache, e.g. redis://host:6379/0 (REDIS_URL); unset = in-process only")
    p.add_argument("--prefix-cache-ttl-s", type=int, default=env_default("prefix_cache_ttl_s", 3600),
                   help="Redis entry lifetime in seconds")
    p.add_argument("--no-prefix-cache", action="store_true", default=env_default("no_prefix_cache", False),
                   help="compute every prefill (no prefix cache at all)")


def server_config(args):
    from common.rpc.server import ServerConfig
    return ServerConfig(host=args.host, port=args.port, max_concurrent_rpcs=args.max_concurrent_rpcs,
                        grace_s=args.grace_s)


def prefix_cache_config(args):
    """The PrefixCacheConfig the model flags ask for, or None when the cache is off."""
    from common.config import PrefixCacheConfig
    if args.no_prefix_cache or (args.prefix_cache_mib == 0 and not args.redis_url):
        return None
    return PrefixCacheConfig(local_mib=args.prefix_cache_mib, redis_url=args.redis_url, ttl_s=args.prefix_cache_ttl_s)
