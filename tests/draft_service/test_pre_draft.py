"""Pre-drafts (guess_next): the draft appends its own most likely token, then drafts exactly what the round from that
context would draw, batched with ordinary calls and within the context limit counted with the guess."""

import pytest
import torch

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.speculative.params import SamplingParams
from draft_service.drafter import Drafter
from tests.checkpoints import build_model_folder
from tests.draft_service.propose_gate import ProposeGate

GREEDY = SamplingParams()
SAMPLED = SamplingParams(temperature=0.8, top_p=0.9, seed=11)
PENALISED = SamplingParams(temperature=0.7, seed=5, presence_penalty=1.5, repetition_penalty=1.3)
CONTEXTS = [[3, 1, 4, 1, 5], [9, 2, 6], [5, 3, 5, 8, 9, 7, 9]]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("draft") / "draft", seed=3))


def _drafter(folder, max_model_len=None):
    runner = ModelRunner(EngineConfig(model=folder, dtype="float32", num_kv_blocks=128, max_num_seqs=16,
                                      **({"max_model_len": max_model_len} if max_model_len else {})))
    return Drafter(runner, k_max=8)


def _argmax_next(folder, context) -> int:
    runner = ModelRunner(EngineConfig(model=folder, dtype="float32", num_kv_blocks=128, max_num_seqs=4))
    from common.engine.forward_io import SequenceChunk
    logits = runner.forward([SequenceChunk(1, context)]).logits[0]     # [len(context), vocab]
    return int(torch.argmax(logits[-1]))


@pytest.mark.parametrize("params", [GREEDY, SAMPLED, PENALISED], ids=["greedy", "sampled", "penalised"])
def test_a_pre_draft_is_the_round_its_guessed_context_would_draw(folder, params):
    d = _drafter(folder)
    try:
        # Round 0 of each request, then its pre-draft for round 1 (sharing the soft cache, as in serving).
        pre = []
        for i, ctx in enumerate(CONTEXTS):
            r0 = d.propose(f"r{i}", ctx, 3, params, 0, timeout=30).proposal
            after = ctx + r0.token_ids
            pre.append((after, d.propose(f"r{i}", after, 4, params, 1, timeout=30, guess_next=True).proposal))
    finally:
        d.shutdown()
    fresh = _drafter(folder)
    try:
        for i, (after, p) in enumerate(pre):
            assert p.guessed_token_id is not None and len(p.token_ids) == 4
            again = fresh.propose(f"x{i}", after + [p.guessed_token_id], 4, params, 1, timeout=30).proposal
            assert again.token_ids == p.token_ids
            if not params.greedy:
                assert [q.token_ids for q in again.dists] == [q.token_ids for q in p.dists]
    finally:
        fresh.shutdown()
    if not params.penalized:          # unpenalised, the guess is the model's own argmax, whatever the temperature
        assert [p.guessed_token_id for _, p in pre] == [_argmax_next(folder, after) for after, _ in pre]


def test_pre_drafts_and_ordinary_calls_share_one_batch(folder):
    d = _drafter(folder)
    gate = ProposeGate(d)
    try:
        first = d.submit("warm", [1, 2, 3], 2, GREEDY, 0)
        gate.wait_entered()
        futs = [d.submit(f"r{i}", ctx, 3, GREEDY, 1, guess_next=i % 2 == 0) for i, ctx in enumerate(CONTEXTS)]
        gate.release()
        first.result(30)
        results = [f.result(30) for f in futs]
    finally:
        d.shutdown()
    assert list(d.batch_sizes) == [1, len(CONTEXTS)]
    assert [r.proposal.guessed_token_id is not None for r in results] == [True, False, True]
    assert all(len(r.proposal.token_ids) == 3 for r in results)


def test_the_guessed_token_counts_against_the_context_limit(folder):
    d = _drafter(folder, max_model_len=16)
    try:
        d.propose("a", list(range(1, 13)), 4, GREEDY, 0, timeout=30)                 # 12 + 4 = 16 fits
        with pytest.raises(ValueError, match=r"13 tokens \+ k=4 exceeds max_model_len=16"):
            d.submit("a", list(range(1, 13)), 4, GREEDY, 1, guess_next=True)
    finally:
        d.shutdown()
