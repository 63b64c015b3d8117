"""One generation as both doors (gRPC and the OpenAI-compatible HTTP) ask for it: the prompt checked and tokenized
once, n completions run as rounds side by side, their progress handed out as events (torch-free).

The doors only convert: a door turns its request into a `GenerationSpec` with the helpers here, iterates
`Generator.stream` and turns `ChoiceEvent`s into its own replies. Everything that must be the same on both doors
lives here once: the prompt limits, the chat template, K per request, seeds of the n completions, the request
metrics (outcome, in-flight, time to first token, inter-token and end-to-end latency).
"""
from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

import grpc
from opentelemetry import trace

from common.errors import SequenceTooLongError
from common.rpc.errors import status_for
from common.speculative.adaptive_k import AdaptiveK
from common.speculative.outcome import TokenLogprob
from common.speculative.params import SamplingParams
from common.speculative.request import Request
from common.telemetry import metrics
from common.tokenizer import encode_prompt
from common.validation import check_token_ids
from gateway.rounds import RoundRunner
from gateway.text import IncrementalText

K_AUTO = -1
MAX_N = 16                      # completions per request
CHAT_ROLES = ("system", "user", "assistant")
# Text longer than this many characters per token of the context limit cannot fit it: refused before the tokenizer
# spends time on it (a 16 MiB prompt would otherwise be tokenized only to be refused for its token count).
PROMPT_CHARS_PER_TOKEN = 32
_SEED_MOD = 2**63


@dataclass(slots=True)
class GenerationSpec:
    """A validated request: what to continue, how, with which K, how many times."""
    prompt_ids: list[int]
    params: SamplingParams
    k: int | str                # "auto" or a fixed K in [0, k_max]
    n: int = 1


@dataclass(slots=True)
class ChoiceEvent:
    """What one round added to completion `index`; `request` is that completion's state (output, stats)."""
    index: int
    request: Request
    text: str                               # text that can no longer change (stop strings cut off)
    token_ids: list[int]
    logprobs: list[TokenLogprob]            # aligned with token_ids; empty unless logprobs were asked for

    @property
    def finished(self) -> bool:
        return self.request.finished


def completion_params(params: SamplingParams, index: int) -> SamplingParams:
    """The sampling parameters of completion `index`: with a seed, completion i draws from seed + i (mod 2^63), so
    the n completions are independent and each is reproducible."""
    if params.seed is None or index == 0:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % _SEED_MOD)


class Generator:
    def __init__(self, rounds: RoundRunner, tokenizer, k_default: int | str, k_max: int, vocab_size: int, *,
                 tenant_prefix_cache: bool = True):
        """`tenant_prefix_cache`: each API key gets its own prefix-cache namespace (its key id; without keys there
        is only the shared one)."""
        self.rounds = rounds
        self.tokenizer = tokenizer
        self.k_default = k_default
        self.k_max = k_max
        self.vocab_size = vocab_size            # the model's embedding rows (Qwen: 151936 > the tokenizer's)
        self.tenant_prefix_cache = tenant_prefix_cache

    @property
    def max_model_len(self) -> int:
        return self.rounds.max_model_len

    # ---- the prompt, in each of its forms -------------------------------------------------------------------
    def encode_text(self, field: str, text: str, chat: bool = False) -> list[int]:
        """A text prompt's ids (`chat`: as one user turn through the chat template)."""
        if not text.strip():
            raise ValueError(f"{field}: empty or whitespace only")
        self._check_chars(field, len(text))
        return self._check_fits(field, encode_prompt(self.tokenizer, text, chat))

    def encode_messages(self, field: str, messages: Sequence[dict]) -> list[int]:
        """A conversation's ids, rendered through the model's own chat template with the generation prompt.
        Each message is {"role": system|user|assistant, "content": str}."""
        if not messages:
            raise ValueError(f"{field}: at least one message is needed")
        for i, m in enumerate(messages):
            if m.get("role") not in CHAT_ROLES:
                raise ValueError(f"{field}[{i}].role: {m.get('role')!r} is not one of {', '.join(CHAT_ROLES)}")
            if not isinstance(m.get("content"), str):
                raise ValueError(f"{field}[{i}].content: must be a string")
        self._check_chars(field, sum(len(m["content"]) for m in messages))
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{field}: the served model has no chat template; send a plain prompt instead")
        ids = self.tokenizer.apply_chat_template([{"role": m["role"], "content": m["content"]} for m in messages],
                                                 add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        return self._check_fits(field, list(ids))

    def check_ids(self, field: str, ids: Sequence[int]) -> list[int]:
        ids = list(ids)
        if not ids:
            raise ValueError(f"{field}: empty")
        check_token_ids(field, ids, self.vocab_size)
        return self._check_fits(field, ids)

    def _check_chars(self, field: str, chars: int) -> None:
        max_chars = PROMPT_CHARS_PER_TOKEN * self.max_model_len
        if chars > max_chars:
            raise SequenceTooLongError(f"{field}: {chars} characters, must be <= {max_chars} "
                                       f"({PROMPT_CHARS_PER_TOKEN} per token of the {self.max_model_len}-token "
                                       "context limit)")

    def _check_fits(self, field: str, ids: list[int]) -> list[int]:
        if len(ids) >= self.max_model_len:
            raise SequenceTooLongError(f"{field}: {len(ids)} tokens, must be < the context limit of "
                                       f"{self.max_model_len} tokens")
        return ids

    # ---- the rest of the request ----------------------------------------------------------------------------
    def spec(self, prompt_ids: list[int], params: SamplingParams, k: int | None = None, n: int = 1) -> GenerationSpec:
        """`k`: the request's num_speculative_tokens (-1 auto, 0 off, 1..k_max; None: the gateway's default)."""
        if not (isinstance(n, int) and 1 <= n <= MAX_N):
            raise ValueError(f"n={n}: must be an integer in [1, {MAX_N}]")
        return GenerationSpec(prompt_ids, params, self._k(k), n)

    def _k(self, k: int | None) -> int | str:
        if k is None:
            return self.k_default
        if k == K_AUTO:
            return "auto"
        if not (isinstance(k, int) and 0 <= k <= self.k_max):
            raise ValueError(f"num_speculative_tokens={k}: must be -1 (auto) or in [0, {self.k_max}]")
        return k

    def num_speculative_tokens(self, spec: GenerationSpec) -> int:
        """The K setting of a request as the API spells it (-1 auto)."""
        return K_AUTO if spec.k == "auto" else spec.k

    # ---- running it -----------------------------------------------------------------------------------------
    async def stream(self, spec: GenerationSpec, namespace: str | None = None) -> AsyncIterator[ChoiceEvent]:
        """Run the n completions; yield each round's progress as it comes (completions interleaved). Closing the
        iterator stops every completion and releases its verifier session at once. `namespace`: the caller's
        prefix-cache tenant (None: the current API key's id, or the shared namespace)."""
        from gateway.auth import current_key_id
        if namespace is None:
            namespace = current_key_id() if self.tenant_prefix_cache else ""
        started = time.perf_counter()
        clock = _TokenClock(started)
        metrics.REQUESTS_IN_FLIGHT.inc()
        requests: list[Request] = []
        try:
            requests = [self._request(spec, i) for i in range(spec.n)]
            base = uuid.uuid4().hex
            events = (self._choice(0, requests[0], base, namespace) if spec.n == 1
                      else self._merged(requests, base, namespace))
            async with contextlib.aclosing(events) as events:
                async for event in events:
                    if event.token_ids:
                        clock.tick()
                    yield event
            metrics.REQUESTS.labels("OK").inc()
            metrics.observe_request_latency(clock.first_token_s, time.perf_counter() - started)
            _annotate_span(requests)
        except (asyncio.CancelledError, GeneratorExit):
            metrics.REQUESTS.labels("CANCELLED").inc()      # the client went away
            raise
        except Exception as e:  # noqa: BLE001
            metrics.REQUESTS.labels(outcome_label(e)).inc()
            raise
        finally:
            metrics.REQUESTS_IN_FLIGHT.dec()

    def _request(self, spec: GenerationSpec, index: int) -> Request:
        controller = AdaptiveK(self.k_max, self.rounds.costs) if spec.k == "auto" else None
        return Request(list(spec.prompt_ids), completion_params(spec.params, index), controller=controller,
                       fixed_k=0 if spec.k == "auto" else spec.k)

    async def _choice(self, index: int, r: Request, base_id: str, namespace: str) -> AsyncIterator[ChoiceEvent]:
        text = IncrementalText(self.tokenizer, r.params.stop)
        want_logprobs = r.params.logprobs is not None
        async with contextlib.aclosing(self.rounds.run(r, f"{base_id}-{index}", namespace)) as rounds:
            async for appended in rounds:
                lps = r.output_logprobs[len(r.output_logprobs) - len(appended):] if want_logprobs else []
                yield ChoiceEvent(index, r, text.delta(r.output_ids, r.finished), appended, lps)

    async def _merged(self, requests: list[Request], base_id: str, namespace: str) -> AsyncIterator[ChoiceEvent]:
        """The n completions' events as they come; the first failure stops them all."""
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(index: int, r: Request) -> None:
            try:
                async with contextlib.aclosing(self._choice(index, r, base_id, namespace)) as events:
                    async for event in events:
                        queue.put_nowait(event)
                queue.put_nowait(done)
            except Exception as e:  # noqa: BLE001 - handed to the consumer, which raises it
                queue.put_nowait(e)

        tasks = [asyncio.create_task(pump(i, r)) for i, r in enumerate(requests)]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is done:
                    remaining -= 1
                elif isinstance(item, Exception):
                    raise item
                else:
                    yield item
        finally:
            for t in tasks:
                t.cancel()                                  # each one's rounds release their session
            await asyncio.gather(*tasks, return_exceptions=True)


class _TokenClock:
    """Time to the first token, and the gap before every later delivery of tokens (inter-token latency)."""
    __slots__ = ("started", "last", "first_token_s")

    def __init__(self, started: float):
        self.started = started
        self.last: float | None = None
        self.first_token_s: float | None = None

    def tick(self) -> None:
        now = time.perf_counter()
        if self.last is None:
            self.first_token_s = now - self.started
        else:
            metrics.observe_inter_token(now - self.last)
        self.last = now


def outcome_label(e: BaseException) -> str:
    """The `status` label a failed request is counted under: the gRPC status either door answers with."""
    if isinstance(e, grpc.aio.AioRpcError):
        code = e.code()
        return "UNAVAILABLE" if code is grpc.StatusCode.DEADLINE_EXCEEDED else code.name
    return status_for(e).name


def _annotate_span(requests: list[Request]) -> None:
    span = trace.get_current_span()
    if not span.is_recording():
        return
    stats = [r.stats for r in requests]
    span.set_attributes({"specd.prompt_tokens": len(requests[0].prompt_ids), "specd.n": len(requests),
                         "specd.output_tokens": sum(len(r.output_ids) for r in requests),
                         "specd.rounds": sum(s.rounds for s in stats), "specd.drafted": sum(s.drafted for s in stats),
                         "specd.accepted": sum(s.accepted for s in stats),
                         "specd.finish_reason": requests[0].finish_reason or "length"})
