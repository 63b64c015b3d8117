"""Where a tensor-parallel group's ranks live: how many nodes, how many ranks on each, and where they meet.

Global rank = node_rank * nproc_per_node + local rank. Node 0's local rank 0 is global rank 0, the driver: it
serves gRPC and broadcasts every engine call. Every other rank, on node 0 or on a worker-only node, replays them.
The ranks meet at a c10d TCPStore (torch.distributed's rendezvous store, the one `torchrun` and `tcp://`
init methods use) that the driver hosts on `rdzv_endpoint`; the same store carries each worker node's heartbeat.
"""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from common.errors import ConfigError

DEFAULT_RDZV_PORT = 29400          # torchrun's default c10d rendezvous port


@dataclass(frozen=True, slots=True)
class TPLayout:
    world_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None  # "host:port" of the driver's node; None on one node (a loopback port)

    def __post_init__(self):
        if self.world_size < 1:
            raise ConfigError(f"tp={self.world_size}: must be >= 1")
        if self.nnodes < 1:
            raise ConfigError(f"nnodes={self.nnodes}: must be >= 1")
        if self.world_size % self.nnodes:
            raise ConfigError(f"tp={self.world_size} ranks do not split evenly over nnodes={self.nnodes} "
                              f"(nproc_per_node = tp / nnodes must be a whole number)")
        if not 0 <= self.node_rank < self.nnodes:
            raise ConfigError(f"node_rank={self.node_rank}: must be in [0, nnodes={self.nnodes})")
        if self.nnodes > 1:
            if not self.rdzv_endpoint:
                raise ConfigError(f"nnodes={self.nnodes}: rdzv_endpoint (host:port of node 0) is required")
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ConfigError(f"rdzv_endpoint={self.rdzv_endpoint!r}: must be host:port with a port in "
                                  "[1, 65535]")

    @property
    def nproc_per_node(self) -> int:
        return self.world_size // self.nnodes

    @property
    def multi_node(self) -> bool:
        return self.nnodes > 1

    @property
    def is_driver_node(self) -> bool:
        return self.node_rank == 0

    def ranks_of(self, node: int) -> range:
        """The global ranks whose processes node `node` runs."""
        return range(node * self.nproc_per_node, (node + 1) * self.nproc_per_node)

    @property
    def local_ranks(self) -> range:
        """The global ranks whose processes this node runs."""
        return self.ranks_of(self.node_rank)

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.rdzv_endpoint.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def init_method(self) -> str:
        return f"tcp://{self.rdzv_endpoint}"

    @classmethod
    def build(cls, tp: int, nnodes: int | None = None, node_rank: int | None = None,
              nproc_per_node: int | None = None, rdzv_endpoint: str | None = None,
              env: Mapping[str, str] | None = None) -> "TPLayout":
        """From the verifier's flags, each missing one read from the launcher environment torchrun and Kubernetes
        give a process: MASTER_ADDR/MASTER_PORT (the endpoint), NODE_RANK, NNODES, LeaderWorkerSet's
        LWS_LEADER_ADDRESS / LWS_GROUP_SIZE / LWS_WORKER_INDEX; one node when none is set."""
        env = os.environ if env is None else env
        if nnodes is None:
            nnodes = _env_int(env, "NNODES", "LWS_GROUP_SIZE", default=1)
        if node_rank is None:
            node_rank = _env_int(env, "NODE_RANK", "LWS_WORKER_INDEX", default=0)
        if rdzv_endpoint is None:
            host = env.get("MASTER_ADDR") or env.get("LWS_LEADER_ADDRESS")
            if host:
                rdzv_endpoint = f"{host}:{env.get('MASTER_PORT', DEFAULT_RDZV_PORT)}"
        if nproc_per_node is not None and nproc_per_node * nnodes != tp:
            raise ConfigError(f"tp={tp} but nnodes={nnodes} x nproc_per_node={nproc_per_node} = "
                              f"{nnodes * nproc_per_node} ranks: they must agree")
        return cls(world_size=tp, nnodes=nnodes, node_rank=node_rank,
                   rdzv_endpoint=rdzv_endpoint if nnodes > 1 else None)


def _env_int(env: Mapping[str, str], *names: str, default: int) -> int:
    for name in names:
        raw = env.get(name)
        if raw is not None:
            try:
                return int(raw)
            except ValueError:
                raise ConfigError(f"{name}={raw!r}: must be an integer") from None
    return default


def group_terms(config) -> dict[str, object]:
    """What every node of a group must agree on (an EngineConfig, read on each node from its own flags): the same
    checkpoint by content (paths may differ between nodes), and the settings that shape the shards, the KV cache
    and the numerics. A node whose terms differ from the driver's would compute garbage or diverge its block
    tables, so it is refused before the group serves."""
    from common.config import ModelConfig
    from common.layers.quantization import numerics_of
    from common.models.fingerprint import model_fingerprint, model_fingerprint_of_file
    model = ModelConfig.from_pretrained(config.model)
    return {"model": model_fingerprint(config.model), "dtype": config.dtype, "tp": config.tp_size,
            "device": config.device.split(":")[0], "block_size": config.block_size,
            "num_kv_blocks": config.resolved_num_kv_blocks(model),
            "max_model_len": config.resolved_max_model_len(model),
            "max_num_seqs": config.max_num_seqs, "batch_invariant": config.batch_invariant,
            "cpu_prepack": config.cpu_prepack, "prefix_cache": config.prefix_cache is not None,
            "quantization": numerics_of(config.quantization),
            "gguf": model_fingerprint_of_file(config.gguf) if config.gguf else None}


def term_differences(mine: dict, driver: dict) -> list[str]:
    return [f"{k}: this node {mine.get(k)!r}, the driver {driver.get(k)!r}"
            for k in sorted(set(mine) | set(driver)) if mine.get(k) != driver.get(k)]
