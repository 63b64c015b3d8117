"""bench-peers' accounting: the bytes a pass reads, per model and per GGUF, and the machine's read bandwidth."""
import pytest

from bench.peers import measure_read_bandwidth, model_bytes_per_token
from common.config import EngineConfig
from common.engine.model_runner import ModelRunner


def test_a_quantized_model_reads_fewer_bytes_per_pass(tiny_checkpoints):
    path = str(tiny_checkpoints["qwen2"])
    sizes = {q: model_bytes_per_token(ModelRunner(EngineConfig(model=path, num_kv_blocks=8, dtype="bfloat16",
                                                               quantization=q)).model)
             for q in ("none", "int8", "int4")}
    # tiny qwen2: 2 layers of 64x(128 qkv + 64 o + 256 gate_up) + 128x64 down, and a 128x64 head, bf16
    matmul_weights = 2 * (64 * 128 + 64 * 64 + 64 * 256 + 128 * 64) + 128 * 64
    assert sizes["none"] >= 2 * matmul_weights
    assert sizes["int8"] < sizes["none"] * 0.6
    assert sizes["int4"] < sizes["int8"]


def test_read_bandwidth_is_a_plausible_number():
    gbs = measure_read_bandwidth(threads=1, gib=0.05, reps=2)
    assert 0.1 < gbs < 2000


def test_a_loaded_set_that_leaves_too_little_memory_is_refused_before_it_runs(monkeypatch):
    from bench import peers
    assert 0 < peers.available_gib() < float("inf")
    monkeypatch.setattr(peers, "available_gib", lambda: 2.0)
    peers.check_memory_left(["llama.cpp", "specd int4"], workers=1)           # 1.5 GiB needed: goes on
    with pytest.raises(SystemExit, match=r"only 2.0 GiB .* 3.0 GiB needed to run 4 specd workers"):
        peers.check_memory_left(["llama.cpp", "a", "b", "c", "d"], workers=4)


def test_a_dead_worker_is_named_with_its_exit_code():
    import multiprocessing as mp

    from bench.peers import SpecdWorker
    w = SpecdWorker.__new__(SpecdWorker)
    w.name = "specd int4"
    w.conn, child = mp.Pipe()
    w.proc = mp.get_context("spawn").Process(target=int)
    w.proc.start()
    w.proc.join()
    child.close()                                              # nobody reads the pipe any more
    with pytest.raises(RuntimeError, match="specd int4: its worker process died, exit code 0"):
        w.generate("text", False, 4)
    w.close()                                                  # closing a dead worker raises nothing
