"""Logprobs are the target's, at every emitted token: against a plain-Python reference on forced rows, and on a tiny
pair, speculative (K fixed and auto) equal to target-only within 1e-4 in fp32, greedy and sampled, penalties on and
off. (The real pair: test_logprobs_real.py.)"""
import pytest
import torch

from common.llm import LLM
from common.speculative.logprobs import token_logprobs
from common.speculative.params import SamplingParams
from common.speculative.penalties import TokenHistory
from tests.checkpoints import build_model_folder, perturbed_copy
from tests.common.speculative.reference import (assert_logprobs_match, assert_same_logprobs, log_softmax,
                                                penalized_row, teacher_forced)

PENALTIES = dict(presence_penalty=0.6, frequency_penalty=0.3, repetition_penalty=1.3)
PROMPTS = [[1, 2, 3, 4, 5], [9, 8, 7], [40, 41, 40, 41, 40, 41]]


def test_each_emitted_token_gets_its_rows_penalised_logprob_and_top_alternatives():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 10, generator=g) * 2                                   # [K+1, vocab], K = 3
    history, emitted = [1, 2, 3, 2], [7, 2, 5]                                    # 2 drafts accepted, then e_2
    params = SamplingParams(temperature=0.5, top_k=2, logprobs=3, **PENALTIES)    # temperature/top-k: not applied
    got = token_logprobs(logits, params, TokenHistory(history, 2), emitted)
    assert [t.token_id for t in got] == emitted
    for i, t in enumerate(got):
        ref = log_softmax(penalized_row(logits[i].tolist(), params, history + emitted[:i], 2))
        assert t.logprob == pytest.approx(ref[emitted[i]], abs=1e-5)
        best = sorted(range(10), key=lambda j: -ref[j])[:3]
        assert [j for j, _ in t.top] == best
        assert [lp for _, lp in t.top] == pytest.approx([ref[j] for j in best], abs=1e-5)


def test_zero_alternatives_still_gives_each_tokens_logprob():
    got = token_logprobs(torch.zeros(2, 4), SamplingParams(logprobs=0), None, [3])
    assert len(got) == 1 and got[0].top == [] and got[0].logprob == pytest.approx(-torch.log(torch.tensor(4.)).item())


# ---- the tiny pair ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("logprobs")
    target = build_model_folder(root / "target", seed=21)
    draft = perturbed_copy(target, root / "draft", noise=0.01)                    # agrees often, not always
    with LLM(str(target), str(draft), num_speculative_tokens=3, dtype="float32", kv_cache_memory_gib=0.05) as llm:
        yield llm


def _assert_drafts_were_accepted_and_rejected(outs, k):
    """With a fixed K both branches ran; "auto" may rightly choose K = 0 on a model this small (no assertion)."""
    if isinstance(k, int) and k > 0:
        assert 0 < sum(o.stats.accepted for o in outs) < sum(o.stats.drafted for o in outs)


def _params(sampled: bool, penalized: bool) -> SamplingParams:
    kw = dict(max_tokens=24, ignore_eos=True, logprobs=4, **(PENALTIES if penalized else {}))
    return SamplingParams(temperature=0.8, top_p=0.95, seed=5, **kw) if sampled else SamplingParams(**kw)


@pytest.mark.parametrize("penalized", [False, True], ids=["plain", "penalties"])
@pytest.mark.parametrize("k", [3, "auto"])
def test_greedy_speculative_logprobs_equal_target_only(llm, k, penalized):
    params = _params(sampled=False, penalized=penalized)
    expected = llm.generate(PROMPTS, params, proposer=None)
    outs = llm.generate(PROMPTS, params, num_speculative_tokens=k)
    _assert_drafts_were_accepted_and_rejected(outs, k)
    for out, ref in zip(outs, expected):
        assert out.token_ids == ref.token_ids
        assert_same_logprobs(out.logprobs, ref.logprobs)
    for prompt, ref in zip(PROMPTS, expected):
        assert_logprobs_match(ref, teacher_forced(llm, prompt, ref.token_ids, params), 4)


# Seeded sampling draws other tokens target-only than speculatively, so each run is checked against the target's
# own logprobs of the tokens it emitted (one teacher-forced pass).
@pytest.mark.parametrize("penalized", [False, True], ids=["plain", "penalties"])
@pytest.mark.parametrize("k", [0, 3, "auto"])
def test_sampled_logprobs_equal_the_targets_own_for_the_emitted_tokens(llm, k, penalized):
    params = _params(sampled=True, penalized=penalized)
    outs = llm.generate(PROMPTS, params, num_speculative_tokens=k, proposer=None if k == 0 else "draft")
    _assert_drafts_were_accepted_and_rejected(outs, k)
    for prompt, out in zip(PROMPTS, outs):
        assert_logprobs_match(out, teacher_forced(llm, prompt, out.token_ids, params), 4)


def test_no_logprobs_unless_asked(llm):
    out = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4))[0]
    assert out.logprobs is None and "logprobs" not in out.as_dict()
    asked = llm.generate(PROMPTS[:1], SamplingParams(max_tokens=4, logprobs=0))[0]
    assert len(asked.logprobs) == len(asked.token_ids) and asked.as_dict()["logprobs"][0]["top"] == []
