"""Our Qwen2 / Qwen3 / Llama implementation against transformers on tiny random checkpoints (fp32)."""
import pytest
import torch

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner, SequenceChunk
from tests.common.kernels.test_vnni_gemm import HAS_AVX2

TOL = 1e-4


@pytest.fixture(scope="module")
def hf_models(tiny_checkpoints):
    from transformers import AutoModelForCausalLM
    return {a: AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
            for a, p in tiny_checkpoints.items()}


def _reference(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0]                  # [len(ids), vocab]


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "llama"])
def test_prefill_decode_and_extend_match_transformers(arch, tiny_checkpoints, hf_models):
    ids = torch.randint(0, 128, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = _reference(hf_models[arch], ids)
    runner = ModelRunner(EngineConfig(model=str(tiny_checkpoints[arch]), num_kv_blocks=32, block_size=4))
    prefill = runner.forward([SequenceChunk(0, ids[:21], num_logits=21)]).logits[0]   # crosses block boundaries
    decode = runner.forward([SequenceChunk(0, ids[21:22])]).logits[0]
    extend = runner.forward([SequenceChunk(0, ids[22:40], num_logits=18)]).logits[0]  # a K+1-token verify shape
    got = torch.cat([prefill, decode, extend])
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() <= TOL


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_mixed_batch_equals_each_sequence_alone(arch, tiny_checkpoints, hf_models):
    """Sequences of different lengths and different numbers of new tokens in one forward pass."""
    gen = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 128, (n,), generator=gen).tolist() for n in (3, 17, 9)]
    runner = ModelRunner(EngineConfig(model=str(tiny_checkpoints[arch]), num_kv_blocks=64, block_size=4))
    first = runner.forward([SequenceChunk(i, p, num_logits=len(p)) for i, p in enumerate(prompts)]).logits
    extra = [[5, 6], [7], [8, 9, 10, 11]]
    second = runner.forward([SequenceChunk(i, e, num_logits=len(e)) for i, e in enumerate(extra)]).logits
    for i, p in enumerate(prompts):
        ref = _reference(hf_models[arch], p + extra[i])
        assert (first[i] - ref[:len(p)]).abs().max().item() <= TOL
        assert (second[i] - ref[len(p):]).abs().max().item() <= TOL


def test_bfloat16_runs_close_to_float32(tiny_checkpoints):
    ids = list(range(1, 30))
    f32 = ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=16))
    bf16 = ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), dtype="bfloat16", num_kv_blocks=16))
    a = f32.forward([SequenceChunk(0, ids, num_logits=len(ids))]).logits[0]
    b = bf16.forward([SequenceChunk(0, ids, num_logits=len(ids))]).logits[0]
    assert b.dtype == torch.float32                              # logits are handed out in float32
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() > 0.8
    assert (a - b).abs().max().item() < 0.1 * a.abs().max().item()


@pytest.mark.skipif(not HAS_AVX2, reason="the processor lacks AVX2")
@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_the_layer_ops_and_pytorchs_ops_give_the_same_model(arch, tiny_checkpoints, monkeypatch):
    """specd's CPU layer ops (common/kernels/layer_ops.py) against PyTorch's chains, in bf16, where rounding
    shows: qwen2 takes the fused RoPE + cache write, qwen3 (q/k norms) PyTorch's RoPE and the fused norms."""
    from common.kernels import layer_ops
    ids = torch.randint(0, 128, (30,), generator=torch.Generator().manual_seed(4)).tolist()

    def run():
        runner = ModelRunner(EngineConfig(model=str(tiny_checkpoints[arch]), dtype="bfloat16", num_kv_blocks=32,
                                          block_size=4))
        prefill = runner.forward([SequenceChunk(0, ids[:20], num_logits=20)]).logits[0]
        step = runner.forward([SequenceChunk(0, ids[20:21])]).logits[0]
        verify = runner.forward([SequenceChunk(0, ids[21:], num_logits=9)]).logits[0]
        return torch.cat([prefill, step, verify])

    calls = {"n": 0}
    fused_norm = layer_ops.rms_norm

    def counted(*args):
        calls["n"] += 1
        return fused_norm(*args)
    monkeypatch.setattr(layer_ops, "rms_norm", counted)
    ours = run()
    assert calls["n"] > 0                                          # the kernels did run
    monkeypatch.setattr(layer_ops, "runs", lambda x: False)
    theirs = run()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9
    assert (ours - theirs).abs().max().item() < 0.02 * theirs.abs().max().item()
