"""Penalties against a plain-Python reference: each verify row's history is the committed tokens plus the drafts
before it; greedy verification follows the penalised argmax; sampling draws from the penalised distribution."""
import pytest
import torch

from common.speculative.params import SamplingParams
from common.speculative.penalties import TokenHistory, penalized_logits
from common.speculative.proposal import DraftProposal
from common.speculative.rejection import RejectionSampler, VerifyInput
from common.speculative.sampling import target_distribution, truncate_distribution
from tests.common.speculative.reference import penalized_row as _reference

V = 12
PENALTIES = [
    dict(repetition_penalty=1.5),
    dict(repetition_penalty=0.7),
    dict(frequency_penalty=0.7),
    dict(presence_penalty=-0.8),
    dict(presence_penalty=1.1, frequency_penalty=0.4, repetition_penalty=1.3),
]


def _case(seed: int, k: int = 4):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(k + 1, V, generator=g) * 3                                 # [K+1, V], both signs
    tokens = torch.randint(0, V, (10,), generator=g).tolist()
    drafts = torch.randint(0, V, (k,), generator=g).tolist()
    return logits, tokens, drafts


@pytest.mark.parametrize("penalty", PENALTIES, ids=lambda p: ",".join(f"{k}={v}" for k, v in p.items()))
@pytest.mark.parametrize("seed", range(4))
def test_each_verify_row_is_penalised_for_its_own_history(penalty, seed):
    logits, tokens, drafts = _case(seed)
    params = SamplingParams(**penalty)
    got = penalized_logits(logits, params, TokenHistory(tokens, 4), drafts)      # [K+1, V]
    for i in range(len(drafts) + 1):                     # row i scores the token after d_1..d_i
        expected = _reference(logits[i].tolist(), params, tokens + drafts[:i], 4)
        assert got[i].tolist() == pytest.approx(expected, abs=1e-5), f"row {i}"


def test_a_draft_step_follows_every_token_drafted_so_far():
    logits, tokens, drafts = _case(7)
    params = SamplingParams(**PENALTIES[-1])
    got = penalized_logits(logits[-1:], params, TokenHistory(tokens, 3), drafts)  # [1, V]
    assert got[0].tolist() == pytest.approx(_reference(logits[-1].tolist(), params, tokens + drafts, 3), abs=1e-5)


def test_no_penalty_costs_nothing_and_a_penalty_needs_the_history():
    logits = torch.randn(3, V)
    assert penalized_logits(logits, SamplingParams(temperature=1.0), None, [1, 2]) is logits
    with pytest.raises(ValueError, match="token history"):
        penalized_logits(logits, SamplingParams(presence_penalty=0.5), None, [1, 2])
    with pytest.raises(ValueError, match="prompt_len=3: must be in \\[0, 2\\]"):
        TokenHistory([1, 2], 3)


def test_greedy_verification_follows_the_penalised_argmax():
    # raw argmax 5, 2, 7 in the three rows; a presence penalty of 2 on what came before flips each row to the
    # runner-up: 2 (5 was output), 7 (2 was drafted just before), 4 (7 was drafted just before)
    logits = torch.zeros(3, V)
    logits[0, 5], logits[0, 2] = 3.0, 2.0
    logits[1, 2], logits[1, 7] = 3.0, 2.5
    logits[2, 7], logits[2, 4] = 3.0, 2.0
    params = SamplingParams(presence_penalty=2.0)
    out = RejectionSampler().verify_one(VerifyInput(logits, DraftProposal([2, 7]), params,
                                                    history=TokenHistory([1, 5], 1)))
    assert out.accepted == [2, 7] and out.next_token == 4 and out.is_bonus
    unpenalized = RejectionSampler().verify_one(VerifyInput(logits, DraftProposal([2, 7]), SamplingParams()))
    assert unpenalized.accepted == [] and unpenalized.next_token == 5


@pytest.mark.parametrize("seed", range(6))
def test_greedy_outcome_equals_the_reference_argmax_chain(seed):
    logits, tokens, _ = _case(seed, k=4)
    params = SamplingParams(**PENALTIES[-1])
    chain = []                                           # the penalised greedy continuation, row by row
    for i in range(4):
        row = _reference(logits[i].tolist(), params, tokens + chain, 2)
        chain.append(max(range(V), key=row.__getitem__))
    drafts = chain[:2] + [(chain[2] + 1) % V, 0]         # two right, then a wrong one
    out = RejectionSampler().verify_one(VerifyInput(logits, DraftProposal(drafts), params,
                                                    history=TokenHistory(tokens, 2)))
    assert out.accepted == chain[:2] and out.next_token == chain[2]


def test_the_sampled_target_distribution_is_the_penalised_softmax():
    logits, tokens, drafts = _case(3)
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9, **PENALTIES[-1])
    got = target_distribution(logits, params, TokenHistory(tokens, 5), drafts)     # [K+1, V]
    rows = torch.tensor([_reference(logits[i].tolist(), params, tokens + drafts[:i], 5) for i in range(5)])
    expected = truncate_distribution(torch.softmax(rows / 0.7, -1), 6, 0.9)
    assert torch.allclose(got, expected, atol=1e-6)
