"""The in-process LLM API on tiny models: batching, seeds, stop conditions, stats and bad input."""
import pytest

from common.errors import ConfigError
from common.llm import LLM
from common.speculative.params import SamplingParams
from tests.checkpoints import build_model_folder


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("llm")
    return {"target": str(build_model_folder(root / "target", seed=1)),
            "draft": str(build_model_folder(root / "draft", seed=2)),
            "other_vocab": str(build_model_folder(root / "other", seed=3, tokenizer_prefix="x"))}


@pytest.fixture(scope="module")
def target_only(folders):
    with LLM(folders["target"], dtype="float32", kv_cache_memory_gib=0.05) as llm:
        yield llm


PROMPTS = [[5, 9, 2, 77], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [100]]


@pytest.mark.parametrize("draft,k", [("draft", 1), ("draft", 4), ("draft", "auto"), ("ngram", 3), ("ngram", "auto")])
def test_greedy_speculation_equals_target_only(folders, target_only, draft, k):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    expected = [o.token_ids for o in target_only.generate(PROMPTS, params)]
    with LLM(folders["target"], folders[draft] if draft != "ngram" else "ngram", num_speculative_tokens=k,
             dtype="float32", kv_cache_memory_gib=0.05) as llm:
        outs = llm.generate(PROMPTS, params)
    assert [o.token_ids for o in outs] == expected
    assert all(o.finish_reason == "length" and len(o.token_ids) == 24 for o in outs)
    s = outs[1].stats
    assert s.rounds >= 1 and s.mean_acceptance_length == pytest.approx(1 + s.accepted / s.rounds)
    assert sum(s.accepted_per_position) == s.accepted and s.accepted <= s.drafted


def test_k_zero_is_one_token_per_round(folders):
    with LLM(folders["target"], folders["draft"], num_speculative_tokens=0, dtype="float32",
             kv_cache_memory_gib=0.05) as llm:
        [out] = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=10, ignore_eos=True))
    assert out.stats.rounds == 10 and out.stats.drafted == 0


def test_seeded_sampling_is_reproducible_and_seeds_differ(folders):
    with LLM(folders["target"], folders["draft"], num_speculative_tokens=3, dtype="float32",
             kv_cache_memory_gib=0.05) as llm:
        run = lambda seed: llm.generate([PROMPTS[0]], SamplingParams(temperature=1.0, max_tokens=32, seed=seed,
                                                                     ignore_eos=True))[0].token_ids
        assert run(1) == run(1)
        assert run(1) != run(2)


def test_more_prompts_than_sequences_run_in_waves(folders):
    with LLM(folders["target"], dtype="float32", kv_cache_memory_gib=0.05, max_num_seqs=4) as llm:
        outs = llm.generate([[i + 1, 2, 3] for i in range(10)], SamplingParams(max_tokens=3, ignore_eos=True))
        alone = llm.generate([[10, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))
    assert len(outs) == 10 and outs[9].token_ids == alone[0].token_ids


def test_no_kv_block_leaks_after_generation(folders):
    with LLM(folders["target"], folders["draft"], num_speculative_tokens=4, dtype="float32",
             kv_cache_memory_gib=0.05) as llm:
        free_t, free_d = llm.target.allocator.num_free, llm.draft_runner.allocator.num_free
        llm.generate(PROMPTS, SamplingParams(temperature=0.8, max_tokens=20, seed=3))
        assert llm.target.allocator.num_free == free_t and llm.draft_runner.allocator.num_free == free_d


def test_stop_string_and_eos(folders, target_only):
    [free_run] = target_only.generate([PROMPTS[0]], SamplingParams(max_tokens=12, ignore_eos=True))
    word = target_only.tokenizer.decode(free_run.token_ids[3:4])
    [out] = target_only.generate([PROMPTS[0]], SamplingParams(max_tokens=12, stop=[word], ignore_eos=True))
    assert out.finish_reason == "stop" and word not in out.text and len(out.token_ids) <= 4


@pytest.mark.parametrize("k", [-1, 9, "many"])
def test_bad_k_is_refused(folders, k):
    with pytest.raises(ConfigError, match="num_speculative_tokens"):
        LLM(folders["target"], "ngram", num_speculative_tokens=k, k_max=8)


def test_draft_with_another_tokenizer_is_refused_with_both_fingerprints(folders):
    from common.tokenizer import load_tokenizer, vocab_fingerprint
    fp_t = vocab_fingerprint(load_tokenizer(folders["target"]))
    fp_o = vocab_fingerprint(load_tokenizer(folders["other_vocab"]))
    assert fp_t != fp_o
    with pytest.raises(ConfigError, match=f"draft vocab fingerprint {fp_o}, target {fp_t}"):
        LLM(folders["target"], folders["other_vocab"])


def test_bad_prompts(target_only):
    with pytest.raises(ValueError, match="prompt: empty"):
        target_only.generate(["   "])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        target_only.generate([[1, 500]])
    with pytest.raises(ValueError, match="max_model_len"):
        target_only.generate([[1] * 300])


@pytest.mark.parametrize("quantization,draft_quantization", [("int4", "int8"), ("int8", "int4")])
def test_greedy_speculation_equals_target_only_of_the_same_quantized_target(folders, quantization,
                                                                            draft_quantization):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    with LLM(folders["target"], dtype="float32", kv_cache_memory_gib=0.05, quantization=quantization) as llm:
        expected = [o.token_ids for o in llm.generate(PROMPTS, params)]
    with LLM(folders["target"], folders["draft"], num_speculative_tokens=4, dtype="float32",
             kv_cache_memory_gib=0.05, quantization=quantization, draft_quantization=draft_quantization) as llm:
        outs = llm.generate(PROMPTS, params)
        assert llm.target.runner.config.quantization == quantization
        assert llm.draft_runner.config.quantization == draft_quantization
    assert [o.token_ids for o in outs] == expected
    assert sum(o.stats.drafted for o in outs) > 0
