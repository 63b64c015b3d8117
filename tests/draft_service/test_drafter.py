"""The draft service's engine without gRPC: batched proposals equal one-at-a-time ones; the soft cache."""

import pytest

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.llm import LLM
from common.speculative.params import SamplingParams
from draft_service.drafter import Drafter
from tests.checkpoints import build_model_folder
from tests.draft_service.propose_gate import ProposeGate

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
CONTEXTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9], [2, 7, 1, 8, 2, 8], [1, 4, 1, 4]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("draft") / "draft", seed=3))


def _drafter(folder, **kw):
    runner = ModelRunner(EngineConfig(model=folder, dtype="float32", num_kv_blocks=kw.pop("num_kv_blocks", 128),
                                      max_num_seqs=16))
    return Drafter(runner, k_max=8, **kw)


def _one_by_one(folder, params):
    d = _drafter(folder)
    try:
        return [d.propose(f"r{i}", ctx, 4, params, 0, timeout=30).proposal for i, ctx in enumerate(CONTEXTS)]
    finally:
        d.shutdown()


@pytest.mark.parametrize("params", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_concurrent_calls_are_batched_and_equal_sequential_ones(folder, params):
    expected = _one_by_one(folder, params)
    d = _drafter(folder)
    gate = ProposeGate(d)
    try:
        first = d.submit("warm", [1, 2, 3], 2, GREEDY, 0)
        gate.wait_entered()                     # the engine thread is held on the first call...
        futs = [d.submit(f"r{i}", ctx, 4, params, 0) for i, ctx in enumerate(CONTEXTS)]
        gate.release()                          # ...so the next five are queued and drafted as one batch
        first.result(30)
        results = [f.result(30) for f in futs]
    finally:
        d.shutdown()
    assert [r.proposal.token_ids for r in results] == [p.token_ids for p in expected]
    if not params.greedy:
        for r, p in zip(results, expected):
            assert [q.token_ids for q in r.proposal.dists] == [q.token_ids for q in p.dists]
    assert list(d.batch_sizes) == [1, len(CONTEXTS)]
    assert all(r.batch_size == len(CONTEXTS) for r in results)


def test_same_request_twice_waits_for_the_next_batch(folder):
    d = _drafter(folder)
    try:
        a = d.submit("same", CONTEXTS[0], 3, GREEDY, 0)
        b = d.submit("same", CONTEXTS[0], 3, GREEDY, 0)
        ra, rb = a.result(30), b.result(30)
    finally:
        d.shutdown()
    assert ra.proposal.token_ids == rb.proposal.token_ids
    assert rb.cached_tokens == len(CONTEXTS[0]) - 1      # the second call reused the first one's KV


def test_soft_cache_reuses_the_shared_prefix_and_stays_bounded(folder):
    d = _drafter(folder, max_cached_sequences=2)
    try:
        first = d.propose("a", CONTEXTS[0], 3, GREEDY, 0, timeout=30)
        assert first.cached_tokens == 0
        grown = CONTEXTS[0] + first.proposal.token_ids[:1] + [7]
        second = d.propose("a", grown, 3, GREEDY, 1, timeout=30)
        assert second.cached_tokens == len(CONTEXTS[0]) + 1
        for i in range(4):
            d.propose(f"other{i}", CONTEXTS[1], 2, GREEDY, 0, timeout=30)
        assert d.cached_sequences == 2
        assert d.propose("a", grown, 3, GREEDY, 1, timeout=30).cached_tokens == 0     # evicted: recomputed
    finally:
        d.shutdown()


def test_kv_exhaustion_evicts_instead_of_failing(folder):
    d = _drafter(folder, num_kv_blocks=4, max_cached_sequences=8)      # 4 blocks of 16 tokens
    try:
        outs = [d.propose(f"r{i}", [1 + i] * 30, 4, GREEDY, 0, timeout=30) for i in range(4)]
    finally:
        d.shutdown()
    assert all(len(o.proposal.token_ids) == 4 for o in outs)


def test_penalties_steer_the_draft_as_they_steer_the_same_model_decoding_alone(folder):
    """The draft penalises its context and its own drafts so far with the target's function: greedy, its K tokens
    are the ones this model decodes target-only with the same penalties."""
    params = SamplingParams(presence_penalty=1.5, frequency_penalty=0.5, repetition_penalty=1.8, max_tokens=6,
                            ignore_eos=True)
    with LLM(folder, dtype="float32", kv_cache_memory_gib=0.02) as llm:
        expected = [o.token_ids for o in llm.generate(CONTEXTS, params)]
        plain = [o.token_ids for o in llm.generate(CONTEXTS, SamplingParams(max_tokens=6, ignore_eos=True))]
    assert expected != plain                                                   # the penalties matter here
    d = _drafter(folder)
    try:
        got = [d.propose(f"p{i}", ctx, 6, params, 0, timeout=30, prompt_len=len(ctx)).proposal.token_ids
               for i, ctx in enumerate(CONTEXTS)]
    finally:
        d.shutdown()
    assert got == expected


@pytest.mark.parametrize("context,k,match,kw", [
    ([], 2, "context_token_ids", {}), ([1, 2], 0, "k=0", {}), ([1, 2], 9, "k=9", {}),
    ([1, 999], 2, "outside the vocabulary", {}),
    ([1, 2], 2, "prompt_len=3: must be in \\[0, len\\(context_token_ids\\)=2\\]", {"prompt_len": 3})])
def test_bad_input_is_refused_before_queueing(folder, context, k, match, kw):
    d = _drafter(folder)
    try:
        with pytest.raises(ValueError, match=match):
            d.submit("bad", context, k, GREEDY, 0, **kw)
        assert d.propose("good", [1, 2, 3], 2, GREEDY, 0, timeout=30).proposal.k == 2
    finally:
        d.shutdown()
