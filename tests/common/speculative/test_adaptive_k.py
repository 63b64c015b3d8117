"""Adaptive K follows acceptance and cost: long drafts when they pay, plain decoding when they don't."""
import pytest

from common.speculative.adaptive_k import AdaptiveK, CostModel, expected_tokens


def _costs(t_draft, t_verify=0.1, per_token=0.0):
    c = CostModel()
    c.observe_draft(1, t_draft)
    c.observe_verify(1, t_verify)
    c.observe_verify(9, t_verify + 8 * per_token)
    return c


def test_expected_tokens_is_the_geometric_series():
    alpha = 0.7
    assert expected_tokens([alpha] * 8, 4) == pytest.approx((1 - alpha ** 5) / (1 - alpha))
    assert expected_tokens([0.5] * 8, 0) == 1


def test_high_acceptance_and_cheap_draft_choose_long_drafts():
    ctl = AdaptiveK(8, _costs(t_draft=0.01))
    for _ in range(30):
        ctl.observe(ctl.choose(), num_accepted=ctl.choose())      # everything accepted
    assert ctl.choose() == 8


def test_low_acceptance_falls_back_to_plain_decoding_and_probes():
    ctl = AdaptiveK(8, _costs(t_draft=0.05))
    for _ in range(40):
        k = ctl.choose()
        ctl.observe(k, 0)                                           # nothing ever accepted
    choices = [ctl.choose() for _ in range(24)]
    assert choices.count(0) >= 20 and any(k > 0 for k in choices)   # mostly K=0, with an occasional probe


def test_untested_positions_borrow_pooled_acceptance():
    ctl = AdaptiveK(8, _costs(t_draft=0.02))
    for _ in range(20):
        ctl.observe(1, 1)                                           # only position 1 ever tested, always accepted
    assert ctl.acceptance[5] > 0.9 and ctl.choose() >= 4


def test_expensive_verify_tokens_shorten_drafts():
    import random
    cheap = AdaptiveK(8, _costs(t_draft=0.01, per_token=0.0))
    dear = AdaptiveK(8, _costs(t_draft=0.01, per_token=0.05))
    rng = random.Random(0)
    for _ in range(200):                                            # i.i.d. 85% per-token acceptance
        n = next(i for i in range(9) if i == 8 or rng.random() > 0.85)
        for ctl in (cheap, dear):
            ctl.observe(8, n)
    assert dear.choose() < cheap.choose()


def test_limit_caps_k():
    ctl = AdaptiveK(8, _costs(t_draft=0.001))
    assert ctl.choose(limit=2) <= 2 and ctl.choose(limit=0) == 0


def test_one_stalled_measurement_does_not_lock_k_at_zero():
    costs = _costs(t_draft=0.01)
    ctl = AdaptiveK(8, costs)
    for _ in range(20):
        ctl.observe(4, 4)
    before = ctl.choose()
    costs.observe_draft(1, 100.0)                                   # the process was stopped for 100 s
    assert costs.t_draft < 0.02 and ctl.choose() >= before - 1
