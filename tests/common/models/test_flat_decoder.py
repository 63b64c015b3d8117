"""The flat decode loop (common/models/flat_decoder.py) against the layers' own forward: the same logits bit for
bit on every pass it serves (decode, verify, a batch of unequal passes, a catch-up), under every quantization and
in batch-invariant mode; and it stays off, saying why, where the kernels do not serve the model."""
import pytest
import torch

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner, SequenceChunk
from common.models.flat_decoder import FlatDecoder
from tests.common.kernels.test_vnni_gemm import HAS_AVX2

pytestmark = pytest.mark.skipif(not HAS_AVX2, reason="the processor lacks AVX2")


def _passes(runner: ModelRunner) -> list[torch.Tensor]:
    """Two prompts' prefills, then a decode step, a verify pass, a batch of a decode and a verify (unequal query
    counts), and a catch-up: logits of every pass."""
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(1, 128, (n,), generator=g).tolist() for n in (23, 9)]
    out = [runner.forward([SequenceChunk(0, ids[0])]).logits[0], runner.forward([SequenceChunk(1, ids[1])]).logits[0]]
    out += runner.forward([SequenceChunk(0, [5])]).logits                                   # decode
    out += runner.forward([SequenceChunk(0, [6, 7, 8, 9, 10], num_logits=5)]).logits         # verify, K = 4
    out += runner.forward([SequenceChunk(0, [11]), SequenceChunk(1, [12, 13, 14], num_logits=3)]).logits
    out += runner.forward([SequenceChunk(1, list(range(20, 37)))]).logits                   # a draft's catch-up
    return out


def _both_ways(monkeypatch, model: str, **kw) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
    """(logits through the loop, through the layers, passes the loop ran)."""
    runner = ModelRunner(EngineConfig(model=model, num_kv_blocks=32, block_size=4, **kw))
    assert runner.model.flat is not None
    calls = []
    real = FlatDecoder.__call__
    monkeypatch.setattr(FlatDecoder, "__call__", lambda self, *a: calls.append(1) or real(self, *a))
    flat_logits = _passes(runner)
    for seq in (0, 1):
        runner.free(seq)
    runner.model.flat = None
    layer_logits = _passes(runner)
    return flat_logits, layer_logits, len(calls)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype,quantization", [("bfloat16", "int4"), ("bfloat16", "int8"), ("float32", "int4"),
                                                ("bfloat16", "none"), ("float32", "none")])
def test_the_flat_loop_gives_the_layers_logits_bit_for_bit(arch, dtype, quantization, tiny_checkpoints,
                                                           monkeypatch):
    flat, layers, calls = _both_ways(monkeypatch, str(tiny_checkpoints[arch]), dtype=dtype, quantization=quantization)
    # every pass but the two prefills went through the loop; with every matmul on the VNNI kernel, the prefills too
    assert calls == (4 if quantization == "none" else 6)
    assert len(flat) == len(layers)
    for a, b in zip(flat, layers):
        assert torch.equal(a, b)


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_batch_invariant_mode_keeps_the_loop_exact(quantization, tiny_checkpoints, monkeypatch):
    """There oneDNN's bf16 matmuls are padded to their row tile (the loop runs those layers' own forward), and a
    prefill reads the cache through the row kernel too (the loop serves it)."""
    flat, layers, calls = _both_ways(monkeypatch, str(tiny_checkpoints["qwen2"]), dtype="bfloat16",
                                     quantization=quantization, batch_invariant=True)
    assert calls == 6
    for a, b in zip(flat, layers):
        assert torch.equal(a, b)


def test_the_loop_stays_off_where_the_kernels_do_not_serve_the_model(tiny_checkpoints, monkeypatch):
    qwen3 = ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen3"]), num_kv_blocks=8, block_size=4))
    assert qwen3.model.flat is None
    assert "q/k norms" in qwen3.model.flatten(qwen3.device)
    runner = ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=8, block_size=4))
    reason = FlatDecoder.of(runner.model.model, torch.float16, runner.device)[1]
    assert "fp32 or bf16" in reason and "torch.float16" in reason
    from common.kernels import layer_ops
    monkeypatch.setattr(layer_ops, "enabled", lambda: False)
    assert "layer ops are off" in runner.model.flatten(runner.device)
    assert runner.model.flat is None
    monkeypatch.undo()
    monkeypatch.setattr(layer_ops, "runs", lambda x: False)       # as the layers' forward asks: so does the loop
    assert "layer ops are off" in runner.model.flatten(runner.device)
    assert torch.isfinite(runner.forward([SequenceChunk(0, [1, 2, 3])]).logits[0]).all()
    assert torch.isfinite(runner.forward([SequenceChunk(0, [4])]).logits[0]).all()
