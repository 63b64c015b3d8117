"""protobuf <-> engine dataclasses; every field the engine validates keeps its name in error messages."""
from __future__ import annotations

from common.rpc.generated.specd.v1 import common_pb2
from common.speculative.outcome import TokenLogprob
from common.speculative.proposal import DraftProposal, SparseDistribution
from common.speculative.params import SamplingParams


def sampling_from_pb(pb: common_pb2.SamplingParams | None, max_tokens: int = 1, stop=(),
                     ignore_eos: bool = False) -> SamplingParams:
    if pb is None:
        return SamplingParams(max_tokens=max_tokens, stop=list(stop), ignore_eos=ignore_eos)
    top_p = pb.top_p if pb.top_p != 0 else 1.0          # proto3 default 0 = unset = off
    repetition = pb.repetition_penalty if pb.repetition_penalty != 0 else 1.0
    return SamplingParams(temperature=float(pb.temperature), top_p=float(top_p), top_k=int(pb.top_k),
                          min_p=float(pb.min_p), max_tokens=max_tokens, stop=list(stop),
                          seed=int(pb.seed) if pb.HasField("seed") else None, ignore_eos=ignore_eos,
                          presence_penalty=float(pb.presence_penalty), frequency_penalty=float(pb.frequency_penalty),
                          repetition_penalty=float(repetition),
                          logprobs=int(pb.logprobs) if pb.HasField("logprobs") else None)


def sampling_to_pb(p: SamplingParams) -> common_pb2.SamplingParams:
    pb = common_pb2.SamplingParams(temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p,
                                   presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                                   repetition_penalty=p.repetition_penalty)
    if p.seed is not None:
        pb.seed = p.seed
    if p.logprobs is not None:
        pb.logprobs = p.logprobs
    return pb


def logprobs_to_pb(items: list[TokenLogprob]) -> list[common_pb2.TokenLogprobs]:
    return [common_pb2.TokenLogprobs(token_id=t.token_id, logprob=t.logprob, top_token_ids=[i for i, _ in t.top],
                                     top_logprobs=[lp for _, lp in t.top]) for t in items]


def logprobs_from_pb(items) -> list[TokenLogprob]:
    return [TokenLogprob(int(t.token_id), float(t.logprob), list(zip(t.top_token_ids, t.top_logprobs)))
            for t in items]


def proposal_from_pb(token_ids, dists) -> DraftProposal:
    return DraftProposal(list(token_ids), [SparseDistribution(list(d.token_ids), list(d.probs)) for d in dists]
                         if len(dists) else None)


def dists_to_pb(proposal: DraftProposal) -> list[common_pb2.SparseDistribution]:
    return [common_pb2.SparseDistribution(token_ids=d.token_ids, probs=d.probs) for d in proposal.dists or []]
