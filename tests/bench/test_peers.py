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
