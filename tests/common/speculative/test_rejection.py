"""Forced outcomes of the rejection sampler: logits built so that the answer is known."""
import torch

from common.speculative.proposal import DraftProposal, SparseDistribution
from common.speculative.rejection import RejectionSampler, VerifyInput
from common.speculative.params import SamplingParams

V = 10
GREEDY = SamplingParams(temperature=0)


def _logits_with_argmax(tokens):
    logits = torch.zeros(len(tokens), V)
    for row, t in enumerate(tokens):
        logits[row, t] = 5.0
    return logits                                                   # [len(tokens), V]


def test_greedy_acceptance_stops_exactly_at_the_first_mismatch():
    target = [3, 1, 4, 1, 5]                                          # argmax at positions 1..4 and the bonus
    drafts = [3, 1, 7, 1]                                             # third draft is wrong
    out = RejectionSampler().verify_one(VerifyInput(_logits_with_argmax(target), DraftProposal(drafts), GREEDY))
    assert out.accepted == [3, 1] and out.next_token == 4 and not out.is_bonus
    assert out.emitted == [3, 1, 4]


def test_greedy_all_accepted_gives_the_bonus_token():
    target = [2, 2, 9]
    out = RejectionSampler().verify_one(VerifyInput(_logits_with_argmax(target), DraftProposal([2, 2]), GREEDY))
    assert out.accepted == [2, 2] and out.is_bonus and out.next_token == 9


def test_k_zero_emits_exactly_one_token():
    out = RejectionSampler().verify_one(VerifyInput(_logits_with_argmax([6]), DraftProposal([]), GREEDY))
    assert out.emitted == [6] and out.num_drafted == 0


def test_first_draft_rejected_emits_only_the_recovered_token():
    out = RejectionSampler().verify_one(VerifyInput(_logits_with_argmax([0, 1, 2]), DraftProposal([5, 1]), GREEDY))
    assert out.accepted == [] and out.emitted == [0]


def _point(t):
    return SparseDistribution([t], [1.0])


def test_sampled_draft_with_zero_target_probability_is_always_rejected_and_never_recovered():
    logits = torch.full((2, V), -1e9)
    logits[:, :3] = 0.0                                              # p is uniform over {0, 1, 2}
    params = SamplingParams(temperature=1.0, seed=0)
    for seed in range(200):
        params.seed = seed
        out = RejectionSampler().verify_one(VerifyInput(logits, DraftProposal([7], [_point(7)]), params))
        assert out.accepted == [] and out.next_token in (0, 1, 2)


def test_sampled_draft_equal_to_target_is_always_accepted():
    logits = torch.zeros(3, V)
    params = SamplingParams(temperature=1.0, seed=3)
    uniform = SparseDistribution(list(range(V)), [1 / V] * V)        # q′ == p: min(1, p/q′) = 1
    for seed in range(100):
        params.seed = seed
        out = RejectionSampler().verify_one(VerifyInput(logits, DraftProposal([4, 8], [uniform, uniform]), params))
        assert out.accepted == [4, 8] and out.is_bonus


def test_recovered_token_comes_from_the_residual():
    # p = (0.5, 0.5, 0, ...), q′ = point mass on 0: residual max(0, p − q′) is all on token 1
    logits = torch.full((2, V), -1e9)
    logits[:, :2] = 0.0
    params = SamplingParams(temperature=1.0)
    outcomes = set()
    for seed in range(200):
        params.seed = seed
        out = RejectionSampler().verify_one(VerifyInput(logits, DraftProposal([0], [_point(0)]), params))
        outcomes.add((tuple(out.accepted), out.next_token if not out.is_bonus else "bonus"))
    rejected = {o for o in outcomes if o[0] == ()}
    assert rejected == {((), 1)}                                     # rejections always recover token 1
    assert any(o[0] == (0,) for o in outcomes)                       # and about half the time 0 is accepted


def test_seeded_verification_is_reproducible():
    logits = torch.randn(4, V, generator=torch.Generator().manual_seed(0))
    q = SparseDistribution(list(range(V)), [1 / V] * V)
    make = lambda: RejectionSampler().verify_one(VerifyInput(logits, DraftProposal([1, 2, 3], [q, q, q]),
                                                             SamplingParams(temperature=1.0, seed=42), 7, 100))
    assert make().emitted == make().emitted
