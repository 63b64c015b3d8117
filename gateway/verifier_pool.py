"""Verifier replicas: each new session goes to the least-loaded healthy replica and stays there (torch-free).

Behind a Kubernetes Service one gRPC channel is one HTTP/2 connection, so every session of a gateway would land on one
pod. The pool instead keeps a channel per replica: `targets` are host:port names, each resolved to all of its
addresses (a headless Service's pods), re-resolved every `refresh_s`. On each refresh every replica is asked for its
`Load` (v1.3: sessions, waiting sessions, queue depth, free KV blocks, draining). A replica that fails the call, or a
Verify, is unhealthy until a later refresh answers. A new session goes to the healthy replica with the lowest
score:

    score = sessions + waiting + queue depth it reported (all gateways' work)
          + sessions this gateway pinned there since that report (not yet in it)

ties broken by the larger free share of KV blocks. With none healthy, a new session tries a replica that was good
before (a lone verifier that restarts is reached through its channel's own reconnects, as with one address). A
replica older than v1.3 (Load UNIMPLEMENTED) is scored by this gateway's own sessions there. A replica that serves
another tokenizer, context limit or K limit than the first one checked is never used.

A session is pinned to its replica: its KV lives there. When that replica fails or drains, the round loop moves the
session to another replica by re-prefilling it from the gateway's own token history (gateway/rounds.py), the same
mechanism that recovers a restarted verifier; the output is identical.
"""
from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
from dataclasses import dataclass, field
from typing import Callable

import grpc

from common.rpc.generated.specd.v1 import common_pb2, verifier_pb2
from common.telemetry import metrics

log = logging.getLogger(__name__)


class NoReplicaError(RuntimeError):
    """No healthy verifier replica to route a session to."""


@dataclass(eq=False)
class Replica:
    address: str                                    # host:port as dialled (an IP after resolution)
    stub: object                                    # VerifierServiceStub (grpc.aio)
    channel: object | None = None                   # closed when the replica leaves the pool
    healthy: bool = True
    checked: bool = False                           # its Info matched the pool's fingerprint
    load: verifier_pb2.LoadReply | None = None      # the last report (None: not yet, or a pre-v1.3 verifier)
    pinned: int = 0                                 # this gateway's sessions there now
    pinned_at_report: int = 0                       # ... when `load` was read
    sessions_routed: int = 0                        # sessions ever routed here (tests, logs)
    gone: bool = False                              # no longer resolved: no new sessions
    host: str = ""                                  # the name it was resolved from (its TLS certificate's name)

    def score(self) -> tuple[float, float]:
        if self.load is None:
            return float(self.pinned), 0.0
        busy = self.load.sessions + self.load.waiting_sessions + self.load.queue_depth
        free = self.load.free_kv_blocks / self.load.total_kv_blocks if self.load.total_kv_blocks else 0.0
        return float(busy + max(0, self.pinned - self.pinned_at_report)), -free

    def routable(self) -> bool:
        return self.healthy and self.checked and not self.gone and not (self.load is not None and self.load.draining)


def split_targets(spec: str) -> list[str]:
    """`--verifier`: one or more host:port, comma-separated."""
    targets = [t.strip() for t in spec.split(",") if t.strip()]
    for t in targets:
        host, sep, port = t.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--verifier {t!r}: expected host:port")
    if not targets:
        raise ValueError("--verifier: at least one host:port")
    return targets


async def resolve(target: str) -> list[str]:
    """All addresses of host:port (IPv4 first kept alone when the name has both, as a headless Service's pods);
    an IP literal is itself."""
    host, _, port = target.rpartition(":")
    bare = host.strip("[]")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(bare)
        return [target]
    infos = await asyncio.get_running_loop().getaddrinfo(bare, int(port), type=socket.SOCK_STREAM)
    v4 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET})
    v6 = sorted({i[4][0] for i in infos if i[0] == socket.AF_INET6})
    return [f"{a}:{port}" for a in v4] if v4 else [f"[{a}]:{port}" for a in v6]


@dataclass
class VerifierPool:
    """`connect(address, host) -> (channel, stub)` (`host`: the name the address was resolved from, which its TLS
    certificate names); `fingerprint`: the vocab fingerprint every replica must serve ("": the first replica's)."""
    targets: list[str]
    connect: Callable[[str, str], tuple[object, object]]
    fingerprint: str = ""
    refresh_s: float = 5.0
    call_timeout_s: float = 2.0
    replicas: dict[str, Replica] = field(default_factory=dict)
    info: object | None = None                      # ModelInfo of the first replica checked: what all must serve
    _task: asyncio.Task | None = None
    _resolve: Callable = resolve

    @classmethod
    def single(cls, stub) -> "VerifierPool":
        """One replica given as a stub (tests, in-process callers): always routable, never refreshed."""
        pool = cls(targets=[], connect=lambda a, h: (None, stub))
        pool.replicas["stub"] = Replica("stub", stub, checked=True)
        return pool

    # ---- membership and load ----------------------------------------------------------------------------------
    async def refresh(self) -> None:
        """Re-resolve the targets (new addresses join, vanished ones take no new sessions and close when empty)
        and read every replica's Info (once) and Load."""
        if self.targets:
            addresses: dict[str, str] = {}                      # address -> the host name it was resolved from
            for target in self.targets:
                host = target.rpartition(":")[0].strip("[]")
                try:
                    addresses.update((a, host) for a in await self._resolve(target))
                except OSError as e:
                    log.warning("verifier %s: cannot resolve (%s); keeping its known replicas", target, e)
                    addresses.update((a, r.host) for a, r in self.replicas.items() if r.host == host)
            for address in addresses.keys() - self.replicas.keys():
                channel, stub = self.connect(address, addresses[address])
                self.replicas[address] = Replica(address, stub, channel, host=addresses[address])
                log.info("verifier replica %s joined", address)
            for address, replica in list(self.replicas.items()):
                replica.gone = address not in addresses
                if replica.gone and replica.pinned == 0:
                    log.info("verifier replica %s left", address)
                    del self.replicas[address]
                    if replica.channel is not None:
                        await replica.channel.close()
        await asyncio.gather(*(self._poll(r) for r in list(self.replicas.values()) if r.channel is not None))
        healthy = self.healthy_count()
        metrics.VERIFIER_REPLICAS.labels("healthy").set(healthy)
        metrics.VERIFIER_REPLICAS.labels("unhealthy").set(len(self.replicas) - healthy)

    async def _poll(self, r: Replica) -> None:
        try:
            if not r.checked:
                info = await r.stub.Info(common_pb2.InfoRequest(), timeout=self.call_timeout_s)
                if not self._matches(r, info):
                    return
                r.checked = True
            try:
                r.load = await r.stub.Load(verifier_pb2.LoadRequest(), timeout=self.call_timeout_s)
            except grpc.aio.AioRpcError as e:
                if e.code() is not grpc.StatusCode.UNIMPLEMENTED:
                    raise
                r.load = None                                  # a pre-v1.3 verifier: our own count routes
            r.pinned_at_report = r.pinned
            if not r.healthy:
                log.info("verifier replica %s answers again", r.address)
            r.healthy = True
        except grpc.aio.AioRpcError as e:
            if r.healthy:
                log.warning("verifier replica %s unhealthy: %s: %s", r.address, e.code().name, e.details())
            r.healthy = False

    def _matches(self, r: Replica, info) -> bool:
        """Every replica serves what the first one does (tokenizer, context and K limits); the first sets it."""
        if self.info is None and (not self.fingerprint or info.vocab_fingerprint == self.fingerprint):
            self.info, self.fingerprint = info, info.vocab_fingerprint
            return True
        want = (self.fingerprint, self.info.max_model_len, self.info.k_max) if self.info is not None else \
            (self.fingerprint,)
        got = (info.vocab_fingerprint, info.max_model_len, info.k_max)[:len(want)]
        if got != want:
            log.error("verifier replica %s serves (tokenizer, max_model_len, k_max) = %s, not %s: never routed to",
                      r.address, got, want)
            return False
        return True

    async def start(self) -> None:
        """The first refresh, then one every `refresh_s` in the background."""
        await self.refresh()
        if self.targets:
            self._task = asyncio.ensure_future(self._loop())

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception:  # noqa: BLE001 - a refresh that fails keeps the last view
                log.exception("verifier pool refresh failed")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for r in self.replicas.values():
            if r.channel is not None:
                await r.channel.close()

    # ---- routing ---------------------------------------------------------------------------------------------
    def pick(self, exclude: Replica | None = None) -> Replica:
        """The replica for a new (or moved) session, pinned: call `unpin` when the session ends or moves."""
        candidates = [r for r in self.replicas.values() if r.routable() and r is not exclude]
        if not candidates and exclude is None:
            # None healthy: try those known good before (a lone verifier restarting is reached through its
            # channel's own reconnects, as before there were replicas), never one that failed the check.
            candidates = [r for r in self.replicas.values() if r.checked and not r.gone]
        if not candidates:
            raise NoReplicaError(f"no healthy verifier replica among {sorted(self.replicas) or self.targets}")
        best = min(candidates, key=Replica.score)
        best.pinned += 1
        best.sessions_routed += 1
        return best

    def unpin(self, r: Replica) -> None:
        r.pinned = max(0, r.pinned - 1)

    def failed(self, r: Replica, err: grpc.aio.AioRpcError) -> None:
        """A call to `r` failed as a lost replica fails: no new sessions there until a refresh answers."""
        if r.healthy:
            log.warning("verifier replica %s failed a call (%s: %s): moving its sessions", r.address,
                        err.code().name, err.details())
        r.healthy = False

    def can_move(self, r: Replica) -> bool:
        """Is there another replica a session on `r` could move to?"""
        return any(x.routable() and x is not r for x in self.replicas.values())

    def healthy_count(self) -> int:
        return sum(r.routable() for r in self.replicas.values())


def replica_lost(err: grpc.aio.AioRpcError) -> bool:
    """The replica itself is gone or going (not the request's fault): move the session elsewhere."""
    return err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED,
                          grpc.StatusCode.CANCELLED) and not _client_cancelled()


def _client_cancelled() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0
