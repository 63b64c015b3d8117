"""Start a grpc.aio server the way all three services need it: health (SERVING only once ready), reflection,
keepalive, message-size limits, bounded concurrency, and a graceful SIGTERM drain."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0                          # 0 = any free port (the bound one is reported)
    max_concurrent_rpcs: int = 256         # beyond it grpc answers RESOURCE_EXHAUSTED at once
    max_message_bytes: int = 16 << 20      # a 32k-token prompt with K sparse distributions fits easily
    grace_s: float = 30.0                  # SIGTERM: in-flight RPCs get this long to finish
    keepalive_s: float = 30.0

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port}: must be in [0, 65535]")
        if self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs={self.max_concurrent_rpcs}: must be >= 1")
        if not 1 << 10 <= self.max_message_bytes <= 1 << 30:
            raise ValueError(f"max_message_bytes={self.max_message_bytes}: must be in [1 KiB, 1 GiB]")
        if self.grace_s < 0:
            raise ValueError(f"grace_s={self.grace_s}: must be >= 0")

    def channel_options(self) -> list[tuple[str, int]]:
        return [("grpc.max_send_message_length", self.max_message_bytes),
                ("grpc.max_receive_message_length", self.max_message_bytes),
                ("grpc.keepalive_time_ms", int(self.keepalive_s * 1000)),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0)]


class ServiceHost:
    """Owns the server and its health status; `run()` serves until SIGTERM/SIGINT, then drains."""

    def __init__(self, config: ServerConfig, service_names: list[str], interceptors=None):
        self.config = config
        self.service_names = service_names
        self.server = grpc.aio.server(options=config.channel_options(), interceptors=interceptors or None,
                                      maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME,
                                             health.SERVICE_NAME], self.server)
        self.port = self.server.add_insecure_port(f"{config.host}:{config.port}")
        if self.port == 0:
            raise OSError(f"cannot bind {config.host}:{config.port}")
        self._stopping = asyncio.Event()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def run(self, warm_up: Callable[[], Awaitable[None]] | None = None,
                  on_drained: Callable[[], Awaitable[None]] | None = None) -> None:
        await self.set_serving(False)
        await self.server.start()
        if warm_up is not None:
            await warm_up()
        await self.set_serving(True)
        print(f"SERVING {','.join(self.service_names)} on {self.config.host}:{self.port}", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()
        log.info("draining: health NOT_SERVING, %.0fs grace for in-flight RPCs", self.config.grace_s)
        await self.set_serving(False)
        await self.server.stop(self.config.grace_s)
        if on_drained is not None:
            await on_drained()
        print("stopped", flush=True)

    def stop(self) -> None:
        self._stopping.set()
