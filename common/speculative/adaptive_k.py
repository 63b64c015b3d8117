"""Adaptive K: pick the number of drafted tokens that maximises expected accepted tokens per second.

With a_i the running probability that draft position i is accepted given that all before it were (an EMA per
position; a position tested fewer than `min_observations` times borrows the pooled per-token EMA, so that
positions a small K never reaches are not stuck at the prior), one round with K drafts emits E(K) = 1 + Σ_{j=1..K} Π_{i≤j} a_i tokens on average (for a constant
α this is (1 − α^(K+1)) / (1 − α)) and costs K·t_draft + t_verify(K). K = 0 is plain decoding.

Leaving K = 0 has a price of its own: the draft has not seen the tokens the K = 0 rounds emitted, so the next drafting
round first feeds them (the catch-up: one prefill pass, measured per token). The controller minimises the seconds per
token over the request's remaining tokens (capped at `horizon`), so the catch-up is spread over the rounds that can
repay it, and near a request's end it is not paid at all. A request's first round prices the draft's prompt prefill
the same way: where drafting barely pays, a short request does not prefill the draft at all (measured on a 2-core
CPU: an int8 draft's first round on a 60-token prompt took 100-280 ms longer than a plain first round, 4-10% of a
64-token request in which drafting then gained nothing).

While K = 0 wins, a short probe round (K = 2) keeps the acceptance estimates fresh; it is paid from a budget shared by
the engine's requests: each K = 0 round earns `probe_budget` (3%) of its cost, and a probe runs once the credit covers
its expected loss (its catch-up, plus its cost beyond the tokens it is expected to emit at K = 0 prices). Probing thus
costs at most 3% of the time spent at K = 0 (by the controller's own estimate of each probe's loss), and the credit
saved up is capped (4 plain rounds' cost), so a long stretch at K = 0 cannot pay for a burst of probes later.
Measured on a 2-core CPU with an int8 draft, a catch-up pass costs 1.5-1.9 ms per missed token beyond its step (48
tokens: 110 ms, one step: 23 ms) against a 37 ms plain target step. At that price the old schedule (a probe after 12,
24, 48… plain rounds, catch-up unpriced) spends ~6-7% of a 64-token request on probes (computed), and K=auto measured
0.92x plain decoding on such a prompt. Where catching up costs more than the budget earns (a long request at K = 0
on such a CPU), probes come at the start of the next requests, where the draft has only a prompt to catch up on.

The verify pass is priced by its own length, t_verify(n) for n = K + 1 tokens, as measured (an EMA per n), never
read off a straight line: real curves are not straight. With avx512_bf16 a pass of 2..8 rows costs about one row;
without it oneDNN's bf16 1-row path is far cheaper than 2 rows (2.5×) and then grows slowly; PyTorch's int4/int8
kernels are flat to 4 rows and jump at 5 (`make bench-kernels`). A line fitted through such points overprices
K = 0 on the first curve (the controller drafts where drafting loses) and overprices K = 1..3 on the last (it never
drafts where drafting wins). A length not measured yet is scaled from the nearest measured one by the verifier's
own load-time probe (`verify_shape`, ModelInfo.pass_cost_ratio) or, without one, interpolated between neighbours.
The machine's speed drifts (warm-up after the calibration, other tenants of a VM) and moves every length alike, so
each measurement also moves the lengths not run lately by half its change: a stretch of K = 0 rounds, which
re-measure only 1-token passes, cannot leave the longer ones priced at a stale speed (measured: calibrated at 38 ms
per 1-token pass, running at 28 ms, a stale 5-token price kept K at 0 where K = 4 gave 1.4x).

Across a network each call also has a fixed cost (round trip, serialization, queueing) that does not grow with K:
the cost model keeps it apart from per-step compute for both hops (the services report their compute time), so
a long round trip to the draft makes K = 0 dearer to leave and longer drafts cheaper per token, instead of
looking like a slow draft step. With pre-drafting (the next round drafted while this one is verified, for the
outcome "all K accepted and the verifier's bonus token is the draft's own guess"), a hit hides the next round's
whole draft call; the controller weighs that by the hit probability Π a_i · g (g: how often the guess matched).
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class CostModel:
    """Measured costs shared by all requests of an engine: one draft step, a verify pass of n tokens, and (across a
    network) the fixed cost of each call to the draft and to the verifier.

    `fixed_call_costs=False` is the model before calls had a fixed part: a draft call's whole time divided by its
    steps, a verify call's whole time on the line. Kept to measure the network-aware model against it.
    `pre_draft`: the driver drafts the next round while this one is verified (the gateway's --pre-draft)."""
    t_draft: float = 0.0                 # seconds per draft forward step
    t_verify_base: float = 0.0           # seconds for a 1-token target pass
    t_verify_per_token: float = 0.0      # extra seconds per additional verified token
    draft_call: float = 0.0              # seconds per draft call beyond its compute: round trip, serialization, queue
    verify_call: float = 0.0             # the same for a verify call
    fixed_call_costs: bool = True
    pre_draft: bool = False
    smoothing: float = 0.2
    max_jump: float = 4.0                # an observation counts as at most this factor off the running estimate
    drift_follow: float = 0.5            # how much of a pass length's change the other lengths follow
    # t(n) / t(1) for passes of n = 1, 2, … tokens, as the verifier measured them at load (ModelInfo.pass_cost_ratio);
    # empty: unknown
    verify_shape: list[float] = field(default_factory=list)
    # Per-token acceptance over every request this engine has served (a slow EMA): a new request's controller starts
    # from it instead of a fixed prior, so it need not relearn from scratch what the last requests showed.
    acceptance: float = 0.6
    t_catchup: float = 0.0               # seconds per token a draft feeds to catch up on tokens it missed; 0: unknown
    probe_budget: float = 0.03           # the share of the time spent at K = 0 that probe rounds may cost
    probe_credit: float = 0.0            # seconds of probing earned by K = 0 rounds and not yet spent
    probe_credit_cap: float = 4.0        # the credit saved up is at most this many plain (K = 0) rounds' cost
    _verify_obs: dict[int, float] = field(default_factory=dict)   # tokens -> EMA seconds

    @property
    def calibrated(self) -> bool:
        return self.t_verify_base > 0

    def observe_draft(self, steps: int, seconds: float, compute_s: float | None = None) -> None:
        """One draft call of `steps` steps that took `seconds` end to end; `compute_s`: what the service reports
        computing (None: in process, all of it is compute)."""
        if steps <= 0:
            return
        if compute_s is None or not self.fixed_call_costs:
            compute_s = seconds
        else:
            self.draft_call = self._ema_abs(self.draft_call, seconds - compute_s)
        self.t_draft = self._ema(self.t_draft, compute_s / steps)

    def observe_catchup(self, tokens: int, steps: int, compute_s: float) -> None:
        """A draft call of `steps` steps that first fed `tokens` tokens it had missed (a request's first call, or the
        first after K = 0 rounds): what it took beyond `steps` steps prices a caught-up token."""
        if tokens <= 0 or self.t_draft <= 0:
            return
        per_token = max(compute_s - steps * self.t_draft, 0.0) / tokens
        self.t_catchup = self._ema(self.t_catchup, max(per_token, 1e-6))

    def catchup_cost(self, tokens: int) -> float:
        """Seconds for the draft to catch up on `tokens` missed tokens (unmeasured: an eighth of a step each, about
        what a prefill pass costs per token on a CPU)."""
        return tokens * (self.t_catchup if self.t_catchup > 0 else self.t_draft / 8)

    def observe_verify(self, num_tokens: int, seconds: float, compute_s: float | None = None) -> None:
        if compute_s is None or not self.fixed_call_costs:
            compute_s = seconds
        else:
            self.verify_call = self._ema_abs(self.verify_call, seconds - compute_s)
        old = self._verify_obs.get(num_tokens, 0.0)
        new = self._ema(old, compute_s)
        if old > 0:
            # The machine's speed drifts (warm-up after the load-time calibration, other tenants): it moves every
            # pass length alike. The lengths not run lately follow half of this one's change, so that a stretch of
            # K = 0 rounds (which re-measure only 1-token passes) cannot leave stale prices on the longer ones.
            follow = 1 + self.drift_follow * (new / old - 1)
            for n in self._verify_obs:
                self._verify_obs[n] *= follow
        self._verify_obs[num_tokens] = new
        self._refit()

    def verify_cost(self, k: int) -> float:
        """Seconds of one verify call of K drafts (+1 token), its fixed call cost included."""
        return self.verify_call + self.verify_compute(k + 1)

    def verify_compute(self, n: int) -> float:
        """Seconds of a target pass of n tokens: measured where it was, else estimated from the nearest measured
        length (scaled by verify_shape when known, else along the line between the neighbours)."""
        obs = self._verify_obs
        if n in obs:
            return obs[n]
        if not obs:
            return self.t_verify_base + (n - 1) * self.t_verify_per_token
        shape = self.verify_shape
        if len(shape) >= n:
            m = min(obs, key=lambda m: (abs(m - n), m))              # nearest measured length the shape covers
            if m <= len(shape) and shape[m - 1] > 0:
                return obs[m] * shape[n - 1] / shape[m - 1]
        below = [m for m in obs if m < n]
        above = [m for m in obs if m > n]
        if below and above:
            lo, hi = max(below), min(above)
            return obs[lo] + (obs[hi] - obs[lo]) * (n - lo) / (hi - lo)
        if above:                                                    # shorter than any measured: never dearer
            return obs[min(above)]
        return obs[max(below)] + (n - max(below)) * self._slope()    # longer than any measured: the last slope

    def _slope(self) -> float:
        pts = sorted(self._verify_obs.items())
        if len(pts) < 2:
            return self.t_verify_per_token
        (n0, t0), (n1, t1) = pts[-2], pts[-1]
        return max(0.0, (t1 - t0) / (n1 - n0))

    def draft_cost(self, k: int) -> float:
        """Seconds of one draft call of K steps (0: no call)."""
        return self.draft_call + k * self.t_draft if k else 0.0

    def round_cost(self, k: int, hit: float = 0.0) -> float:
        """Expected seconds of a round with K drafts. `hit`: the probability that the round's proposal was already
        pre-drafted. A pre-draft (K + 1 steps: the guessed bonus token, then K drafts) runs beside the verify call;
        whatever of it outlasts the verify call delays the next round, hit or miss (the draft is busy)."""
        if not (self.pre_draft and k):
            return self.draft_cost(k) + self.verify_cost(k)
        return (1 - hit) * self.draft_cost(k) + self.verify_cost(k) + self.pre_draft_overrun(k)

    def pre_draft_overrun(self, k: int) -> float:
        """How long a pre-draft after a round of K drafts (K + 1 steps) outlasts that round's verify call."""
        return max(0.0, self.draft_call + (k + 1) * self.t_draft - self.verify_cost(k))

    def _ema_abs(self, old: float, new: float) -> float:
        """EMA of a quantity that may legitimately be ~0 (a loopback round trip): no relative clamp."""
        new = max(0.0, new)
        return new if old == 0.0 else (1 - self.smoothing) * old + self.smoothing * new

    def _ema(self, old: float, new: float) -> float:
        if old == 0.0:
            return new
        # One stalled measurement (a GC pause, a preempted process) must not lock the controller into K = 0:
        # K = 0 rounds never re-measure the draft, so an outlier would decay only once per probe round.
        new = min(max(new, old / self.max_jump), old * self.max_jump)
        return (1 - self.smoothing) * old + self.smoothing * new

    def _refit(self) -> None:
        # A summary for the metrics (specd_cost_model_seconds) and the calibrated flag; prices come from
        # verify_compute. Least squares line through (tokens, seconds); slope clamped >= 0.
        pts = sorted(self._verify_obs.items())
        if len(pts) == 1:
            (n, t), = pts
            self.t_verify_base = t if n <= 1 else max(self.t_verify_base, t * 0.9)
            return
        mx = sum(n for n, _ in pts) / len(pts)
        my = sum(t for _, t in pts) / len(pts)
        var = sum((n - mx) ** 2 for n, _ in pts)
        slope = max(0.0, sum((n - mx) * (t - my) for n, t in pts) / var) if var else 0.0
        self.t_verify_per_token = slope
        self.t_verify_base = max(1e-6, my - slope * (mx - 1))


def expected_tokens(acceptance: list[float], k: int) -> float:
    """E(K) = 1 + Σ_{j=1..K} Π_{i≤j} a_i."""
    total, run = 1.0, 1.0
    for i in range(k):
        run *= acceptance[i]
        total += run
    return total


class AdaptiveK:
    """One request's K controller. While K = 0 wins, a probe round of K = 2 keeps the acceptance estimates fresh,
    paid from the engine's probe credit (CostModel.probe_budget; the module docstring says why)."""

    def __init__(self, k_max: int, costs: CostModel, prior: float | None = None, smoothing: float = 0.25,
                 horizon: int = 256):
        if not 0 <= k_max <= 32:
            raise ValueError(f"k_max={k_max}: must be in [0, 32]")
        if horizon < 1:
            raise ValueError(f"horizon={horizon}: must be >= 1")
        prior = costs.acceptance if prior is None else prior
        self.k_max = k_max
        self.costs = costs
        self.per_position = [prior] * k_max
        self.observations = [0] * k_max
        self.pooled = prior                  # per-token acceptance over every tested position
        self.min_observations = 4
        self.smoothing = smoothing
        self.horizon = horizon               # most tokens a catch-up is spread over
        self._rounds_at_zero = 0
        self.guess_match = prior             # P(the verifier's bonus token == the draft's guess | all K accepted)
        self.guess_observations = 0

    def hit_probability(self, k: int) -> float:
        """P(a pre-draft for K drafts is used): all K accepted and the bonus token guessed."""
        p = self.guess_match
        for a in self.acceptance[:k]:
            p *= a
        return p

    def should_pre_draft(self, k: int) -> bool:
        """Pre-draft after a round of K drafts when the draft call a hit saves outweighs the pre-draft's overrun of
        the verify call (which delays the next round hit or miss)."""
        c = self.costs
        if not c.calibrated or k == 0:
            return k > 0
        return self.hit_probability(k) * c.draft_cost(k) > c.pre_draft_overrun(k)

    def observe_guess(self, matched: bool) -> None:
        """A round whose K drafts were all accepted, pre-drafted with a guessed bonus token: was it right?"""
        self.guess_match = (1 - self.smoothing) * self.guess_match + self.smoothing * float(matched)
        self.guess_observations += 1

    @property
    def acceptance(self) -> list[float]:
        """a_1..a_kmax as the controller uses them."""
        return [a if n >= self.min_observations else self.pooled
                for a, n in zip(self.per_position, self.observations)]

    def choose(self, limit: int | None = None, lag: int = 0, remaining: int | None = None) -> int:
        """K for the next round, at most `limit`. `lag`: tokens the draft has not seen (the catch-up a drafting round
        pays first); `remaining`: tokens the request may still emit (None: unknown, `horizon`)."""
        k_cap = self.k_max if limit is None else max(0, min(self.k_max, limit))
        if k_cap == 0:
            return 0
        c = self.costs
        if not c.calibrated:
            return min(k_cap, 4)
        acceptance = self.acceptance
        horizon = max(1, min(self.horizon, remaining if remaining is not None else self.horizon))
        catchup = c.catchup_cost(lag)
        t0 = c.round_cost(0)
        best_k, best_per_token = 0, t0              # seconds per emitted token over the horizon
        for k in range(1, k_cap + 1):
            per_token = c.round_cost(k, self.hit_probability(k)) / expected_tokens(acceptance, k) + catchup / horizon
            if per_token * 1.0001 < best_per_token:
                best_k, best_per_token = k, per_token
        if best_k:
            self._rounds_at_zero = 0
            return best_k
        if self._rounds_at_zero:                    # a probe follows a K = 0 round (never a request's first round)
            probe = min(2, k_cap)
            loss = max(0.0, catchup + c.round_cost(probe) - expected_tokens(acceptance, probe) * t0)
            if c.probe_credit >= loss:
                c.probe_credit -= loss
                self._rounds_at_zero = 0
                return probe
        self._rounds_at_zero += 1
        c.probe_credit = min(c.probe_credit + c.probe_budget * t0, c.probe_credit_cap * t0)
        return 0

    def observe(self, k: int, num_accepted: int) -> None:
        """Position i < n was accepted; position n (if < K) was rejected; later ones were never tested."""
        a = self.smoothing
        for i in range(min(k, num_accepted + 1)):
            hit = 1.0 if i < num_accepted else 0.0
            self.per_position[i] = (1 - a) * self.per_position[i] + a * hit
            self.observations[i] += 1
            self.pooled = (1 - a / 2) * self.pooled + (a / 2) * hit
            self.costs.acceptance = (1 - a / 8) * self.costs.acceptance + (a / 8) * hit
