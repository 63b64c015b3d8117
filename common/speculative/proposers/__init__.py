"""What every proposer receives and must return; one verb: `propose`.

`ProposeInput` is the engine's view of one sequence to draft for; its wire form is the `ProposeRequest` protobuf
message, which the draft service converts at its edge.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from common.speculative.params import SamplingParams
from common.speculative.proposal import DraftProposal


@dataclass(slots=True)
class ProposeInput:
    seq_id: int
    context: list[int]             # every committed token of the sequence (prompt + output so far)
    k: int                         # tokens to propose, >= 1
    params: SamplingParams
    round_index: int = 0
    cache_namespace: str = ""      # prefix-cache tenant of the sequence ("" = shared)
    prompt_len: int = 0            # how many of `context` are the prompt (penalties count the output after it)
    guess_next: bool = False       # pre-draft: append the proposer's own most likely next token first, then draft


class Proposer(Protocol):
    def propose(self, requests: list[ProposeInput]) -> list[DraftProposal]: ...

    def release(self, seq_id: int) -> None: ...
