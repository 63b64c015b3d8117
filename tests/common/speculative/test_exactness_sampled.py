"""Sampled speculative decoding leaves the target distribution unchanged: a statistical test with a control.

Tiny random target and draft models over a 16-token vocabulary. The exact target distribution of the next
three tokens is enumerated from the target model itself (16 + 256 contexts), and 20,000 speculative samples
(seeds 0..19,999, K = 3, batched in one LLM.generate call) are compared with it:
- chi-square goodness of fit on the joint of the next 2 tokens and on the marginal of each of the next 3
  (cells with expected count < 5 pooled), p > 0.001;
- total variation below the 99.9% quantile of the TV that exact sampling itself produces at this N: 4,000
  multinomial draws of size N from the enumerated p give that null distribution (E[TV] is about
  Σ_x sqrt(p_x(1 − p_x) / (2πN)), ~0.011 for 16 cells and ~0.045 for 256 at N = 20,000). An exact sampler
  exceeds it one time in a thousand; a sampler off by a few percent of mass always does;
- every token outside the target's support (top-p zeroes some) must never appear.
The same holds with presence, frequency and repetition penalties on (p then depends on the tokens before each
position: the enumeration penalises each context for its own history).
The negative controls run the same test with a sampler that resamples from |p − q′| instead of max(0, p − q′),
and, with penalties on, with one that penalises every verify row for the committed tokens alone (leaving out
the drafts before it): the test must reject both.
"""
import dataclasses

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from common.engine.model_runner import SequenceChunk
from common.llm import LLM
from common.speculative.rejection import RejectionSampler
from common.speculative.params import SamplingParams
from common.speculative.penalties import TokenHistory, penalized_logits
from common.speculative.sampling import target_distribution
from tests.checkpoints import build_model_folder

V = 16
N = 20_000
PROMPT = [3, 7, 1, 12]
PENALTIES = dict(presence_penalty=1.0, frequency_penalty=0.5, repetition_penalty=1.5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("spec16")
    shape = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    target = build_model_folder(root / "target", seed=11, **shape)
    draft = build_model_folder(root / "draft", seed=12, **shape)
    return str(target), str(draft)


def _exact(llm: LLM, params: SamplingParams):
    """p(x1), p(x2 | x1), p(x3 | x1, x2) enumerated with the target model: [V], [V, V], [V, V, V]."""
    runner = llm.target.runner
    def dist(contexts):
        logits = runner.forward([SequenceChunk(1000 + i, PROMPT + c) for i, c in enumerate(contexts)]).logits
        for i in range(len(contexts)):
            runner.free(1000 + i)
        return torch.cat([target_distribution(row, params, TokenHistory(PROMPT + c, len(PROMPT)))
                          for row, c in zip(logits, contexts)]).double().numpy()
    p1 = dist([[]])[0]
    p2 = dist([[a] for a in range(V)])
    p3 = dist([[a, b] for a in range(V) for b in range(V)]).reshape(V, V, V)
    return p1, p2, p3


def _gof(observed_counts: np.ndarray, expected_p: np.ndarray):
    """(chi-square p-value, TV, TV bound, count outside the support)."""
    obs, p = observed_counts.ravel().astype(float), expected_p.ravel()
    n = obs.sum()
    outside = obs[p == 0].sum()
    support = p > 0
    obs, p = obs[support], p[support]
    big = p * n >= 5
    f_obs = np.append(obs[big], obs[~big].sum())
    f_exp = np.append(p[big] * n, p[~big].sum() * n)
    if f_exp[-1] == 0:
        f_obs, f_exp = f_obs[:-1], f_exp[:-1]
    f_exp *= f_obs.sum() / f_exp.sum()
    pvalue = chisquare(f_obs, f_exp).pvalue
    tv = 0.5 * np.abs(obs / n - p).sum()
    null = np.random.default_rng(0).multinomial(int(n), p / p.sum(), size=4000) / n    # exact sampling, N draws
    tv_bound = float(np.quantile(0.5 * np.abs(null - p).sum(axis=1), 0.999))
    return pvalue, tv, tv_bound, outside


def _samples(llm: LLM, params: SamplingParams) -> np.ndarray:
    per_request = [dataclasses.replace(params, max_tokens=3, seed=s, ignore_eos=True) for s in range(N)]
    outs = llm.generate([PROMPT] * N, per_request)
    return np.array([o.token_ids for o in outs])                    # [N, 3]


def _check(samples: np.ndarray, exact) -> list[tuple[str, float, float, float, float]]:
    p1, p2, p3 = exact
    joint12 = p1[:, None] * p2                                       # [V, V]
    joint123 = joint12[:, :, None] * p3
    tables = {
        "joint(x1,x2)": (np.bincount(samples[:, 0] * V + samples[:, 1], minlength=V * V), joint12),
        "x1": (np.bincount(samples[:, 0], minlength=V), p1),
        "x2": (np.bincount(samples[:, 1], minlength=V), joint12.sum(0)),
        "x3": (np.bincount(samples[:, 2], minlength=V), joint123.sum((0, 1))),
    }
    return [(name, *_gof(obs, p)) for name, (obs, p) in tables.items()]


@pytest.mark.parametrize("params,quantization", [
    (SamplingParams(temperature=1.0), ("none", "none")), (SamplingParams(temperature=1.0, top_p=0.9), ("none", "none")),
    (SamplingParams(temperature=1.0, **PENALTIES), ("none", "none")),
    (SamplingParams(temperature=1.0), ("int4", "int8"))],       # the target served is the quantized one
    ids=["plain", "top_p=0.9", "penalties", "int4-target-int8-draft"])
def test_speculative_samples_match_the_target_distribution(pair, params, quantization):
    target, draft = pair
    with LLM(target, draft, num_speculative_tokens=3, dtype="float32", kv_cache_memory_gib=0.25,
             max_num_seqs=N + 300, quantization=quantization[0], draft_quantization=quantization[1]) as llm:
        exact = _exact(llm, params)
        samples = _samples(llm, params)
        stats = samples.shape
        assert stats == (N, 3)
        # the draft really proposed, and was really rejected sometimes: both branches were exercised
        outs_accept = llm.generate([PROMPT] * 200, [dataclasses.replace(params, max_tokens=3, seed=s, ignore_eos=True)
                                                    for s in range(200)])
        accepted = sum(o.stats.accepted for o in outs_accept)
        drafted = sum(o.stats.drafted for o in outs_accept)
        assert drafted > 0 and 0 < accepted < drafted
    for name, pvalue, tv, bound, outside in _check(samples, exact):
        print(f"top_p={params.top_p} penalized={params.penalized} {name}: chi2 p={pvalue:.4f} TV={tv:.4f} "
              f"(bound {bound:.4f}) outside={outside}")
        assert outside == 0, f"{name}: {outside} samples outside the target's support"
        assert pvalue > 0.001, f"{name}: chi-square p={pvalue}"
        assert tv < bound, f"{name}: TV={tv} >= bound {bound}"


class AbsResidualSampler(RejectionSampler):
    """Deliberately wrong: |p − q′| instead of max(0, p − q′) puts mass where the draft over-proposes."""

    @staticmethod
    def residual(p_i, q_i):
        return (p_i - q_i).abs()


class DraftBlindSampler(RejectionSampler):
    """Deliberately wrong: every verify row is penalised for the committed tokens alone, as if the drafts before
    it had not been emitted (row 0 stays right, so only accepted drafts bias what follows them)."""

    def verify_one(self, x):
        rows = torch.cat([penalized_logits(x.logits[i:i + 1], x.params, x.history) for i in range(len(x.logits))])
        plain = dataclasses.replace(x.params, presence_penalty=0.0, frequency_penalty=0.0, repetition_penalty=1.0)
        return super().verify_one(dataclasses.replace(x, logits=rows, params=plain))


@pytest.mark.parametrize("wrong,params", [(AbsResidualSampler, SamplingParams(temperature=1.0)),
                                          (DraftBlindSampler, SamplingParams(temperature=1.0, **PENALTIES))],
                         ids=["abs-residual", "draft-blind-penalties"])
def test_negative_control_a_wrong_sampler_is_detected(pair, wrong, params):
    target, draft = pair
    with LLM(target, draft, num_speculative_tokens=3, dtype="float32", kv_cache_memory_gib=0.25,
             max_num_seqs=N + 300) as llm:
        exact = _exact(llm, params)
        llm.decoder.sampler = wrong()
        samples = _samples(llm, params)
    results = _check(samples, exact)
    for name, pvalue, tv, bound, _ in results:
        print(f"{wrong.__name__} {name}: chi2 p={pvalue:.2e} TV={tv:.4f} (bound {bound:.4f})")
    joint = results[0]
    assert joint[1] < 0.001 and joint[2] > joint[3], f"the wrong sampler ({wrong.__name__}) was not detected"
