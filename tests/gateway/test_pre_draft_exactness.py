"""Pre-drafting keeps sampled speculation exact and seeded requests reproducible: the gateway's round loop with
pre-drafting on, over the real draft and verifier servicers and engines (tiny models, in process, no network).

The χ² / TV test of tests/common/speculative/test_exactness_sampled.py, on the same 16-token models: 20,000 seeded
requests of 4 tokens at K = 1, so a request's third token comes from round 1, which is pre-drafted whenever round 0's
draft was accepted and its bonus token guessed (about one request in ten on these flat random models; the test asks
for one in twenty at least). The negative control runs the same pipeline with a wrong sampler
in the verifier: the test must reject it.
"""
import asyncio
import dataclasses

import grpc
import numpy as np
import pytest
from prometheus_client import REGISTRY

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.engine.tp_executor import TPExecutor
from common.llm import LLM
from common.rpc.generated.specd.v1 import common_pb2
from common.speculative.adaptive_k import CostModel
from common.speculative.params import SamplingParams
from common.speculative.request import Request
from draft_service.drafter import Drafter
from draft_service.servicer import DraftServicer
from gateway.rounds import RoundRunner, RoundSettings
from tests.checkpoints import build_model_folder, perturbed_copy
from tests.common.speculative.test_exactness_sampled import (N, PENALTIES, PROMPT, V, AbsResidualSampler, _check,
                                                              _exact)
from verifier_service.engine import VerifierEngine
from verifier_service.servicer import VerifierServicer

CONCURRENCY = 128                 # each request has up to two draft calls queued: within the drafter's queue


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """The exactness test's 16-token target, and a draft close to it (its weights plus noise): with two unrelated
    models nearly every draft is rejected and no pre-draft is ever used, so the test would prove nothing."""
    root = tmp_path_factory.mktemp("pre16")
    shape = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    target = build_model_folder(root / "target", seed=11, **shape)
    draft = perturbed_copy(target, root / "draft", noise=0.02, seed=12)
    return str(target), str(draft)


@pytest.fixture(scope="module")
def far_draft(tmp_path_factory):
    """An unrelated draft for the negative control: a wrong residual only shows where drafts are rejected."""
    shape = dict(vocab_size=V, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1)
    return str(build_model_folder(tmp_path_factory.mktemp("far16") / "draft", seed=12, **shape))


class _Context:
    """The part of a grpc.aio servicer context the servicers use: abort raises what the client would see."""

    async def abort(self, code, details="", trailing_metadata=()):
        raise grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(*trailing_metadata), details)

    def set_trailing_metadata(self, metadata):
        pass


class InProcessStub:
    """A grpc.aio stub's surface over a servicer: `await stub.Method(request, timeout=...)`."""

    def __init__(self, servicer):
        self.servicer = servicer

    def __getattr__(self, name):
        method = getattr(self.servicer, name)
        return lambda request, timeout=None: method(request, _Context())


class Services:
    """The tiny pair's draft and verifier engines behind their servicers, and a RoundRunner over them."""

    def __init__(self, target: str, draft: str, pre_draft: bool):
        self.executor = TPExecutor(EngineConfig(model=target, dtype="float32", num_kv_blocks=4096,
                                                max_num_seqs=CONCURRENCY + 8))
        self.engine = VerifierEngine(self.executor, k_max=4, max_sessions=CONCURRENCY + 8, max_batch=64)
        runner = ModelRunner(EngineConfig(model=draft, dtype="float32", num_kv_blocks=4096,
                                          max_num_seqs=CONCURRENCY + 9))
        self.drafter = Drafter(runner, k_max=4, max_cached_sequences=CONCURRENCY + 8)
        info = common_pb2.ModelInfo(vocab_fingerprint="fp", k_max=4, max_model_len=runner.max_model_len)
        self.rounds = RoundRunner(InProcessStub(VerifierServicer(self.engine, info)),
                                  InProcessStub(DraftServicer(self.drafter, info)), frozenset(),
                                  runner.max_model_len, RoundSettings(draft_timeout_s=60, verify_timeout_s=60),
                                  CostModel(), fingerprint="fp", verifier_k_max=4, pre_draft=pre_draft)

    def generate(self, params: list[SamplingParams], k: int, prompt=PROMPT) -> list[list[int]]:
        async def main():
            gate = asyncio.Semaphore(CONCURRENCY)

            async def one(i: int, p: SamplingParams) -> list[int]:
                async with gate:
                    r = Request(list(prompt), p, fixed_k=k)
                    async for _ in self.rounds.run(r, f"req-{i}"):
                        pass
                    return r.output_ids
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(params)))
        return asyncio.run(main())

    def close(self):
        self.drafter.shutdown()
        self.engine.shutdown()
        self.executor.shutdown()


def _hits() -> float:
    return REGISTRY.get_sample_value("specd_pre_drafts_total", {"outcome": "hit"}) or 0.0


def _seeded(params: SamplingParams, n: int, max_tokens: int) -> list[SamplingParams]:
    return [dataclasses.replace(params, max_tokens=max_tokens, seed=s, ignore_eos=True) for s in range(n)]


def _exact_of(target: str, params: SamplingParams):
    with LLM(target, dtype="float32", kv_cache_memory_gib=0.05) as llm:
        return _exact(llm, params)


@pytest.mark.parametrize("params", [SamplingParams(temperature=1.0), SamplingParams(temperature=1.0, **PENALTIES)],
                         ids=["plain", "penalties"])
def test_sampled_output_with_pre_drafting_matches_the_target_distribution(pair, params):
    target, draft = pair
    exact = _exact_of(target, params)
    services = Services(target, draft, pre_draft=True)
    try:
        hits = _hits()
        outs = services.generate(_seeded(params, N, max_tokens=4), k=1)
        hit_rounds = _hits() - hits
    finally:
        services.close()
    samples = np.array([o[:3] for o in outs])                             # [N, 3]
    assert samples.shape == (N, 3)
    assert hit_rounds > N / 20, f"only {hit_rounds} pre-drafted rounds were used: the test would prove little"
    for name, pvalue, tv, bound, outside in _check(samples, exact):
        print(f"pre-draft penalized={params.penalized} {name}: chi2 p={pvalue:.4f} TV={tv:.4f} (bound {bound:.4f}) "
              f"outside={outside}; {hit_rounds:.0f} pre-drafted rounds used")
        assert outside == 0 and pvalue > 0.001 and tv < bound, name


def test_negative_control_the_pipeline_detects_a_wrong_sampler(pair, far_draft):
    target, draft = pair[0], far_draft
    params = SamplingParams(temperature=1.0)
    exact = _exact_of(target, params)
    services = Services(target, draft, pre_draft=True)
    services.engine.sampler = AbsResidualSampler()
    try:
        outs = services.generate(_seeded(params, N, max_tokens=4), k=1)
    finally:
        services.close()
    joint = _check(np.array([o[:3] for o in outs]), exact)[0]
    print(f"wrong sampler through the pre-drafting gateway: chi2 p={joint[1]:.2e} TV={joint[2]:.4f} "
          f"(bound {joint[3]:.4f})")
    assert joint[1] < 0.001 and joint[2] > joint[3]


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.8, top_p=0.95), SamplingParams()],
                         ids=["sampled", "greedy"])
def test_a_seeded_request_gives_the_same_output_with_pre_drafting_on_and_off(pair, params):
    target, draft = pair
    outputs, hit_rounds = {}, {}
    for on in (False, True):
        services = Services(target, draft, pre_draft=on)
        try:
            hits = _hits()
            outputs[on] = services.generate(_seeded(params, 64, max_tokens=24), k=2)
            hit_rounds[on] = _hits() - hits
        finally:
            services.close()
    assert hit_rounds[False] == 0 and hit_rounds[True] > 20
    assert outputs[True] == outputs[False]
