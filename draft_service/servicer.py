"""DraftService over gRPC: convert, run the Drafter off the event loop, convert back."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

from common.rpc.convert import dists_to_pb, sampling_from_pb
from common.rpc.errors import abort_with
from common.rpc.generated.specd.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from draft_service.drafter import Drafter


class DraftServicer(draft_pb2_grpc.DraftServiceServicer):
    def __init__(self, drafter: Drafter, info: common_pb2.ModelInfo):
        self.drafter = drafter
        self.info = info
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="drafter")   # the model's one thread

    async def Propose(self, request, context):
        try:
            params = sampling_from_pb(request.sampling if request.HasField("sampling") else None)
            proposal, cached, seconds = await asyncio.get_running_loop().run_in_executor(
                self._pool, self.drafter.propose, request.request_id, list(request.context_token_ids),
                request.k, params, request.round)
        except Exception as e:  # noqa: BLE001 - every failure becomes a status with a message
            await abort_with(context, e)
        return draft_pb2.ProposeReply(token_ids=proposal.token_ids, dists=dists_to_pb(proposal),
                                      cached_tokens=cached, compute_ms=seconds * 1000)

    async def Info(self, request, context):
        return self.info
