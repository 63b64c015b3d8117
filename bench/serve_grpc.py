"""`make bench-serve`, gRPC side: an async load generator on the gateway's stubs that keeps `concurrency` streams in
flight and measures a run the way aiperf measures the HTTP door (so the two columns compare like for like):

- TTFT: request sent -> first chunk carrying a token;
- ITL: (request latency - TTFT) / (output tokens - 1), per request (aiperf's definition without per-chunk usage);
- output tokens/s: all output tokens / (last response - first request); requests/s: completed requests / the same;
- errors: requests that ended with a status other than OK.
"""
from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import dataclass

import grpc

from common.rpc.generated.specd.v1 import common_pb2, gateway_pb2, gateway_pb2_grpc


@dataclass(slots=True)
class ServeRequest:
    """One request of a run, the same on both doors: a prompt sent as chat (one user turn) or as a completion."""
    text: str
    chat: bool


@dataclass(slots=True)
class RequestTiming:
    start: float                    # perf_counter seconds
    end: float
    first_token: float | None = None
    output_tokens: int = 0
    error: str | None = None
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0


def generate_request(req: ServeRequest, max_tokens: int, k: int, ignore_eos: bool) -> gateway_pb2.GenerateRequest:
    """Greedy, `k` speculative tokens (-1 auto, 0 off); chat as a `messages` conversation, like the HTTP door's."""
    msg = gateway_pb2.GenerateRequest(max_tokens=max_tokens, sampling=common_pb2.SamplingParams(temperature=0.0),
                                      num_speculative_tokens=k, ignore_eos=ignore_eos)
    if req.chat:
        msg.messages.messages.add(role="user", content=req.text)
    else:
        msg.prompt = req.text
    return msg


async def _one(stub, msg, timeout_s: float) -> RequestTiming:
    t = RequestTiming(start=time.perf_counter(), end=0.0)
    try:
        async for chunk in stub.GenerateStream(msg, timeout=timeout_s):
            if chunk.token_ids and t.first_token is None:
                t.first_token = time.perf_counter()
            t.output_tokens += len(chunk.token_ids)
            if chunk.finish_reason:
                t.drafted, t.accepted, t.rounds = chunk.stats.drafted, chunk.stats.accepted, chunk.stats.rounds
    except grpc.aio.AioRpcError as e:
        t.error = f"{e.code().name}: {e.details()}"
    t.end = time.perf_counter()
    return t


async def run_load(target: str, requests: list[ServeRequest], concurrency: int, max_tokens: int, k: int,
                   ignore_eos: bool = True, timeout_s: float = 600.0) -> list[RequestTiming]:
    """Send `requests` in order, `concurrency` at a time (a new one as soon as one ends), on one channel."""
    queue: asyncio.Queue[ServeRequest] = asyncio.Queue()
    for r in requests:
        queue.put_nowait(r)
    timings: list[RequestTiming] = []
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.GatewayStub(channel)

        async def worker():
            while not queue.empty():
                req = queue.get_nowait()
                timings.append(await _one(stub, generate_request(req, max_tokens, k, ignore_eos), timeout_s))

        await asyncio.gather(*(worker() for _ in range(min(concurrency, len(requests)))))
    return timings


def summarize(timings: list[RequestTiming]) -> dict:
    """The row fields every configuration reports (the aiperf side fills the same ones from its export)."""
    ok = [t for t in timings if t.error is None and t.first_token is not None]
    out = {"requests": len(timings), "errors": len(timings) - len(ok)}
    if not ok:
        return out
    duration = max(t.end for t in ok) - min(t.start for t in timings)
    ttft = [(t.first_token - t.start) * 1e3 for t in ok]
    itl = [(t.end - t.first_token) * 1e3 / (t.output_tokens - 1) for t in ok if t.output_tokens > 1]
    tokens = sum(t.output_tokens for t in ok)
    drafted, accepted, rounds = (sum(getattr(t, f) for t in ok) for f in ("drafted", "accepted", "rounds"))
    out.update({"duration_s": duration, "output_tokens": tokens, "output_tokens_per_s": tokens / duration,
                "requests_per_s": len(ok) / duration, **_spread("ttft_ms", ttft), **_spread("itl_ms", itl),
                "drafted": drafted, "acceptance_rate": accepted / drafted if drafted else None,
                "mean_acceptance_length": 1 + accepted / rounds if rounds else None})
    return out


def _spread(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    return {f"{name}_avg": statistics.fmean(values), f"{name}_p50": statistics.median(values),
            f"{name}_min": min(values), f"{name}_max": max(values)}
