"""One request's speculative statistics and timings: the single per-request metrics record (torch-free).

Both drivers of rounds fill it (the in-process decoder and the gateway); the gateway's service-only fields
(compute and queue time reported by the services, bytes on the wire, fallback rounds) stay 0 in process.
Its wire form is the `SpecStats` protobuf message.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestStats:
    rounds: int = 0
    drafted: int = 0
    accepted: int = 0
    accepted_per_position: list[int] = field(default_factory=list)
    drafted_per_position: list[int] = field(default_factory=list)
    k_chosen: list[int] = field(default_factory=list)          # drafts verified per round
    per_round_accepted: list[int] = field(default_factory=list)
    # wall time the request spent waiting on drafting / verification (in process: its batch's passes)
    draft_s: float = 0.0
    verify_s: float = 0.0
    # services only: what the draft and verifier reported, and what crossed the wire
    draft_compute_s: float = 0.0
    verify_compute_s: float = 0.0
    queue_s: float = 0.0
    wire_bytes: int = 0
    fallback_rounds: int = 0            # rounds decoded with K = 0 because the draft failed or was too slow
    max_verify_batch_size: int = 0
    prefix_cached_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def acceptance_histogram(self) -> list[int]:
        """Rounds by accepted drafts: [i] = rounds that accepted i (vLLM's per-request acceptance histogram)."""
        hist = [0] * (max(self.per_round_accepted, default=0) + 1)
        for n in self.per_round_accepted:
            hist[n] += 1
        return hist if self.rounds else []

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verify round: 1 + accepted / rounds."""
        return 1 + self.accepted / self.rounds if self.rounds else 0.0

    def record(self, k: int, num_accepted: int) -> None:
        self.rounds += 1
        self.drafted += k
        self.accepted += num_accepted
        self.k_chosen.append(k)
        self.per_round_accepted.append(num_accepted)
        while len(self.drafted_per_position) < k:
            self.drafted_per_position.append(0)
            self.accepted_per_position.append(0)
        for i in range(k):
            self.drafted_per_position[i] += 1
            self.accepted_per_position[i] += i < num_accepted

    def add_rpc(self, *, draft: bool, wall_s: float, compute_ms: float, queue_ms: float, wire_bytes: int) -> None:
        """One call to the draft service (`draft`) or the verifier: the gateway's wall time, and the compute and
        queue time the service reported for it."""
        if draft:
            self.draft_s += wall_s
            self.draft_compute_s += compute_ms / 1000
        else:
            self.verify_s += wall_s
            self.verify_compute_s += compute_ms / 1000
        self.queue_s += queue_ms / 1000
        self.wire_bytes += wire_bytes

    def as_dict(self) -> dict:
        return {"rounds": self.rounds, "drafted": self.drafted, "accepted": self.accepted,
                "acceptance_rate": round(self.acceptance_rate, 4),
                "mean_acceptance_length": round(self.mean_acceptance_length, 4),
                "accepted_per_position": list(self.accepted_per_position),
                "drafted_per_position": list(self.drafted_per_position),
                "draft_time_s": round(self.draft_s, 4), "verify_time_s": round(self.verify_s, 4)}
