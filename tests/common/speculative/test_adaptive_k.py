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


# ---- across a network: fixed call costs apart from per-step compute -----------------------------------------
def _remote_costs(rtt: float, t_draft: float, t_verify: float, per_token: float, *, fixed: bool = True,
                  pre_draft: bool = False, k: int = 4) -> CostModel:
    """Costs as the gateway observes them: each call's wall time is its compute plus one round trip."""
    c = CostModel(fixed_call_costs=fixed, pre_draft=pre_draft)
    for _ in range(10):
        c.observe_draft(k, rtt + k * t_draft, compute_s=k * t_draft)
        c.observe_verify(1, rtt + t_verify, compute_s=t_verify)
        c.observe_verify(k + 1, rtt + t_verify + k * per_token, compute_s=t_verify + k * per_token)
    return c


def test_the_round_trip_is_a_fixed_cost_per_call_not_per_step():
    c = _remote_costs(rtt=0.05, t_draft=0.01, t_verify=0.1, per_token=0.005)
    assert c.t_draft == pytest.approx(0.01) and c.draft_call == pytest.approx(0.05)
    assert c.verify_call == pytest.approx(0.05) and c.t_verify_base == pytest.approx(0.1)
    assert c.round_cost(4) == pytest.approx(0.05 + 0.04 + 0.05 + 0.1 + 4 * 0.005)
    assert c.round_cost(0) == pytest.approx(0.05 + 0.1)               # plain decoding calls the verifier only
    legacy = _remote_costs(rtt=0.05, t_draft=0.01, t_verify=0.1, per_token=0.005, fixed=False)
    assert legacy.t_draft == pytest.approx((0.05 + 0.04) / 4)          # the old model: RTT spread over the steps


def test_a_long_draft_round_trip_lengthens_drafts_where_the_per_step_model_shortens_them():
    # A draft call that costs 50 ms of network whatever its K: the per-step model, having seen it at K = 2, prices
    # every step at 25 ms + compute and stops at short drafts; the network-aware one amortises the call.
    import random

    def chosen(fixed: bool) -> int:
        ctl = AdaptiveK(8, _remote_costs(rtt=0.05, t_draft=0.005, t_verify=0.05, per_token=0.002, fixed=fixed, k=2))
        rng = random.Random(0)
        for _ in range(200):                                        # i.i.d. 75% per-token acceptance
            ctl.observe(8, next(i for i in range(9) if i == 8 or rng.random() > 0.75))
        return ctl.choose()
    assert chosen(fixed=True) > chosen(fixed=False)


def test_pre_drafting_favours_the_k_whose_outcome_is_likely_and_its_hits_hide_the_draft_call():
    c = _remote_costs(rtt=0.02, t_draft=0.02, t_verify=0.2, per_token=0.01, pre_draft=True)
    full = c.round_cost(4, hit=0.0)
    assert c.round_cost(4, hit=1.0) == pytest.approx(full - c.draft_cost(4))
    # A pre-draft of K + 1 steps longer than the verify call delays the next round by the difference, hit or miss.
    slow = _remote_costs(rtt=0.0, t_draft=0.1, t_verify=0.1, per_token=0.0, pre_draft=True)
    assert slow.round_cost(2, hit=1.0) == pytest.approx(slow.verify_cost(2) + 3 * 0.1 - 0.1)


def test_guess_matches_raise_the_hit_probability():
    ctl = AdaptiveK(4, CostModel(pre_draft=True))
    for _ in range(30):
        ctl.observe(4, 4)
    before = ctl.hit_probability(4)
    for _ in range(20):
        ctl.observe_guess(True)
    assert ctl.hit_probability(4) > before
    for _ in range(40):
        ctl.observe_guess(False)
    assert ctl.hit_probability(4) < 0.05
