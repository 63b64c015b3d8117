"""RoundRunner against in-memory fake stubs (tests/gateway/fake_stubs.py): draft fallback and its circuit breaker,
verifier resync, session release, stats and cost observations. Milliseconds each: no models, no network."""
import asyncio
import contextlib

import grpc
import pytest

from tests.gateway.fake_stubs import FakeDraft, FakeVerifier, rpc_error, target_output
from tests.gateway.round_harness import (PROMPT, Code, CostSpy, FakeClock, collect, drafts_per_round,
                                         fallback_metric, request, runner)


# ---- rounds, output, stats ---------------------------------------------------------------------------------------
def test_perfect_draft_output_equals_the_target_and_stats_count_every_round():
    verifier, draft = FakeVerifier(batch_sizes=(2, 6, 3)), FakeDraft()
    r = request(max_tokens=10, k=3)
    chunks = collect(runner(verifier, draft), r)
    assert r.output_ids == target_output(PROMPT, 10) and r.finish_reason == "length"
    # K is capped so a round never drafts past max_tokens: 3 + bonus, 3 + bonus, then 1 + bonus
    assert [len(c) for c in chunks] == [4, 4, 2] and sum(chunks, []) == r.output_ids
    s = r.stats
    assert (s.rounds, s.drafted, s.accepted, s.fallback_rounds) == (3, 7, 7, 0)
    assert s.drafted_per_position == s.accepted_per_position == [3, 2, 2] and s.k_chosen == [3, 3, 1]
    assert s.draft_s > 0 and s.verify_s > 0 and s.max_verify_batch_size == 6
    assert s.draft_compute_s == pytest.approx(3 * 0.001) and s.verify_compute_s == pytest.approx(3 * 0.002)
    assert s.queue_s == pytest.approx(3 * 0.00025 + 3 * 0.0005)
    assert s.wire_bytes == sum(q.ByteSize() + a.ByteSize() for q, a in verifier.answered + draft.answered)
    assert [q.round for q in draft.requests] == [q.round for q in verifier.requests] == [0, 1, 2]
    assert draft.timeouts == {0.25} and verifier.timeouts == {0.5}
    assert verifier.released == ["rid-0"]


def test_rejected_drafts_leave_the_output_unchanged_and_are_counted_per_position():
    verifier, draft = FakeVerifier(), FakeDraft(miss=lambda position: position % 3 == 0)
    r = request(max_tokens=20, k=4)
    chunks = collect(runner(verifier, draft), r)
    assert r.output_ids == sum(chunks, []) == target_output(PROMPT, 20)
    replies = [(len(q.draft_token_ids), len(a.accepted_token_ids)) for q, a in verifier.answered]
    assert 0 < r.stats.accepted < r.stats.drafted and r.stats.rounds == len(replies)
    assert r.stats.per_round_accepted == [n for _, n in replies]
    assert r.stats.accepted_per_position == [sum(n > i for _, n in replies) for i in range(4)]
    assert r.stats.drafted_per_position == [sum(k > i for k, _ in replies) for i in range(4)]


def test_eos_inside_the_accepted_drafts_stops_there():
    verifier = FakeVerifier()
    r = request(max_tokens=50, k=4, prompt=[1])
    collect(runner(verifier, FakeDraft(), eos={4}), r)         # drafts 2 3 4 5 + bonus 6: cut after 4
    assert r.output_ids == [2, 3, 4] and r.finish_reason == "stop" and r.stats.rounds == 1
    assert verifier.released == ["rid-0"]


def test_sampled_request_forwards_the_drafts_q_prime_exactly_as_proposed():
    verifier, draft = FakeVerifier(), FakeDraft(miss=lambda position: position % 5 == 0)
    r = request(max_tokens=16, k=3, temperature=0.8, seed=3)
    collect(runner(verifier, draft), r)
    with_drafts = [q for q, _ in verifier.answered if q.draft_token_ids]
    assert len(with_drafts) == len(draft.answered) > 1
    for (propose, proposal), verify in zip(draft.answered, with_drafts):
        assert verify.round == propose.round and len(proposal.dists) == propose.k
        assert list(verify.draft_token_ids) == list(proposal.token_ids)
        assert list(verify.draft_dists) == list(proposal.dists)
        assert [list(d.probs) for d in verify.draft_dists] == [[0.625, 0.375]] * propose.k
        assert verify.sampling == propose.sampling and verify.sampling.temperature == pytest.approx(0.8)
        assert verify.sampling.seed == 3


# ---- the draft service failing -----------------------------------------------------------------------------------
def test_without_a_draft_stub_every_round_is_plain_decoding():
    verifier = FakeVerifier()
    r = request(max_tokens=6, k=3)
    chunks = collect(runner(verifier, None), r)
    assert chunks == [[t] for t in target_output(PROMPT, 6)]
    assert drafts_per_round(verifier) == [0] * 6 and (r.stats.drafted, r.stats.fallback_rounds) == (0, 0)


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED])
def test_a_failed_draft_makes_plain_rounds_until_the_retry_pause_ends(monkeypatch, code):
    clock, verifier, draft = FakeClock(monkeypatch), FakeVerifier(), FakeDraft(faults={0: code})
    r, fallbacks, before = request(max_tokens=14, k=2), [], fallback_metric()

    def between(r):
        fallbacks.append(r.stats.fallback_rounds)
        clock.now += 4.99                       # rounds 1, 2 within the 10 s pause; round 3 at 114.97: probe

    collect(runner(verifier, draft), r, between)
    assert r.output_ids == target_output(PROMPT, 14)
    assert drafts_per_round(verifier)[:5] == [0, 0, 0, 2, 2]
    assert [q.round for q in draft.requests][:3] == [0, 3, 4]           # no Propose while marked down
    assert fallbacks[0] == 1 and r.stats.drafted > 0
    assert fallback_metric() - before == 3                              # the failed round and the two paused


def test_fallback_rounds_counts_every_round_the_breaker_ran_without_drafts(monkeypatch):
    FakeClock(monkeypatch)                      # the clock never moves: the draft stays down after round 0
    verifier, r = FakeVerifier(), request(max_tokens=5, k=2)
    collect(runner(verifier, FakeDraft(faults={0: Code.UNAVAILABLE})), r)
    assert drafts_per_round(verifier) == [0] * 5
    assert r.stats.fallback_rounds == 5         # today: 1


def test_draft_invalid_argument_is_raised_not_hidden():
    verifier = FakeVerifier()
    with pytest.raises(grpc.aio.AioRpcError) as e:
        collect(runner(verifier, FakeDraft(faults={1: Code.INVALID_ARGUMENT})), request())
    assert e.value.code() == Code.INVALID_ARGUMENT and len(verifier.requests) == 1
    assert verifier.released == ["rid-0"]


# ---- the verifier losing the session -----------------------------------------------------------------------------
def test_verifier_restart_is_resynced_under_a_new_session_with_the_same_round():
    plain, restarted = FakeVerifier(), FakeVerifier(restarts={2})
    expected, r = request(max_tokens=20), request(max_tokens=20)
    collect(runner(plain, FakeDraft(miss=lambda p: p % 4 == 0)), expected)
    chunks = collect(runner(restarted, FakeDraft(miss=lambda p: p % 4 == 0)), r)
    assert r.output_ids == sum(chunks, []) == expected.output_ids == target_output(PROMPT, 20)
    assert r.stats.rounds == expected.stats.rounds
    lost, resync, after = restarted.requests[2:5]
    assert lost.session_id == "rid-0" and resync.session_id == after.session_id == "rid-2-resync"
    assert resync.round == lost.round == 2 and after.round == 3
    assert list(resync.new_tokens) == PROMPT + r.output_ids[:lost.committed_len - len(PROMPT)]
    assert resync.committed_len == lost.committed_len == len(resync.new_tokens)
    assert list(resync.draft_token_ids) == list(lost.draft_token_ids) and len(after.new_tokens) == 1
    assert restarted.released == ["rid-2-resync"]


def test_round_mismatch_is_resynced_too():
    verifier = FakeVerifier()

    def skew(r):
        if r.stats.rounds == 1:
            verifier.sessions["rid-0"].round += 3
    r = request(max_tokens=12)
    collect(runner(verifier, FakeDraft()), r, skew)
    assert r.output_ids == target_output(PROMPT, 12)
    assert [q.session_id for q in verifier.requests][1:3] == ["rid-0", "rid-1-resync"]
    assert verifier.released == ["rid-0", "rid-1-resync"]       # the abandoned session is freed, not left to its TTL


def test_a_second_loss_in_the_same_round_is_raised():
    verifier = FakeVerifier(restarts={2}, faults={3: Code.NOT_FOUND})
    with pytest.raises(grpc.aio.AioRpcError) as e:
        collect(runner(verifier, FakeDraft()), request(max_tokens=30))
    assert e.value.code() == Code.NOT_FOUND and len(verifier.requests) == 4
    assert verifier.released == ["rid-0"]                   # the resync session was never created


@pytest.mark.parametrize("code", [Code.RESOURCE_EXHAUSTED, Code.UNAVAILABLE, Code.INTERNAL])
def test_other_verifier_errors_propagate_and_the_session_is_released(code):
    verifier = FakeVerifier(faults={1: code})
    with pytest.raises(grpc.aio.AioRpcError) as e:
        collect(runner(verifier, FakeDraft()), request())
    assert e.value.code() == code and len(verifier.requests) == 2       # not retried, not resynced
    assert verifier.released == ["rid-0"]


# ---- releasing the session ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["consumer breaks", "consumer cancelled mid-round"])
def test_a_consumer_that_stops_early_releases_the_session_once(how):
    verifier = FakeVerifier(hang_at={1})

    async def consume():
        async with contextlib.aclosing(runner(verifier, FakeDraft()).run(request(), "rid")) as gen:
            async for _ in gen:
                if how == "consumer breaks":
                    break
    if how == "consumer breaks":
        asyncio.run(consume())
        assert len(verifier.requests) == 1
    else:
        with pytest.raises(TimeoutError):
            asyncio.run(asyncio.wait_for(consume(), timeout=0.05))
        assert len(verifier.requests) == 2
    assert verifier.released == ["rid-0"]


def test_a_failing_release_does_not_raise():
    verifier = FakeVerifier(release_fault=Code.UNAVAILABLE)
    r = request(max_tokens=8)
    collect(runner(verifier, FakeDraft()), r)
    assert r.output_ids == target_output(PROMPT, 8) and verifier.released == ["rid-0"]


# ---- cost observations -------------------------------------------------------------------------------------------
def test_prefill_rounds_teach_the_cost_model_nothing():
    costs = CostSpy()
    collect(runner(FakeVerifier(), FakeDraft(), costs=costs), request(max_tokens=4, k=3))   # one round: the prefill
    assert (costs.drafts, costs.verifies, costs.calibrated, costs.t_draft) == ([], [], False, 0.0)
    collect(runner(FakeVerifier(), FakeDraft(), costs=costs), request(max_tokens=12, k=3))  # K = 3, 3, 3
    assert costs.drafts == [3, 3] and costs.verifies == [4, 4]
    assert costs.calibrated and costs.t_draft > 0
    resynced = CostSpy()                                   # round 1 re-prefills: its verify time means nothing
    collect(runner(FakeVerifier(restarts={1}), FakeDraft(), costs=resynced), request(max_tokens=12, k=3))
    assert resynced.drafts == [3, 3] and resynced.verifies == [4]


# ---- what the services say about themselves, and which errors resync ----------------------------------------------
def test_a_failed_precondition_that_is_not_a_round_conflict_is_raised_not_resynced():
    verifier = FakeVerifier()

    async def engine_error(req, timeout):
        verifier.requests.append(req)
        raise rpc_error(Code.FAILED_PRECONDITION, "checkpoint went missing", "CHECKPOINT")
    verifier.Verify = engine_error
    with pytest.raises(grpc.aio.AioRpcError) as e:
        collect(runner(verifier, FakeDraft()), request())
    assert e.value.code() == Code.FAILED_PRECONDITION and len(verifier.requests) == 1     # no re-prefill
