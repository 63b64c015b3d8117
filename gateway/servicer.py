"""Gateway over gRPC: validate and convert the request, run its rounds, return or stream the result."""
from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
from opentelemetry import trace

from common.rpc.convert import sampling_from_pb
from common.rpc.errors import abort_with, status_for
from common.rpc.generated.specd.v1 import gateway_pb2, gateway_pb2_grpc
from common.speculative.adaptive_k import AdaptiveK
from common.speculative.request import Request
from common.telemetry import metrics
from common.tokenizer import encode_prompt
from common.validation import check_token_ids
from gateway.auth import current_key_id
from gateway.rounds import RoundRunner
from gateway.text import IncrementalText

K_AUTO = -1
# Text longer than this many characters per token of the context limit cannot fit it: refused before the tokenizer
# spends time on it (a 16 MiB prompt would otherwise be tokenized only to be refused for its token count).
PROMPT_CHARS_PER_TOKEN = 32


class GatewayServicer(gateway_pb2_grpc.GatewayServicer):
    def __init__(self, rounds: RoundRunner, tokenizer, k_default: int | str, k_max: int, vocab_size: int, *,
                 tenant_prefix_cache: bool = True, report_cached_tokens: bool = True):
        """`tenant_prefix_cache`: each API key gets its own prefix-cache namespace (its key id; without keys there
        is only the shared one); `report_cached_tokens`: SpecStats.prefix_cached_tokens is returned, else 0 (the
        count tells a caller whether someone sharing its namespace sent the same prefix)."""
        self.rounds = rounds
        self.tenant_prefix_cache = tenant_prefix_cache
        self.report_cached_tokens = report_cached_tokens
        self.tokenizer = tokenizer
        self.k_default = k_default
        self.k_max = k_max
        self.vocab_size = vocab_size            # the model's embedding rows (Qwen: 151936 > the tokenizer's)

    # ---- request -> engine ----------------------------------------------------------------------------
    def _build(self, req: gateway_pb2.GenerateRequest) -> Request:
        which = req.WhichOneof("input")
        if which is None:
            raise ValueError("prompt: missing (set prompt or prompt_token_ids)")
        if which == "prompt":
            if not req.prompt.strip():
                raise ValueError("prompt: empty or whitespace only")
            max_chars = PROMPT_CHARS_PER_TOKEN * self.rounds.max_model_len
            if len(req.prompt) > max_chars:
                raise ValueError(f"prompt: {len(req.prompt)} characters, must be <= {max_chars} "
                                 f"({PROMPT_CHARS_PER_TOKEN} per token of the {self.rounds.max_model_len}-token "
                                 "context limit)")
            ids = encode_prompt(self.tokenizer, req.prompt, req.use_chat_template)
        else:
            ids = list(req.prompt_token_ids.ids)
            check_token_ids("prompt_token_ids", ids, self.vocab_size)
        limit = self.rounds.max_model_len
        if len(ids) >= limit:
            raise ValueError(f"prompt: {len(ids)} tokens, must be < the context limit of {limit} tokens")
        max_tokens = req.max_tokens if req.max_tokens else 128
        params = sampling_from_pb(req.sampling if req.HasField("sampling") else None, max_tokens=max_tokens,
                                  stop=list(req.stop), ignore_eos=req.ignore_eos)
        k = self._k(req)
        controller = AdaptiveK(self.k_max, self.rounds.costs) if k == "auto" else None
        return Request(ids, params, controller=controller, fixed_k=0 if k == "auto" else k)

    def _k(self, req) -> int | str:
        if not req.HasField("num_speculative_tokens"):
            return self.k_default
        k = req.num_speculative_tokens
        if k == K_AUTO:
            return "auto"
        if not 0 <= k <= self.k_max:
            raise ValueError(f"num_speculative_tokens={k}: must be -1 (auto) or in [0, {self.k_max}]")
        return k

    def _stats(self, r: Request, started: float) -> gateway_pb2.SpecStats:
        s = r.stats
        return gateway_pb2.SpecStats(
            rounds=s.rounds, drafted=s.drafted, accepted=s.accepted, acceptance_rate=s.acceptance_rate,
            mean_acceptance_length=s.mean_acceptance_length, accepted_per_position=s.accepted_per_position,
            fallback_rounds=s.fallback_rounds, draft_ms=s.draft_s * 1000, verify_ms=s.verify_s * 1000,
            total_ms=(time.perf_counter() - started) * 1000, max_verify_batch_size=s.max_verify_batch_size,
            draft_compute_ms=s.draft_compute_s * 1000, verify_compute_ms=s.verify_compute_s * 1000,
            wire_bytes=s.wire_bytes, queue_ms=s.queue_s * 1000,
            prefix_cached_tokens=s.prefix_cached_tokens if self.report_cached_tokens else 0)

    # ---- RPCs -----------------------------------------------------------------------------------------
    async def Generate(self, request, context):
        started = time.perf_counter()
        async with contextlib.aclosing(self._rounds(request, context)) as rounds:
            async for r, text, _ in rounds:
                text.delta(r.output_ids, r.finished)    # decoded as it comes: the reply needs no full decode
        return gateway_pb2.GenerateReply(text=text.full_text(r.output_ids), token_ids=r.output_ids,
                                         finish_reason=r.finish_reason or "length", prompt_tokens=len(r.prompt_ids),
                                         stats=self._stats(r, started))

    async def GenerateStream(self, request, context):
        started = time.perf_counter()
        # Closed here, not whenever the generator is collected: a client that goes away while a chunk is being
        # sent still has its verifier session released at once.
        async with contextlib.aclosing(self._rounds(request, context)) as rounds:
            async for r, text, appended in rounds:
                chunk = gateway_pb2.GenerateChunk(text=text.delta(r.output_ids, r.finished), token_ids=appended)
                if r.finished:
                    chunk.finish_reason = r.finish_reason
                    chunk.stats.CopyFrom(self._stats(r, started))
                yield chunk

    async def _rounds(self, request, context) -> AsyncIterator[tuple[Request, IncrementalText, list[int]]]:
        """Build the request and run its rounds, yielding after each; a failure aborts the RPC with its status,
        and every outcome (finished, failed, cancelled) is counted once."""
        self._track(context)
        try:
            r = self._build(request)
            text = IncrementalText(self.tokenizer, r.params.stop)
            namespace = current_key_id() if self.tenant_prefix_cache else ""
            async with contextlib.aclosing(self.rounds.run(r, uuid.uuid4().hex, namespace)) as rounds:
                async for appended in rounds:
                    if r.finished:
                        self._finished(r)
                    yield r, text, appended
        except Exception as e:  # noqa: BLE001
            await self._fail(context, e)
        except (asyncio.CancelledError, GeneratorExit):
            metrics.REQUESTS.labels("CANCELLED").inc()      # the client went away
            raise

    @staticmethod
    def _track(context) -> None:
        """Count the request as open until its RPC ends on the wire (finished, failed or cancelled)."""
        metrics.REQUESTS_IN_FLIGHT.inc()
        context.add_done_callback(lambda _: metrics.REQUESTS_IN_FLIGHT.dec())

    @staticmethod
    def _finished(r: Request) -> None:
        metrics.REQUESTS.labels("OK").inc()
        span = trace.get_current_span()
        if span.is_recording():
            s = r.stats
            span.set_attributes({"specd.prompt_tokens": len(r.prompt_ids), "specd.output_tokens": len(r.output_ids),
                                 "specd.rounds": s.rounds, "specd.drafted": s.drafted, "specd.accepted": s.accepted,
                                 "specd.finish_reason": r.finish_reason or "length"})

    @staticmethod
    async def _fail(context, e: Exception):
        if isinstance(e, grpc.aio.AioRpcError):             # a downstream service's status, passed on
            code = e.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                metrics.REQUESTS.labels("UNAVAILABLE").inc()
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"verifier unavailable ({code.name}: "
                                    f"{e.details()}): the request was stopped; retry it")
            metrics.REQUESTS.labels(code.name).inc()
            await context.abort(code, e.details() or code.name)
        metrics.REQUESTS.labels(status_for(e).name).inc()
        await abort_with(context, e)
