"""Two spawned gloo ranks give the same logits as one rank, for prefill, decode and a K+1-token extend; a rank
that dies is reported at once and fails the calls instead of hanging them; an idle group stays up."""
import multiprocessing as mp
import os
import signal
import threading
import time

import pytest
import torch

from common.config import EngineConfig
from common.engine.greedy import greedy_generate
from common.engine.model_runner import SequenceChunk
from common.engine.rank_watch import RankWatch, TPRankLostError
from common.engine.tp_executor import TPExecutor
from common.errors import EngineStoppedError


def _script(ex):
    g = torch.Generator().manual_seed(7)
    a, b = torch.randint(0, 128, (19,), generator=g).tolist(), torch.randint(0, 128, (6,), generator=g).tolist()
    out = []
    out += ex.forward([SequenceChunk(0, a, num_logits=19), SequenceChunk(1, b, num_logits=6)]).logits   # prefill
    out += ex.forward([SequenceChunk(0, [3]), SequenceChunk(1, [4])]).logits                           # decode
    out += ex.forward([SequenceChunk(0, [5, 6, 7, 8, 9], num_logits=5)]).logits                        # verify K=4
    ex.truncate(0, 22)                                                                                 # rollback
    out += ex.forward([SequenceChunk(0, [10, 11], num_logits=2), SequenceChunk(1, [12])]).logits
    return out


# llama: tied head over a vocab-parallel embedding; int4: each rank quantizes its own shards (common/layers/
# quantization.py). On PyTorch's kernel they equal the slices of the whole (groups of input columns never straddle
# two ranks, activations stay in float): to float rounding. On the VNNI kernel a row-parallel shard shares its
# weights' float16 scales over a super-block of its own columns (the tiny model's 32-column o_proj shard: one
# group, against two at TP=1), so requantized weights differ a little: TP=2 agrees with TP=1 to quantization noise
# (here ~3.5% of the largest logit; `bound` below).
@pytest.mark.parametrize("arch,quantization,kernel,bound", [
    ("qwen2", "none", "", 1e-4), ("llama", "none", "", 1e-4), ("qwen2", "int4", "torch", 1e-4),
    ("llama", "int4", "torch", 1e-4), ("qwen2", "int4", "vnni", 0.06), ("llama", "int4", "vnni", 0.06)])
def test_tp2_matches_tp1(arch, quantization, kernel, bound, tiny_checkpoints, monkeypatch):
    monkeypatch.setenv("SPECD_QUANT_KERNEL", kernel)
    cfg = dict(model=str(tiny_checkpoints[arch]), num_kv_blocks=32, block_size=4, quantization=quantization)
    with TPExecutor(EngineConfig(**cfg, tp_size=1)) as ex1:
        ref = _script(ex1)
    with TPExecutor(EngineConfig(**cfg, tp_size=2)) as ex2:
        got = _script(ex2)
        assert len(ex2._workers) == 1 and ex2._workers[0].is_alive()
        free_before = ex2.allocator.num_free
        out = greedy_generate(ex2, [[1, 2, 3]], max_new_tokens=4)
        assert len(out[0].token_ids) == 4 and ex2.allocator.num_free == free_before
    for r, g in zip(ref, got, strict=True):
        assert r.shape == g.shape
        assert (r - g).abs().max().item() <= bound * max(1.0, r.abs().max().item())


def test_tp2_errors_reach_the_caller_and_the_group_keeps_working(tiny_checkpoints):
    with TPExecutor(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=8, tp_size=2,
                                 max_model_len=40)) as ex:
        with pytest.raises(ValueError, match="outside the vocabulary"):
            ex.forward([SequenceChunk(0, [999])])
        out = ex.forward([SequenceChunk(0, [1, 2, 3])])
        assert out.logits[0].shape == (1, 128) and out.cached_tokens == [0]


# ---- a rank that dies --------------------------------------------------------------------------------------------
def test_rank_watch_reports_the_first_death_once_with_its_exit_code():
    ctx = mp.get_context("spawn")
    procs = {1: ctx.Process(target=time.sleep, args=(60,), daemon=True),
             2: ctx.Process(target=time.sleep, args=(60,), daemon=True)}
    for p in procs.values():
        p.start()
    reports = []
    watch = RankWatch.of_processes(procs, lambda *a: reports.append(a))
    assert not watch.wait_lost(0.3) and reports == []
    t = time.monotonic()
    os.kill(procs[2].pid, signal.SIGKILL)
    assert watch.wait_lost(2.0)
    assert time.monotonic() - t < 1.0
    time.sleep(0.1)                           # the handler runs right after the event is set
    procs[1].kill()
    time.sleep(0.3)
    assert reports == [(2, -signal.SIGKILL)] and watch.lost_rank == 2


def test_a_stopped_rank_watch_reports_nothing():
    p = mp.get_context("spawn").Process(target=time.sleep, args=(60,), daemon=True)
    p.start()
    reports = []
    watch = RankWatch({1: p.sentinel}, lambda *a: reports.append(a))
    watch.stop()
    p.kill()
    p.join()
    time.sleep(0.3)
    assert reports == [] and not watch.lost


def test_a_killed_rank_fails_the_call_in_flight_and_every_later_one(tiny_checkpoints):
    """The engine thread's calls never hang on a dead peer: the one running and all later ones raise
    TPRankLostError (UNAVAILABLE) within 2 s, and the owner hears of it once, as fast."""
    lost, heard = [], threading.Event()

    def on_rank_loss(err):
        lost.append(err)
        heard.set()
    ex = TPExecutor(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=32, block_size=4, tp_size=2),
                    on_rank_loss=on_rank_loss)
    try:
        errors = []

        def engine_thread():
            try:
                while True:                   # prefill, decode, roll back, free: every kind of replayed call
                    ex.forward([SequenceChunk(0, [1, 2, 3, 4, 5], num_logits=5)])
                    ex.forward([SequenceChunk(0, [6])])
                    ex.truncate(0, 3)
                    ex.free(0)
            except Exception as e:  # noqa: BLE001 - what the test checks
                errors.append((time.monotonic(), e))
        worker = threading.Thread(target=engine_thread, daemon=True)
        worker.start()
        time.sleep(0.5)
        assert worker.is_alive() and not lost
        t = time.monotonic()
        os.kill(ex._workers[0].pid, signal.SIGKILL)
        worker.join(timeout=5)
        assert not worker.is_alive(), "the engine thread hangs on the dead rank"
        (failed_at, err), = errors
        assert isinstance(err, TPRankLostError) and isinstance(err, EngineStoppedError)
        assert failed_at - t < 2.0
        assert heard.wait(2.0 - (time.monotonic() - t))
        time.sleep(0.2)
        assert ex.lost and len(lost) == 1 and isinstance(lost[0], TPRankLostError)
        assert "rank 1 of 2" in str(lost[0]) and f"exit code {-signal.SIGKILL}" in str(lost[0])
        with pytest.raises(TPRankLostError, match="must be restarted"):
            ex.forward([SequenceChunk(1, [1, 2])])
    finally:
        t = time.monotonic()
        ex.shutdown()
        assert time.monotonic() - t < 10


def test_idle_ranks_outlive_the_collective_timeout(tiny_checkpoints):
    """A worker rank waits for the next call inside a broadcast, which fails after the group's timeout: rank 0's
    keep-alive keeps an idle group up (without it the worker died after `collective_timeout_s`)."""
    lost = []
    with TPExecutor(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=8, tp_size=2),
                    on_rank_loss=lost.append, collective_timeout_s=12, keepalive_s=1) as ex:
        time.sleep(14)
        out = ex.forward([SequenceChunk(0, [1, 2, 3])])
        assert out.logits[0].shape == (1, 128)
        assert ex._workers[0].is_alive() and not lost


def test_cpu_ranks_split_the_cores_this_process_may_use():
    import os
    import subprocess
    import sys
    code = "from common.engine.tp_executor import cpu_threads_per_rank as f; print(f(1), f(2), f(64))"
    pinned = subprocess.run(["taskset", "-c", "0", sys.executable, "-c", code], capture_output=True, text=True,
                            check=True).stdout.split()
    assert pinned == ["1", "1", "1"]                    # one core allowed: one thread, however many cores exist
    free = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    cores = len(os.sched_getaffinity(0))
    assert free == [str(cores), str(max(1, cores // 2)), "1"]
