"""Gateway over gRPC: convert the request, run it (gateway/generation.py), return or stream the result."""
from __future__ import annotations

import contextlib
import time

import grpc

from common.rpc.convert import logprobs_to_pb, sampling_from_pb
from common.rpc.errors import abort_with
from common.rpc.generated.specd.v1 import gateway_pb2, gateway_pb2_grpc
from common.speculative.request import Request
from common.telemetry import metrics
from gateway.generation import GenerationSpec, Generator, outcome_label


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, generator: Generator, *, report_cached_tokens: bool = True):
        """`report_cached_tokens`: SpecStats.prefix_cached_tokens is returned, else 0 (the count tells a caller
        whether someone sharing its namespace sent the same prefix)."""
        self.generator = generator
        self.report_cached_tokens = report_cached_tokens

    # ---- request -> spec ------------------------------------------------------------------------------------
    def _spec(self, req: gateway_pb2.GenerateRequest) -> GenerationSpec:
        g = self.generator
        which = req.WhichOneof("input")
        if which is None:
            raise ValueError("prompt: missing (set prompt, prompt_token_ids or messages)")
        if which == "prompt":
            ids = g.encode_text("prompt", req.prompt, req.use_chat_template)
        elif which == "messages":
            ids = g.encode_messages("messages", [{"role": m.role, "content": m.content}
                                                 for m in req.messages.messages])
        else:
            ids = g.check_ids("prompt_token_ids", req.prompt_token_ids.ids)
        params = sampling_from_pb(req.sampling if req.HasField("sampling") else None,
                                  max_tokens=req.max_tokens or 128, stop=list(req.stop), ignore_eos=req.ignore_eos)
        k = req.num_speculative_tokens if req.HasField("num_speculative_tokens") else None
        return g.spec(ids, params, k, req.n or 1)

    async def _spec_or_abort(self, request, context) -> GenerationSpec:
        try:
            return self._spec(request)
        except Exception as e:  # noqa: BLE001 - refused before it ran: counted here, the rest by the generator
            metrics.REQUESTS.labels(outcome_label(e)).inc()
            await _abort(context, e)

    def stats(self, r: Request, started: float) -> gateway_pb2.SpecStats:
        s = r.stats
        return gateway_pb2.SpecStats(
            rounds=s.rounds, drafted=s.drafted, accepted=s.accepted, acceptance_rate=s.acceptance_rate,
            mean_acceptance_length=s.mean_acceptance_length, accepted_per_position=s.accepted_per_position,
            fallback_rounds=s.fallback_rounds, draft_ms=s.draft_s * 1000, verify_ms=s.verify_s * 1000,
            total_ms=(time.perf_counter() - started) * 1000, max_verify_batch_size=s.max_verify_batch_size,
            draft_compute_ms=s.draft_compute_s * 1000, verify_compute_ms=s.verify_compute_s * 1000,
            wire_bytes=s.wire_bytes, queue_ms=s.queue_s * 1000,
            prefix_cached_tokens=s.prefix_cached_tokens if self.report_cached_tokens else 0,
            acceptance_histogram=s.acceptance_histogram)

    # ---- RPCs -----------------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        started = time.perf_counter()
        texts: dict[int, list[str]] = {}
        finals: dict[int, Request] = {}
        spec = await self._spec_or_abort(request, context)
        try:
            async with contextlib.aclosing(self.generator.stream(spec)) as events:
                async for ev in events:
                    texts.setdefault(ev.index, []).append(ev.text)
                    finals[ev.index] = ev.request
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)
        choices = [self._completion(i, finals[i], "".join(texts[i]), started) for i in range(spec.n)]
        first = choices[0]
        return gateway_pb2.GenerateReply(text=first.text, token_ids=first.token_ids, finish_reason=first.finish_reason,
                                         prompt_tokens=len(spec.prompt_ids), stats=first.stats,
                                         logprobs=first.logprobs, choices=choices if spec.n > 1 else [first])

    def _completion(self, index: int, r: Request, text: str, started: float) -> gateway_pb2.Completion:
        return gateway_pb2.Completion(index=index, text=text, token_ids=r.output_ids,
                                      finish_reason=r.finish_reason or "length", stats=self.stats(r, started),
                                      logprobs=logprobs_to_pb(r.output_logprobs))

    async def GenerateStream(self, request, context):
        started = time.perf_counter()
        spec = await self._spec_or_abort(request, context)
        try:
            # Closed here, not whenever the generator is collected: a client that goes away while a chunk is
            # being sent still has its verifier sessions released at once.
            async with contextlib.aclosing(self.generator.stream(spec)) as events:
                async for ev in events:
                    chunk = gateway_pb2.GenerateChunk(text=ev.text, token_ids=ev.token_ids, index=ev.index,
                                                      logprobs=logprobs_to_pb(ev.logprobs))
                    if ev.finished:
                        chunk.finish_reason = ev.request.finish_reason
                        chunk.stats.CopyFrom(self.stats(ev.request, started))
                    yield chunk
        except Exception as e:  # noqa: BLE001
            await _abort(context, e)


async def _abort(context, e: Exception):
    if isinstance(e, grpc.aio.AioRpcError):             # a downstream service's status, passed on
        code = e.code()
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"verifier unavailable ({code.name}: "
                                f"{e.details()}): the request was stopped; retry it")
        await context.abort(code, e.details() or code.name)
    await abort_with(context, e)
