"""What the RoundRunner tests share: a runner over the fake stubs, requests, a consumer, and clock and cost spies."""
import asyncio
import contextlib
import time
import types

import grpc
from prometheus_client import REGISTRY

from common.speculative.adaptive_k import CostModel
from common.speculative.params import SamplingParams
from common.speculative.request import Request
from gateway import draft_link, rounds
from gateway.rounds import RoundRunner, RoundSettings
from tests.gateway.fake_stubs import FINGERPRINT, FakeVerifier

PROMPT = [10, 11, 12, 13]
SETTINGS = RoundSettings(draft_timeout_s=0.25, verify_timeout_s=0.5, draft_retry_s=10.0)
Code = grpc.StatusCode


def runner(verifier, draft, eos=(), costs=None, max_model_len=256, verifier_k_max=None,
           pre_draft=False) -> RoundRunner:
    return RoundRunner(verifier, draft, frozenset(eos), max_model_len, SETTINGS, costs or CostModel(),
                       fingerprint=FINGERPRINT, verifier_k_max=verifier_k_max, pre_draft=pre_draft)


def request(max_tokens=12, k=3, prompt=PROMPT, **sampling) -> Request:
    return Request(list(prompt), SamplingParams(max_tokens=max_tokens, **sampling), fixed_k=k)


def collect(run: RoundRunner, r: Request, between=None) -> list[list[int]]:
    """Every chunk `run` yields for `r`; `between(r)` runs after each chunk, before the next round."""
    async def consume():
        chunks = []
        async with contextlib.aclosing(run.run(r, "rid")) as gen:
            async for chunk in gen:
                chunks.append(chunk)
                if between is not None:
                    between(r)
        return chunks
    return asyncio.run(consume())


def drafts_per_round(verifier: FakeVerifier) -> list[int]:
    return [len(req.draft_token_ids) for req, _ in verifier.answered]


def fallback_metric() -> float:
    return REGISTRY.get_sample_value("specd_fallback_rounds_total") or 0.0


class FakeClock:
    """time.monotonic for gateway.rounds and its DraftLink only (asyncio keeps the real one)."""
    def __init__(self, monkeypatch, now=100.0):
        self.now = now
        fake = types.SimpleNamespace(monotonic=lambda: self.now, perf_counter=time.perf_counter)
        for module in (rounds, draft_link):
            monkeypatch.setattr(module, "time", fake)


class CostSpy(CostModel):
    """Records what the runner feeds the shared cost model."""
    def __init__(self):
        super().__init__()
        self.drafts, self.verifies, self.catchups = [], [], []

    def observe_catchup(self, tokens, steps, compute_s):
        self.catchups.append(tokens)
        super().observe_catchup(tokens, steps, compute_s)

    def observe_draft(self, steps, seconds, compute_s=None):
        self.drafts.append(steps)
        super().observe_draft(steps, seconds, compute_s)

    def observe_verify(self, num_tokens, seconds, compute_s=None):
        self.verifies.append(num_tokens)
        super().observe_verify(num_tokens, seconds, compute_s)
