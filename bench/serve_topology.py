"""`make bench-serve`'s topology: the real pair as local services (verifier TP=1) with each model service pinned to a
core of its own (taskset), the gateway serving gRPC and HTTP."""
from __future__ import annotations

from pathlib import Path

from common.distributed import free_port
from scripts.dev.topology import LocalTopology


class PinnedTopology(LocalTopology):
    """A LocalTopology whose processes named in `cores` start under `taskset -c CORES` (torch then sizes its thread
    pool to those cores)."""

    def __init__(self, *args, cores: dict[str, str], **kwargs):
        super().__init__(*args, **kwargs)
        self.cores = cores

    def _spawn_argv(self, name: str, argv: list[str]) -> None:
        core = self.cores.get(name)
        super()._spawn_argv(name, ["taskset", "-c", core, *argv] if core else argv)


def pinned_topology(target: str, draft: str, dtype: str, cores: dict[str, str], log_dir: Path) -> PinnedTopology:
    log_dir.mkdir(parents=True, exist_ok=True)
    return PinnedTopology(target, draft, tp=1, dtype=dtype, ports=(free_port(), free_port(), free_port()), k="auto",
                          log_dir=log_dir, http_port=free_port(), cores=cores)
