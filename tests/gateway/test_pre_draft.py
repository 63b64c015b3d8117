"""Pre-drafting in the round loop, over the fake stubs: output unchanged, hits skip the draft call, stale pre-drafts
are never used, a failing or old draft costs nothing but speed, nothing is left running."""
import asyncio
import contextlib

import pytest
from prometheus_client import REGISTRY

from common.speculative.adaptive_k import AdaptiveK, CostModel
from common.speculative.params import SamplingParams
from common.speculative.request import Request
from tests.gateway.fake_stubs import FakeDraft, FakeVerifier, target_output
from tests.gateway.round_harness import PROMPT, Code, CostSpy, collect, drafts_per_round, request, runner


def _counter(outcome: str) -> float:
    return REGISTRY.get_sample_value("specd_pre_drafts_total", {"outcome": outcome}) or 0.0


def _fresh_proposes(draft: FakeDraft) -> int:
    return sum(not req.guess_next for req, _ in draft.answered)


def _check_every_verify_used_a_proposal_of_its_own_context(verifier: FakeVerifier, draft: FakeDraft,
                                                           sequence: list[int]) -> None:
    """Each Verify's drafts are a reply the draft gave for exactly the committed context of that round (a pre-draft's
    context counts its guess), at that round's index."""
    for vreq, _ in verifier.answered:
        if not vreq.draft_token_ids:
            continue
        committed = sequence[:vreq.committed_len]
        sources = [(req, rep) for req, rep in draft.answered if list(rep.token_ids) == list(vreq.draft_token_ids)
                   and list(req.context_token_ids) + ([rep.guessed_token_id] if req.guess_next else []) == committed
                   and req.round == vreq.round]
        assert sources, f"round {vreq.round}: drafts {list(vreq.draft_token_ids)} were not proposed for its context"


def test_a_draft_that_is_always_right_is_asked_once_and_every_later_round_is_pre_drafted():
    verifier, draft = FakeVerifier(), FakeDraft()
    hits = _counter("hit")
    r = request(max_tokens=40, k=3)
    chunks = collect(runner(verifier, draft, pre_draft=True), r)
    assert sum(chunks, []) == target_output(PROMPT, 40)
    assert _fresh_proposes(draft) == 1                      # round 0; every later proposal was pre-drafted
    assert _counter("hit") - hits == len(verifier.answered) - 1
    _check_every_verify_used_a_proposal_of_its_own_context(verifier, draft, PROMPT + r.output_ids)


def test_without_pre_drafting_every_round_asks_the_draft():
    # The negative control of the test above: the same requests, sequential rounds.
    verifier, draft = FakeVerifier(), FakeDraft()
    collect(runner(verifier, draft, pre_draft=False), request(max_tokens=40, k=3))
    assert _fresh_proposes(draft) == len(verifier.answered) and not any(q.guess_next for q, _ in draft.answered)


@pytest.mark.parametrize("case", ["corrections", "wrong_guesses"])
def test_stale_pre_drafts_are_never_used(case):
    # A correction (a draft rejected) or a wrong guess of the bonus token makes the pre-draft stale: its context is
    # not the committed one. The output stays the target's, and every verified proposal is one for its own context.
    miss = (lambda pos: pos % 5 == 0) if case == "corrections" else (lambda pos: False)
    wrong = (lambda pos: pos % 3 == 0) if case == "wrong_guesses" else (lambda pos: False)
    verifier, draft = FakeVerifier(), FakeDraft(miss=miss, wrong_guess=wrong)
    misses = _counter("miss")
    r = request(max_tokens=50, k=4)
    assert sum(collect(runner(verifier, draft, pre_draft=True), r), []) == target_output(PROMPT, 50)
    assert _counter("miss") > misses
    assert 1 < _fresh_proposes(draft) < len(verifier.answered)      # some rounds hit, the stale ones drafted afresh
    _check_every_verify_used_a_proposal_of_its_own_context(verifier, draft, PROMPT + r.output_ids)


def test_a_draft_that_dies_while_pre_drafting_changes_nothing_but_speed():
    codes = [Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED, None, Code.UNAVAILABLE] + [None] * 50
    verifier, draft = FakeVerifier(), FakeDraft(pre_draft_faults=codes)
    failed = _counter("failed")
    run = runner(verifier, draft, pre_draft=True)
    r = request(max_tokens=40, k=3)
    assert sum(collect(run, r), []) == target_output(PROMPT, 40)
    assert _counter("failed") - failed == 3
    assert r.stats.fallback_rounds == 0 and run.draft_link.failures == 0    # the fresh proposals after them served
    assert all(len(q.draft_token_ids) == 3 for q, _ in verifier.answered[:-1])


def test_a_draft_that_predates_pre_drafting_is_not_asked_again():
    verifier, draft = FakeVerifier(), FakeDraft(v1_1=True)
    run = runner(verifier, draft, pre_draft=True)
    assert sum(collect(run, request(max_tokens=30, k=3)), []) == target_output(PROMPT, 30)
    assert sum(q.guess_next for q, _ in draft.answered) == 1 and not run.draft_link.pre_draft_ok


def test_no_pre_draft_outlives_its_request():
    # A request that stops mid-stream (the client went away) and one that finishes: no task left behind.
    verifier, draft = FakeVerifier(), FakeDraft()

    async def main():
        run = runner(verifier, draft, pre_draft=True)
        async with contextlib.aclosing(run.run(request(max_tokens=60, k=3), "a")) as gen:
            async for i, _ in _enumerate(gen):
                if i == 3:
                    break
        async with contextlib.aclosing(run.run(request(max_tokens=20, k=3), "b")) as gen:
            async for _ in gen:
                pass
        await asyncio.sleep(0)
        return [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert asyncio.run(main()) == []


async def _enumerate(gen):
    i = 0
    async for x in gen:
        yield i, x
        i += 1


def test_the_pre_draft_respects_the_token_budget_and_the_context_limit():
    verifier, draft = FakeVerifier(), FakeDraft(max_model_len=40)
    r = request(max_tokens=30, k=4)
    collect(runner(verifier, draft, pre_draft=True, max_model_len=40), r)
    for req, rep in draft.answered:
        if req.guess_next:
            assert len(req.context_token_ids) + 1 + req.k <= 40
            assert len(req.context_token_ids) + 1 + req.k - len(PROMPT) <= 30 - 1 + 1
    assert len(r.output_ids) == min(30, 40 - len(PROMPT))


def test_the_controller_learns_how_often_the_guess_is_right():
    verifier, draft = FakeVerifier(), FakeDraft(wrong_guess=lambda pos: pos % 2 == 0)
    costs = CostModel()
    r = Request(list(PROMPT), SamplingParams(max_tokens=60), controller=AdaptiveK(4, costs))
    collect(runner(verifier, draft, pre_draft=True, costs=costs), r)
    assert r.controller.guess_observations > 3 and r.controller.guess_match < 0.6    # prior 0.6, about half right


def _auto(max_tokens: int, costs: CostModel) -> Request:
    return Request(list(PROMPT), SamplingParams(max_tokens=max_tokens), controller=AdaptiveK(4, costs))


def test_under_k_auto_the_first_round_verifies_the_prompt_alone_while_the_draft_prefills_it():
    verifier, draft = FakeVerifier(), FakeDraft()
    costs = CostModel()
    r = _auto(40, costs)
    assert sum(collect(runner(verifier, draft, pre_draft=True, costs=costs), r), []) == target_output(PROMPT, 40)
    first_verify = verifier.answered[0][0]
    assert list(first_verify.new_tokens) == PROMPT and not first_verify.draft_token_ids
    first_propose = draft.answered[0][0]
    assert first_propose.guess_next and list(first_propose.context_token_ids) == PROMPT and first_propose.round == 1
    assert not any(q.round == 1 and not q.guess_next for q, _ in draft.answered)    # round 1 took the pre-draft
    assert all(drafts_per_round(verifier)[1:])
    _check_every_verify_used_a_proposal_of_its_own_context(verifier, draft, PROMPT + r.output_ids)


def test_a_wrong_first_guess_drafts_afresh_with_no_catch_up_to_price():
    verifier, draft = FakeVerifier(), FakeDraft(wrong_guess=lambda pos: pos == len(PROMPT))
    costs = CostSpy()
    r = _auto(30, costs)
    lags = []
    chunks = collect(runner(verifier, draft, pre_draft=True, costs=costs), r, between=lambda r: lags.append(r.draft_lag))
    assert sum(chunks, []) == target_output(PROMPT, 30)
    assert len(chunks[0]) == 1 and lags[0] == 0            # one token, and the draft has seen the prompt
    second = [req for req, _ in draft.answered if req.round == 1 and not req.guess_next]
    assert len(second) == 1 and list(second[0].context_token_ids) == PROMPT + chunks[0]
    assert costs.catchups == [] and costs.drafts[0] == second[0].k      # priced as draft steps
    _check_every_verify_used_a_proposal_of_its_own_context(verifier, draft, PROMPT + r.output_ids)


@pytest.mark.parametrize("pre_draft", [False, True])
def test_a_fixed_k_or_no_pre_drafting_drafts_in_the_first_round(pre_draft):
    # The negative controls of the test above: only K=auto with pre-drafting moves the first round's drafts.
    verifier, draft = FakeVerifier(), FakeDraft()
    costs = CostModel()
    r = request(max_tokens=20, k=3) if pre_draft else _auto(20, costs)
    assert sum(collect(runner(verifier, draft, pre_draft=pre_draft, costs=costs), r), []) == target_output(PROMPT, 20)
    assert verifier.answered[0][0].draft_token_ids and not draft.answered[0][0].guess_next
