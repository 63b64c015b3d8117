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


def test_low_acceptance_falls_back_to_plain_decoding_and_probes_within_the_budget():
    costs = _costs(t_draft=0.05)
    ctl = AdaptiveK(8, costs)                                       # no lag given: a probe costs only its round
    choices = []
    for _ in range(400):
        k = ctl.choose()
        choices.append(k)
        ctl.observe(k, 0)                                           # nothing ever accepted
    probes = [i for i, k in enumerate(choices) if k > 0 and i > 10]
    assert choices[-100:].count(0) >= 95                            # plain decoding, with a rare probe
    assert len(probes) >= 3                                         # it keeps looking
    # Once the estimates have settled at ~0, each probe loses (2 drafts + a 3-token verify) - 1 plain step = 0.1 s,
    # and each K = 0 round earns 3% of its 0.1 s: at most one probe per ~33 plain rounds.
    late = choices[200:]
    spent = sum(1 for k in late if k) * (2 * 0.05 + 0.1 - 0.1)
    assert spent <= 0.03 * 0.1 * late.count(0) + 0.1


def test_a_probe_prices_the_catch_up_so_a_long_stretch_at_k0_stops_probing():
    """A probe first feeds the draft every token it missed. Where that costs more per token than the budget earns
    per K = 0 round (3% of a step), probing inside the request stops; a new request, whose draft has only its
    prompt to catch up on, spends the credit instead."""
    costs = _costs(t_draft=0.02, t_verify=0.04)
    costs.t_catchup = 0.0025                                        # 6% of a plain step per missed token
    ctl = AdaptiveK(8, costs, prior=0.3)
    lag, probes = 30, 0
    for _ in range(300):
        k = ctl.choose(lag=lag, remaining=1000)
        if k:
            probes += 1
            ctl.observe(k, 0)
            lag = 1
        else:
            lag += 1
    assert probes <= 1
    assert costs.probe_credit == pytest.approx(4 * 0.04)             # saved up to its cap (4 plain rounds), no more
    assert costs.probe_credit > costs.catchup_cost(20) + 2 * 0.02    # what a short catch-up probe needs
    fresh = AdaptiveK(8, costs, prior=0.3)
    assert fresh.choose(lag=0) == 0                                  # a first round never probes
    assert fresh.choose(lag=20, remaining=100) == 2                  # the next does, on the credit


def test_leaving_k0_repays_the_catch_up_only_over_enough_remaining_tokens():
    costs = _costs(t_draft=0.01, t_verify=0.04)
    costs.t_catchup = 0.002
    ctl = AdaptiveK(8, costs, prior=0.7)
    assert ctl.choose(lag=0, remaining=100) > 0                     # drafting pays at this acceptance
    assert ctl.choose(lag=60, remaining=200) > 0                    # 0.12 s of catch-up spread over 200 tokens
    assert ctl.choose(lag=60, remaining=4) == 0                     # ... but not over 4


def test_the_catch_up_is_priced_per_token_from_what_a_call_took_beyond_its_steps():
    costs = _costs(t_draft=0.02)
    assert costs.catchup_cost(16) == pytest.approx(16 * 0.02 / 8)   # unmeasured: an eighth of a step per token
    costs.observe_catchup(tokens=40, steps=2, compute_s=0.04 + 0.1)
    assert costs.t_catchup == pytest.approx(0.1 / 40)
    assert costs.catchup_cost(10) == pytest.approx(10 * 0.1 / 40)


def test_a_new_request_starts_from_the_acceptance_the_last_ones_showed():
    costs = _costs(t_draft=0.01)
    first = AdaptiveK(8, costs)
    for _ in range(100):
        first.observe(4, 0)                                         # the first request's drafts all rejected
    assert costs.acceptance < 0.2
    assert AdaptiveK(8, costs).pooled == pytest.approx(costs.acceptance)


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


# ---- the verify pass priced by its own length, not a line ----------------------------------------------------
def _measured(curve_s: dict[int, float], t_draft: float, shape=()) -> CostModel:
    c = CostModel(verify_shape=list(shape))
    c.observe_draft(1, t_draft)
    for n, t in curve_s.items():
        c.observe_verify(n, t)
    return c


def _settled(costs: CostModel, acceptance: float) -> int:
    import random
    ctl = AdaptiveK(8, costs)
    rng = random.Random(0)
    for _ in range(300):
        ctl.observe(8, next(i for i in range(9) if i == 8 or rng.random() > acceptance))
    return ctl.choose()


def test_a_kernel_flat_to_four_rows_that_jumps_at_five_drafts_short_of_the_jump():
    # PyTorch's int4 CPU kernel on the 1.5B target (measured, ms): passes of 1..4 tokens cost about one, 5 costs 3.5x.
    # The straight line through these points priced K = 1..3 dearer than they are and settled at K = 0.
    curve = {1: 0.079, 2: 0.082, 3: 0.090, 4: 0.111, 5: 0.282, 9: 0.291}
    costs = _measured(curve, t_draft=0.033)
    assert costs.verify_compute(2) == pytest.approx(0.082) and costs.verify_compute(7) == pytest.approx(0.2865)
    assert 1 <= _settled(costs, acceptance=0.85) <= 3              # K = 2 is best at 85%: 16.5 tokens/s vs 12.7


def test_a_cheap_one_row_path_keeps_plain_decoding_where_drafting_loses():
    # bf16 without avx512_bf16: oneDNN's 1-row path is 2.5x cheaper than 2 rows, which then grow slowly. The line
    # through 1, 3, 5, 9 overpriced K = 0 and chose to draft, at 0.68x of target-only; measured lengths keep K = 0.
    curve = {1: 0.25, 2: 0.64, 3: 0.69, 4: 0.74, 5: 0.79, 9: 0.99}
    costs = _measured(curve, t_draft=0.11)
    assert _settled(costs, acceptance=0.6) == 0
    assert costs.verify_compute(1) == pytest.approx(0.25)


def test_lengths_not_measured_scale_by_the_verifiers_probe_or_interpolate():
    shaped = _measured({1: 0.1}, t_draft=0.01, shape=[1.0, 1.1, 1.2, 3.0])
    assert shaped.verify_compute(4) == pytest.approx(0.3) and shaped.verify_compute(2) == pytest.approx(0.11)
    plain = _measured({1: 0.1, 5: 0.3}, t_draft=0.01)
    assert plain.verify_compute(3) == pytest.approx(0.2)           # between neighbours
    assert plain.verify_compute(7) == pytest.approx(0.4)           # past the last: its slope


def test_lengths_not_run_lately_follow_the_machines_speed_and_keep_their_shape():
    # Calibrated cold at load (1: 38 ms, 5: 52 ms); then only K = 0 rounds run, at 28 ms: a stale 52 ms for 5 tokens
    # would price drafting ~25% dearer than it is and keep K at 0 (measured on the real pair, int4).
    costs = _measured({1: 0.038, 5: 0.052}, t_draft=0.0135)
    for _ in range(40):
        costs.observe_verify(1, 0.028)
    assert costs.verify_compute(1) == pytest.approx(0.028, rel=0.02)
    assert costs.verify_compute(5) == pytest.approx(0.052 * (0.028 / 0.038) ** 0.5, rel=0.1)   # half the drift
    assert costs.verify_compute(5) / costs.verify_compute(1) > 52 / 38         # followed, not snapped to the shape


def test_the_draft_call_after_plain_decoding_rounds_prices_the_catch_up_not_steps():
    from common.speculative.outcome import VerifyOutcome
    from common.speculative.params import SamplingParams
    from common.speculative.request import Request, StopConditions, observe_pass_costs
    costs = _measured({1: 0.03}, t_draft=0.01)
    stop = StopConditions(frozenset(), 4096)
    r = Request([1, 2, 3], SamplingParams(max_tokens=50))
    r.apply(VerifyOutcome([5, 6], 7, 4), stop)                      # a drafting round: the draft saw everything
    assert r.draft_lag == 0
    for token in (8, 9, 10):
        r.apply(VerifyOutcome([], token, 0), stop)                  # three K = 0 rounds the draft did not see
    assert r.draft_lag == 3
    # K = 2 after three K = 0 rounds: the draft also caught up on their tokens (0.05 s for "2 steps")
    observe_pass_costs(costs, [r], draft_steps=2, draft_s=0.05, verify_tokens=3, verify_s=0.03)
    assert costs.t_draft == pytest.approx(0.01)
    assert costs.t_catchup == pytest.approx((0.05 - 2 * 0.01) / 3)
    r.apply(VerifyOutcome([11], 12, 2), stop)                       # the next round follows a drafting one
    assert r.draft_lag == 0
    observe_pass_costs(costs, [r], draft_steps=2, draft_s=0.024, verify_tokens=3, verify_s=0.03)
    assert costs.t_draft == pytest.approx(0.8 * 0.01 + 0.2 * 0.012)


def test_a_first_round_prices_the_drafts_prompt_prefill_over_the_requests_tokens():
    from common.speculative.params import SamplingParams
    from common.speculative.request import Request
    costs = _costs(t_draft=0.01, t_verify=0.04)
    costs.t_catchup = 0.002
    def first_k(prompt_len, max_tokens):
        r = Request(list(range(prompt_len)), SamplingParams(max_tokens=max_tokens),
                    controller=AdaptiveK(8, costs, prior=0.7))
        assert r.draft_lag == prompt_len - 1                      # the draft has seen nothing yet
        return r.choose_k(4096, can_draft=True)
    assert first_k(8, 16) > 0                                      # a short prompt: drafting pays at once
    assert first_k(300, 16) == 0                                   # 0.6 s of draft prefill for 16 tokens: never
    assert first_k(300, 1000) > 0                                  # ... repaid over a long answer
