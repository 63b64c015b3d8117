"""VerifierService over gRPC: convert messages, delegate to the VerifierEngine, convert back."""
from __future__ import annotations

import asyncio

from opentelemetry import context as otel_context
from opentelemetry import trace

from common.rpc.convert import logprobs_to_pb, proposal_from_pb, sampling_from_pb
from common.rpc.errors import abort_with
from common.rpc.generated.specd.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from verifier_service.engine import VerifierEngine, VerifyCall
from verifier_service.sessions import VerifyResult


def _reply(r: VerifyResult) -> verifier_pb2.VerifyReply:
    return verifier_pb2.VerifyReply(accepted_token_ids=r.accepted, next_token_id=r.next_token, is_bonus=r.is_bonus,
                                    rollback=verifier_pb2.KvRollback(truncate_to=r.truncate_to, round=r.round),
                                    batch_size=r.batch_size, compute_ms=r.compute_ms,
                                    queue_ms=r.queue_ms, cached_tokens=r.cached_tokens,
                                    logprobs=logprobs_to_pb(r.logprobs or []))


class VerifierServicer(verifier_pb2_grpc.VerifierServiceServicer):
    def __init__(self, engine: VerifierEngine, info: common_pb2.ModelInfo, draining=lambda: False):
        """`draining()`: True while the service drains (the gateway then routes no new session here)."""
        self.engine = engine
        self.info = info
        self.draining = draining

    async def Verify(self, request, context):
        """One round, or a (re-)prefill: a new session's Verify carries every committed token and maybe no drafts.

        The engine's `submit` checks the input (the edge for in-process callers too); nothing is checked twice."""
        try:
            call = VerifyCall(request.session_id, request.round, request.committed_len, list(request.new_tokens),
                              proposal_from_pb(request.draft_token_ids, request.draft_dists),
                              sampling_from_pb(request.sampling if request.HasField("sampling") else None),
                              request.cache_namespace, request.prompt_len)
            call.trace_context = otel_context.get_current()     # the engine thread's spans join this RPC's trace
            fut = self.engine.submit(call)
            try:
                result = await asyncio.wrap_future(fut)
            except asyncio.CancelledError:
                self.engine.abandon(fut)        # the caller left: a call waiting for KV blocks stops holding its place
                raise
        except Exception as e:  # noqa: BLE001 - every failure becomes a status with a message
            await abort_with(context, e)
        span = trace.get_current_span()
        if span.is_recording():
            span.set_attributes({"specd.session": call.session_id, "specd.round": call.round,
                                 "specd.new_tokens": len(call.new_tokens), "specd.k": call.proposal.k,
                                 "specd.accepted": len(result.accepted), "specd.batch_size": result.batch_size,
                                 "specd.cached_tokens": result.cached_tokens, "specd.queue_ms": result.queue_ms,
                                 "specd.compute_ms": result.compute_ms})
        return _reply(result)

    async def Release(self, request, context):
        try:
            released = await asyncio.get_running_loop().run_in_executor(None, self.engine.release,
                                                                        request.session_id)
        except Exception as e:  # noqa: BLE001 - e.g. the engine is shutting down: UNAVAILABLE, not UNKNOWN
            await abort_with(context, e)
        return verifier_pb2.ReleaseReply(released=released)

    async def Info(self, request, context):
        return self.info

    async def Load(self, request, context):
        return verifier_pb2.LoadReply(**self.engine.load(), draining=self.draining())
