"""Paged KV behaviour of the model runner: rollback exactness, no leaked blocks, limits."""
import pytest
import torch

from common.config import EngineConfig
from common.engine.greedy import greedy_generate
from common.engine.model_runner import ModelRunner, SequenceChunk
from common.errors import KVCacheExhaustedError, SequenceTooLongError


@pytest.fixture()
def runner(tiny_checkpoints):
    return ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=24, block_size=4))


def _ids(n, seed):
    return torch.randint(0, 128, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("n,k,j", [(10, 5, 2), (8, 8, 0), (7, 6, 5), (12, 4, 4)])
def test_rollback_then_extend_equals_fresh_prefill(runner, n, k, j):
    prompt, drafts, after = _ids(n, 1), _ids(k, 2), _ids(3, 3)
    runner.forward([SequenceChunk(1, prompt)])
    runner.forward([SequenceChunk(1, drafts, num_logits=k)])        # verify K drafts
    runner.truncate(1, n + j)                                       # keep j of them
    assert runner.num_tokens(1) == n + j
    rolled = runner.forward([SequenceChunk(1, after, num_logits=3)]).logits[0]
    tokens = prompt + drafts[:j] + after
    fresh = runner.forward([SequenceChunk(2, tokens, num_logits=len(tokens))]).logits[0][-3:]
    assert torch.equal(rolled.argmax(-1), fresh.argmax(-1))
    assert (rolled - fresh).abs().max().item() <= 1e-5
    # the rollback freed exactly the blocks past n + j (+3 new tokens)
    assert len(runner.sequences[1].blocks) == -(-(n + j + 3) // 4)


def test_no_block_leaks_after_sequences_are_freed(runner):
    start = runner.allocator.num_free
    runner.forward([SequenceChunk(i, _ids(5 + 3 * i, i)) for i in range(4)])
    runner.forward([SequenceChunk(i, [1, 2], num_logits=2) for i in range(4)])
    runner.truncate(2, 3)
    assert runner.allocator.num_free < start
    for i in range(4):
        runner.free(i)
    assert runner.allocator.num_free == start and runner.allocator.num_used == 0


def test_greedy_generate_frees_its_sequences(runner):
    start = runner.allocator.num_free
    out = greedy_generate(runner, [_ids(6, 1), _ids(11, 2)], max_new_tokens=5)
    assert [len(r.token_ids) for r in out] == [5, 5]
    assert runner.allocator.num_free == start


def test_batched_greedy_equals_one_by_one(runner):
    prompts = [_ids(4, 1), _ids(13, 2), _ids(7, 3)]
    batched = greedy_generate(runner, prompts, max_new_tokens=8)
    alone = [greedy_generate(runner, [p], max_new_tokens=8)[0] for p in prompts]
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]


def test_sequence_past_max_model_len(tiny_checkpoints):
    r = ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=64, max_model_len=20))
    r.forward([SequenceChunk(0, _ids(18, 1))])
    with pytest.raises(SequenceTooLongError, match="21 tokens \\(18 cached \\+ 3 new\\) exceeds max_model_len=20"):
        r.forward([SequenceChunk(0, [1, 2, 3])])
    assert r.num_tokens(0) == 18                                    # the failed call changed nothing


def test_kv_exhausted_is_clear_and_changes_nothing(tiny_checkpoints):
    r = ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=4, block_size=4))
    r.forward([SequenceChunk(0, _ids(10, 1))])                      # 3 blocks
    free_before = r.allocator.num_free
    with pytest.raises(KVCacheExhaustedError, match="KV cache exhausted: need 2 more block"):
        r.forward([SequenceChunk(0, [1]), SequenceChunk(1, _ids(5, 2))])
    assert r.allocator.num_free == free_before and 1 not in r.sequences and r.num_tokens(0) == 10


def test_token_outside_vocabulary(runner):
    with pytest.raises(ValueError, match="token id 128 outside the vocabulary \\[0, 128\\)"):
        runner.forward([SequenceChunk(0, [1, 128])])


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_a_quantized_runner_computes_with_quantized_weights_only(tiny_checkpoints, method):
    from common.layers.quantization import QuantizedWeight
    cfg = dict(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=24, block_size=4)
    plain, quantized = ModelRunner(EngineConfig(**cfg)), ModelRunner(EngineConfig(**cfg, quantization=method))
    layers = [m for m in quantized.model.modules() if hasattr(m, "qweight")]
    assert len(layers) == 2 * 4 + 1                     # qkv, o, gate_up, down per layer, and the head
    assert all(isinstance(m.qweight, QuantizedWeight) for m in layers)
    assert {m.qweight.method for m in layers if m is not quantized.model.lm_head} == {method}
    assert quantized.model.lm_head.qweight.method == "int8"          # the head stays int8 under int4
    assert all(m.weight.numel() == 0 for m in layers if m is not quantized.model.lm_head)   # no plain copy kept
    ids = _ids(12, 5)
    [a], [b] = plain.forward([SequenceChunk(0, ids)]).logits, quantized.forward([SequenceChunk(0, ids)]).logits
    assert not torch.equal(a, b)                        # really another model...
    assert torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.98      # ...close to the original


def test_a_drafts_int4_head_and_its_refusals(tiny_checkpoints):
    from common.config import draft_lm_head_quantization
    from common.errors import ConfigError
    cfg = dict(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=24, block_size=4, quantization="int4")
    assert draft_lm_head_quantization("int4") == "int4" and draft_lm_head_quantization("int8") is None
    int8_head = ModelRunner(EngineConfig(**cfg))
    int4_head = ModelRunner(EngineConfig(**cfg, lm_head_quantization="int4"))
    assert int4_head.model.lm_head.qweight.method == "int4"
    assert int4_head.model.lm_head.qweight.nbytes < 0.6 * int8_head.model.lm_head.qweight.nbytes
    ids = _ids(12, 6)
    [a] = int8_head.forward([SequenceChunk(0, ids)]).logits
    [b] = int4_head.forward([SequenceChunk(0, ids)]).logits
    assert not torch.equal(a, b) and torch.nn.functional.cosine_similarity(a, b, dim=-1).min() > 0.95
    with pytest.raises(ConfigError, match="lm_head_quantization='int4' with quantization='none'"):
        EngineConfig(model=cfg["model"], lm_head_quantization="int4")
    with pytest.raises(ConfigError, match="lm_head_quantization='int2': must be 'int8', 'int4'"):
        EngineConfig(**cfg, lm_head_quantization="int2")


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("method", ["int8", "int4"])
def test_on_the_vnni_kernel_a_prefill_gives_each_row_the_same_bits_whatever_follows_it(tiny_checkpoints, method,
                                                                                        dtype):
    """A K=auto first round prefills the prompt with its drafts: the prompt's rows (hence its KV) must come out as a
    prompt-alone prefill computes them, or greedy speculation drifts from target-only at near-ties."""
    from tests.common.kernels.test_vnni_gemm import HAS_AVX2
    if not HAS_AVX2:
        pytest.skip("the processor lacks AVX2: the VNNI kernel does not run")
    cfg = dict(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=48, block_size=4, dtype=dtype)
    runner = ModelRunner(EngineConfig(**cfg, quantization=method))
    assert runner.rows_independent
    assert not ModelRunner(EngineConfig(**cfg)).rows_independent           # oneDNN's matmuls: row counts matter
    prompt, drafts = _ids(23, 7), _ids(3, 8)
    [alone] = runner.forward([SequenceChunk(0, prompt, num_logits=23)]).logits
    [with_drafts] = runner.forward([SequenceChunk(1, prompt + drafts, num_logits=26)]).logits
    assert torch.equal(with_drafts[:23], alone)
    [step] = runner.forward([SequenceChunk(0, drafts[:1])]).logits          # and decoding on from either cache
    assert torch.equal(step[0], with_drafts[23])
