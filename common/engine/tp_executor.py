"""Drives a ModelRunner on every rank of a tensor-parallel group.

Rank 0 lives in the caller's process; ranks 1..N-1 are spawned processes that loop on "the next call",
broadcast by rank 0. Each call runs on every rank in the same order, so all ranks keep identical block
tables; only the method name and its (small) arguments cross the process boundary, never tensors.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import traceback
from datetime import timedelta

from common.config import EngineConfig
from common.distributed import TPGroup, free_port, init_tp_group
from common.engine.forward_io import ForwardOutput, SequenceChunk
from common.engine.model_runner import ModelRunner
from common.errors import SpecdError

log = logging.getLogger(__name__)

# Calls a worker rank replays; anything else is refused on rank 0 before it is broadcast.
_REPLAYED = ("forward", "truncate", "free")
_SHUTDOWN = "__shutdown__"


def cpu_threads_per_rank(tp_size: int) -> int:
    """Split the cores between CPU ranks: oversubscribed OpenMP pools stall every parallel region for
    milliseconds (a 2-core host with 2 ranks × 2 threads ran a 16-element softmax in 7 ms instead of 3 µs)."""
    return max(1, (os.cpu_count() or 1) // tp_size)


def _worker_main(rank: int, config: EngineConfig, init_method: str, ready) -> None:
    if config.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch
        torch.set_num_threads(cpu_threads_per_rank(config.tp_size))
    try:
        tp = init_tp_group(rank, config.tp_size, init_method, config.device)
        runner = ModelRunner(config, tp)
    except BaseException as e:  # report load failures to rank 0 instead of hanging it
        ready.put((rank, f"{type(e).__name__}: {e}"))
        raise
    ready.put((rank, None))
    while True:
        method, args = tp.broadcast_object(None)
        if method == _SHUTDOWN:
            runner.close()
            break
        try:
            getattr(runner, method)(*args)
        except (SpecdError, ValueError, KeyError):
            pass  # rank 0 raised the same error from the same state and reports it to its caller
        except Exception:
            traceback.print_exc()
            os._exit(1)


class TPExecutor:
    """The engine's handle on its model: `forward`, `truncate`, `free` run on all TP ranks."""

    def __init__(self, config: EngineConfig, init_method: str | None = None):
        self.config = config
        self._workers: list[mp.Process] = []
        if config.tp_size == 1:
            self.runner = ModelRunner(config)
            return
        init_method = init_method or f"tcp://127.0.0.1:{free_port()}"
        if config.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
            import torch
            torch.set_num_threads(cpu_threads_per_rank(config.tp_size))
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        for rank in range(1, config.tp_size):
            p = ctx.Process(target=_worker_main, args=(rank, config, init_method, ready), daemon=True,
                            name=f"specd-tp-rank{rank}")
            p.start()
            self._workers.append(p)
        try:
            self.tp = init_tp_group(0, config.tp_size, init_method, config.device)
            self.runner = ModelRunner(config, self.tp)
            for _ in self._workers:
                rank, err = ready.get(timeout=600)
                if err:
                    raise RuntimeError(f"TP rank {rank} failed to start: {err}")
        except BaseException:
            self._kill_workers()
            raise
        log.info("tensor parallel group up: %d ranks (%s)", config.tp_size, init_method)

    # ---- the replayed calls -------------------------------------------------------------------------------
    def forward(self, chunks: list[SequenceChunk]) -> ForwardOutput:
        return self._call("forward", chunks)

    def truncate(self, seq_id: int, new_len: int) -> None:
        self._call("truncate", seq_id, new_len)

    def free(self, seq_id: int) -> None:
        self._call("free", seq_id)

    def _call(self, method: str, *args):
        assert method in _REPLAYED
        if self._workers:
            self.tp.broadcast_object((method, args))
        return getattr(self.runner, method)(*args)

    # ---- local queries (identical on every rank, so rank 0 answers) ----------------------------------------
    @property
    def model_config(self):
        return self.runner.model_config

    def num_tokens(self, seq_id: int) -> int:
        return self.runner.num_tokens(seq_id)

    @property
    def allocator(self):
        return self.runner.allocator

    def shutdown(self) -> None:
        self.runner.close()
        if self._workers:
            try:
                self.tp.broadcast_object((_SHUTDOWN, ()))
            except Exception:  # a dead worker: fall through to terminate
                pass
            for p in self._workers:
                p.join(timeout=30)
            self._kill_workers()
            import torch.distributed as dist
            if dist.is_initialized():
                dist.destroy_process_group()

    def _kill_workers(self) -> None:
        for p in self._workers:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)
        self._workers = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.shutdown()
