"""`specd health HOST:PORT`: exit 0 if the service reports SERVING, else 1 (the probes' and scripts' check)."""
from __future__ import annotations

import sys


def add_commands(sub) -> None:
    from common.rpc.flags import add_client_tls_flags
    health = sub.add_parser("health", help="exit 0 if a service reports SERVING, else 1")
    health.add_argument("target", help="host:port")
    health.add_argument("--service", default="", help="service name (default: the server as a whole)")
    health.add_argument("--timeout", type=float, default=3.0)
    add_client_tls_flags(health)
    health.set_defaults(func=check_health)


def check_health(args) -> int:
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
