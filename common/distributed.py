"""The tensor-parallel process group: world size 1 means no communication at all."""
from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(slots=True)
class TPGroup:
    """This rank's place in the tensor-parallel group, and the collectives the layers need."""
    rank: int = 0
    world_size: int = 1
    group: object = None          # torch.distributed ProcessGroup, None when world_size == 1
    local_rank: int = 0           # the rank's index on its node: picks its GPU (cuda:local_rank)

    @property
    def is_driver(self) -> bool:
        return self.rank == 0

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_min(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            dist.all_reduce(x, op=dist.ReduceOp.MIN, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def broadcast_object(self, obj=None):
        """Rank 0 sends `obj` to every rank; each rank returns it."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]



_SINGLE = TPGroup()
# How long one collective waits for its peers before it fails (torch's default for gloo). It bounds a wait on a
# peer that is alive but stuck; a dead peer is noticed at once by the ranks' RankWatch, and an idle worker rank
# (waiting for the next call inside a broadcast) is kept alive by rank 0's keep-alive well within it.
COLLECTIVE_TIMEOUT_S = 1800.0


def single_rank() -> TPGroup:
    return _SINGLE


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def init_tp_group(rank: int, world_size: int, init_method: str, device: str,
                  timeout_s: float = COLLECTIVE_TIMEOUT_S, local_rank: int | None = None) -> TPGroup:
    """Join (or create) the default process group: NCCL for CUDA, gloo for CPU. `timeout_s` bounds the
    rendezvous and every collective; `local_rank` (default: `rank`, one node) is the rank's index on its node."""
    local_rank = rank if local_rank is None else local_rank
    if world_size == 1:
        return TPGroup()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "gloo":
        # gloo picks an interface by hostname, which can be unroutable in containers; loopback always works
        # for a single-node group, and a multi-node launcher sets GLOO_SOCKET_IFNAME itself.
        if init_method.startswith("tcp://127.0.0.1") or init_method.startswith("tcp://localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if not dist.is_initialized():
        kwargs = {"device_id": torch.device("cuda", local_rank)} if backend == "nccl" else {}
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout_s), **kwargs)
    return TPGroup(rank=rank, world_size=world_size, group=dist.group.WORLD, local_rank=local_rank)
