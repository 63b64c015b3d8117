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
    p.add_argument("--max-concurrent-rpcs", type=int, default=env_default("max_concurrent_rpcs", 256),
                   help="RPCs in progress at once; beyond it calls get RESOURCE_EXHAUSTED (SPECD_MAX_CONCURRENT_RPCS)")
    p.add_argument("--max-message-mib", type=int, default=env_default("max_message_mib", 16),
                   help="largest gRPC message received or sent, MiB (SPECD_MAX_MESSAGE_MIB); larger requests get "
                        "RESOURCE_EXHAUSTED")
    p.add_argument("--grace-s", type=float, default=env_default("grace_s", 30.0),
                   help="SIGTERM drain grace period in seconds")
    p.add_argument("--metrics-port", type=int, default=env_default("metrics_port", 0),
                   help="Prometheus /metrics port (SPECD_METRICS_PORT; 0 = off; by convention gateway 9101, "
                        "draft 9102, verifier 9103)")
    p.add_argument("--health-port", type=int, default=env_default("health_port", 0),
                   help="a second, PLAINTEXT port serving only the gRPC health service, for probes that cannot "
                        "speak TLS (Kubernetes grpc probes) (SPECD_HEALTH_PORT; 0 = off)")
    add_server_tls_flags(p)


def add_server_tls_flags(p: argparse.ArgumentParser) -> None:
    _add_tls_flags(p, "TLS (a service refuses to start with neither certificates nor --insecure)",
                   cert="PEM certificate chain this server presents (SPECD_TLS_CERT)",
                   key="its PEM private key (SPECD_TLS_KEY)",
                   ca="PEM CA bundle: when given, clients MUST present a certificate signed by it (mTLS) "
                      "(SPECD_TLS_CA)",
                   insecure="serve plaintext gRPC, for local development only; logs a warning (SPECD_INSECURE=1)")


def add_client_tls_flags(p: argparse.ArgumentParser) -> None:
    """Flags of a command that calls a service (`specd health`, `specd generate --gateway`): TLS unless --insecure."""
    _add_tls_flags(p, "TLS (TLS with the system's roots unless told otherwise; plaintext only with --insecure)",
                   cert="client certificate, for servers that require one (mTLS) (SPECD_TLS_CERT)",
                   key="its private key (SPECD_TLS_KEY)",
                   ca="PEM CA bundle the server's certificate must chain to (SPECD_TLS_CA; default: system roots)",
                   server_name="name to expect in the server's certificate, when it is not the target's host "
                               "(SPECD_TLS_SERVER_NAME)",
                   insecure="plaintext gRPC (SPECD_INSECURE=1)")


def _add_tls_flags(p: argparse.ArgumentParser, title: str, *, cert: str, key: str, ca: str, insecure: str,
                   server_name: str | None = None) -> None:
    """--tls-cert/--tls-key/--tls-ca[/--tls-server-name]/--insecure, each defaulting to its SPECD_* variable."""
    g = p.add_argument_group(title)
    g.add_argument("--tls-cert", default=env_default("tls_cert", None), help=cert)
    g.add_argument("--tls-key", default=env_default("tls_key", None), help=key)
    g.add_argument("--tls-ca", default=env_default("tls_ca", None), help=ca)
    if server_name is not None:
        g.add_argument("--tls-server-name", default=env_default("tls_server_name", None), help=server_name)
    g.add_argument("--insecure", action="store_true", default=env_default("insecure", False), help=insecure)


def tls_config(args):
    """The TLSConfig the --tls-* / --insecure flags ask for (server or client side)."""
    from common.rpc.tls import TLSConfig
    return TLSConfig(cert=args.tls_cert, key=args.tls_key, ca=args.tls_ca, insecure=args.insecure,
                     server_name=getattr(args, "tls_server_name", None))


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=env_default("model", None), help="model folder (SPECD_MODEL)")
    p.add_argument("--dtype", default=env_default("dtype", "bfloat16"), choices=["float32", "bfloat16", "float16"])
    p.add_argument("--device", default=env_default("device", "cpu"))
    p.add_argument("--quantization", default=env_default("quantization", "none"), choices=["none", "int8", "int4"],
                   help="weight-only quantization of the matmul weights, activations stay in --dtype (CPU; "
                        "SPECD_QUANTIZATION)")
    p.add_argument("--gguf", default=env_default("gguf", None),
                   help="with --quantization int4: a GGUF file of the same model whose Q4_K tensors load with their "
                        "own 4-bit codes (`make models` keeps the fetched ones in models/gguf/; SPECD_GGUF)")
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
    p.add_argument("--prefix-cache-hmac-key-file", default=env_default("prefix_cache_hmac_key_file", None),
                   help="file holding the secret (>= 16 bytes, e.g. `openssl rand -hex 32`) that authenticates every "
                        "Redis value with HMAC-SHA256; required with a Redis URL (SPECD_PREFIX_CACHE_HMAC_KEY_FILE)")
    p.add_argument("--prefix-cache-unauthenticated", action="store_true",
                   default=env_default("prefix_cache_unauthenticated", False),
                   help="use Redis without an HMAC key: whoever can write to it can steer outputs "
                        "(SPECD_PREFIX_CACHE_UNAUTHENTICATED=1)")
    p.add_argument("--redis-password-file", default=env_default("redis_password_file", None),
                   help="file holding the Redis AUTH password, kept off command lines (SPECD_REDIS_PASSWORD_FILE); "
                        "a user name goes in the URL (redis://name@host:6379/0)")
    p.add_argument("--no-prefix-cache", action="store_true", default=env_default("no_prefix_cache", False),
                   help="compute every prefill (no prefix cache at all)")


def server_config(args):
    """The ServerConfig the server flags ask for; raises ConfigError at once (before any model is loaded) when
    neither certificates nor --insecure are given, or a certificate file cannot be read."""
    from common.rpc.server import ServerConfig
    tls = tls_config(args)
    tls.check_server("refusing to start")
    return ServerConfig(host=args.host, port=args.port, max_concurrent_rpcs=args.max_concurrent_rpcs,
                        max_message_bytes=args.max_message_mib << 20, grace_s=args.grace_s,
                        health_port=args.health_port, tls=tls)


def prefix_cache_config(args):
    """The PrefixCacheConfig the model flags ask for, or None when the cache is off; raises ConfigError when a
    secret file cannot be read or a Redis URL comes without an HMAC key (and without --prefix-cache-unauthenticated)."""
    from common.config import PrefixCacheConfig
    from common.errors import ConfigError
    if args.no_prefix_cache or (args.prefix_cache_mib == 0 and not args.redis_url):
        return None
    key_file, password_file = args.prefix_cache_hmac_key_file, args.redis_password_file
    password = None
    if password_file:
        try:
            password = _read_secret(password_file, "--redis-password-file").decode()
        except UnicodeDecodeError:
            raise ConfigError(f"--redis-password-file {password_file!r}: is not UTF-8 text") from None
    return PrefixCacheConfig(local_mib=args.prefix_cache_mib, redis_url=args.redis_url, ttl_s=args.prefix_cache_ttl_s,
                             hmac_key=_read_secret(key_file, "--prefix-cache-hmac-key-file") if key_file else None,
                             unauthenticated=args.prefix_cache_unauthenticated, redis_password=password)


def _read_secret(path: str, flag: str) -> bytes:
    """A secret file's bytes without the trailing newline an editor or `echo` adds."""
    from common.errors import ConfigError
    try:
        with open(path, "rb") as f:
            secret = f.read().rstrip(b"\r\n")
    except OSError as e:
        raise ConfigError(f"{flag} {path!r}: cannot be read ({e.strerror})") from None
    if not secret:
        raise ConfigError(f"{flag} {path!r}: is empty")
    return secret
