"""Start a grpc.aio server the way all three services need it: TLS (or plaintext when asked for), health
(SERVING only once ready), reflection, keepalive, message-size limits, bounded concurrency, and a graceful
SIGTERM drain (health NOT_SERVING, new RPCs refused with UNAVAILABLE, in-flight ones finish within the grace
period)."""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.rpc.admission import AdmissionInterceptor
from common.rpc.tls import TLSConfig

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 0                          # 0 = any free port (the bound one is reported)
    max_concurrent_rpcs: int = 256         # beyond it grpc answers RESOURCE_EXHAUSTED at once
    max_message_bytes: int = 16 << 20      # a 32k-token prompt with K sparse distributions fits easily
    grace_s: float = 30.0                  # SIGTERM: in-flight RPCs get this long to finish
    keepalive_s: float = 30.0
    health_port: int = 0                   # a plaintext port with the health service only (probes); 0 = none
    tls: TLSConfig | None = None           # None = plaintext (callers in Python); the CLI always sets it

    def __post_init__(self):
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port={self.port}: must be in [0, 65535]")
        if not 0 <= self.health_port <= 65535 or (self.health_port and self.health_port == self.port):
            raise ValueError(f"health_port={self.health_port}: must be in [0, 65535] and differ from port")
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
        # Admission runs first: a refused or undecodable call never reaches tracing or the servicer.
        self.admission = AdmissionInterceptor()
        self.server = grpc.aio.server(options=config.channel_options(),
                                      interceptors=[self.admission, *(interceptors or [])],
                                      maximum_concurrent_rpcs=config.max_concurrent_rpcs)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME,
                                             health.SERVICE_NAME], self.server)
        what = "/".join(service_names)
        credentials = config.tls.server_credentials(what) if config.tls is not None else None
        address = f"{config.host}:{config.port}"
        self.port = (self.server.add_secure_port(address, credentials) if credentials is not None
                     else self.server.add_insecure_port(address))
        if self.port == 0:
            raise OSError(f"cannot bind {address}")
        log.info("%s: %s on %s:%d", what, config.tls.describe() if config.tls else "PLAINTEXT", config.host,
                 self.port)
        # Probes that cannot speak TLS (kubelet's grpc probe) get the health service alone, in plaintext: it
        # tells whether the service is SERVING and nothing else.
        self.health_server = None
        if config.health_port:
            self.health_server = grpc.aio.server(maximum_concurrent_rpcs=16)
            health_pb2_grpc.add_HealthServicer_to_server(self.health, self.health_server)
            if self.health_server.add_insecure_port(f"{config.host}:{config.health_port}") == 0:
                raise OSError(f"cannot bind the health port {config.host}:{config.health_port}")
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.out_of_service: str | None = None    # why the service can never serve again (mark_unavailable)

    async def set_serving(self, serving: bool) -> None:
        serving = serving and self.out_of_service is None
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ["", *self.service_names]:
            await self.health.set(name, status)

    async def run(self, warm_up: Callable[[], Awaitable[None]] | None = None,
                  on_drained: Callable[[], Awaitable[None]] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await self.set_serving(False)
        await self.server.start()
        if self.health_server is not None:
            await self.health_server.start()
        if warm_up is not None:
            await warm_up()
        await self.set_serving(True)
        print(f"SERVING {','.join(self.service_names)} on {self.config.host}:{self.port}", flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()
        await self.drain()
        if on_drained is not None:
            await on_drained()
        print("stopped", flush=True)

    async def drain(self) -> None:
        """Health NOT_SERVING and new RPCs refused (UNAVAILABLE), while the server keeps answering health checks
        and in-flight RPCs finish; then stop, cancelling what outlives the grace period."""
        t = time.monotonic()
        log.info("draining: health NOT_SERVING, new RPCs refused, %.0fs grace for %d in-flight RPCs",
                 self.config.grace_s, self.admission.in_flight)
        self.admission.draining = True
        await self.set_serving(False)
        if not await self.admission.wait_idle(self.config.grace_s):
            log.warning("grace period over with %d RPCs in flight: cancelling them", self.admission.in_flight)
        await self.server.stop(max(self.config.grace_s - (time.monotonic() - t), 0.5))
        if self.health_server is not None:
            await self.health_server.stop(0)

    def stop(self) -> None:
        self._stopping.set()

    def mark_unavailable(self, reason: str) -> concurrent.futures.Future | None:
        """From any thread, for good (an engine that lost a rank or its device): health NOT_SERVING and new RPCs
        refused with UNAVAILABLE; RPCs in flight are left to fail or finish. Returns the future of the health
        update, or None before `run()` (health will then never turn SERVING)."""
        log.error("out of service: %s", reason)
        self.out_of_service = reason
        self.admission.draining = True
        loop = self._loop
        if loop is None or loop.is_closed():
            return None
        return asyncio.run_coroutine_threadsafe(self.set_serving(False), loop)
