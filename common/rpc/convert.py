"""protobuf <-> engine dataclasses; every field the engine validates keeps its name in error messages."""
from __future__ import annotations

from common.rpc.generated.specd.v1 import common_pb2
from common.speculative.proposal import DraftProposal, SparseDistribution
from common.speculative.params import SamplingParams


def sampling_from_pb(pb: common_pb2.SamplingParams | None, max_tokens: int = 1, stop=(),
                     ignore_eos: bool = False) -> SamplingParams:
    if pb is None:
        return SamplingParams(max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos)
    top_p = pb.top_p if pb.top_p != 0 else 1.0          # proto3 default 0 = unset = off
    return SamplingParams(temperature=float(pb.temperature), top_p=float(top_p), top_k=int(pb.top_k),
                          min_p=float(pb.min_p), max_tokens=max_tokens, stop=list(stop),
                          seed=int(pb.seed) if pb.HasField("seed") else None, ignore_eos=ignore_eos)


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p)
    if p.seed is not None:
        pb.seed = p.seed
    return pb


def proposal_from_pb(token_ids, dists) -> DraftProposal:
    return DraftProposal(list(token_ids), [SparseDistribution(list(d.token_ids), list(d.probs)) for d in dists]
                         if len(dists) else None)


def dists_to_pb(proposal: DraftProposal) -> list[common_pb2.SparseDistribution]:
    return [common_pb2.SparseDistribution(token_ids=d.token_ids, probs=d.probs) for d in proposal.dists or []]
