"""DraftService over gRPC: convert, hand the call to the Drafter's batching thread, convert back."""
from __future__ import annotations

import asyncio

from opentelemetry import trace

from common.rpc.convert import dists_to_pb, sampling_from_pb
from common.rpc.errors import abort_with
from common.rpc.generated.specd.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from draft_service.drafter import Drafter


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, drafter: Drafter, info: common_pb2.ModelInfo):
        self.drafter = drafter
        self.info = info

    async def Propose(self, request, context):
        try:
            params = sampling_from_pb(request.sampling if request.HasField("sampling") else None)
            result = await asyncio.wrap_future(self.drafter.submit(
                request.request_id, list(request.context_token_ids), request.k, params, request.round,
                request.cache_namespace, request.prompt_len, request.guess_next))
        except Exception as e:  # noqa: BLE001 - every failure becomes a status with a message
            await abort_with(context, e)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({"specd.round": request.round, "specd.k": request.k,
                                 "specd.pre_draft": request.guess_next,
                                 "specd.context_tokens": len(request.context_token_ids),
                                 "specd.cached_tokens": result.cached_tokens, "specd.batch_size": result.batch_size,
                                 "specd.queue_ms": result.queue_s * 1000, "specd.compute_ms": result.compute_s * 1000})
        return draft_pb2.ProposeReply(token_ids=result.proposal.token_ids, dists=dists_to_pb(result.proposal),
                                      cached_tokens=result.cached_tokens, compute_ms=result.compute_s * 1000,
                                      queue_ms=result.queue_s * 1000, batch_size=result.batch_size,
                                      guessed_token_id=result.proposal.guessed_token_id)

    async def Info(self, request, context):
        return self.info
