"""`specd health host:port`: exit 0 when the service reports SERVING, 1 otherwise (container probes)."""
from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from common.errors import ConfigError
from common.rpc.tls import TLSConfig, sync_channel


def check(target: str, service: str = "", timeout_s: float = 3.0, tls: TLSConfig | None = None) -> tuple[bool, str]:
    """(SERVING?, a one-line description). `tls=None` is plaintext; `specd health` always passes one."""
    try:
        with sync_channel(target, tls) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=service),
                                                              timeout=timeout_s)
    except grpc.RpcError as e:
        return False, f"{target}: {e.code().name} {e.details()}"
    except ConfigError as e:
        return False, f"{target}: {e}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, f"{target}: {status}"
