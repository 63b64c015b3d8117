"""What every proposer receives and must return; one verb: `propose`."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.speculative.proposal import DraftProposal
from common.speculative.params import SamplingParams


@dataclass(slots=True)
class ProposeRequest:
    seq_id: int
    context: list[int]             # every committed token of the sequence (prompt + output so far)
    k: int                         # tokens to propose, >= 1
    params: SamplingParams
    round_index: int = 0


class Proposer(Protocol):
    def propose(self, requests: list[ProposeRequest]) -> list[DraftProposal]: ...

    def release(self, seq_id: int) -> None: ...
