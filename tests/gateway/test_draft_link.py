"""DraftLink through the RoundRunner: the draft's Info checked on every (re)connection, and its limits capping K."""
from common.errors import KVCacheExhaustedError
from tests.gateway.fake_stubs import FINGERPRINT, FakeDraft, FakeVerifier, rpc_error, target_output
from tests.gateway.round_harness import (PROMPT, SETTINGS, Code, FakeClock, collect, drafts_per_round, request,
                                         runner)


def test_a_draft_with_another_tokenizer_is_never_asked_and_is_checked_again_after_the_pause(monkeypatch):
    clock, verifier = FakeClock(monkeypatch), FakeVerifier()
    draft = FakeDraft(fingerprint="another-vocab")
    r = request(max_tokens=14, k=2)
    run = runner(verifier, draft)

    def between(req):
        if req.stats.rounds == 3:                          # the draft is redeployed with the right tokenizer
            draft.info.vocab_fingerprint = FINGERPRINT
            clock.now += SETTINGS.draft_retry_s
    collect(run, r, between)
    assert r.output_ids == target_output(PROMPT, 14)
    assert drafts_per_round(verifier)[:3] == [0, 0, 0] and drafts_per_round(verifier)[3] == 2
    assert draft.requests[0].round == 3                    # no Propose before its Info matched
    assert draft.info_calls == 2 and r.stats.fallback_rounds == 3


def test_the_drafts_info_is_checked_again_after_every_failure(monkeypatch):
    clock, verifier = FakeClock(monkeypatch), FakeVerifier()
    draft = FakeDraft(faults={1: Code.UNAVAILABLE}, info_faults={0})     # down at start, then once more
    r = request(max_tokens=20, k=2)

    def between(req):
        clock.now += SETTINGS.draft_retry_s                # every pause has passed by the next round
    collect(runner(verifier, draft), r, between)
    assert r.output_ids == target_output(PROMPT, 20)
    assert draft.info_calls == 3                           # start (failed), reconnect, after the Propose failure
    assert drafts_per_round(verifier)[:4] == [0, 2, 0, 2]


def test_k_stays_within_what_the_draft_and_the_verifier_accept():
    verifier = FakeVerifier()
    r = request(max_tokens=12, k=6)
    collect(runner(verifier, FakeDraft(k_max=4), verifier_k_max=3), r)
    assert max(drafts_per_round(verifier)) == 3
    short = FakeVerifier()
    r = request(max_tokens=12, k=3)
    collect(runner(short, FakeDraft(max_model_len=len(PROMPT) + 6)), r)      # the draft's context ends early
    assert r.output_ids == target_output(PROMPT, 12)
    assert drafts_per_round(short)[0] == 3 and drafts_per_round(short)[-1] == 0
    assert r.stats.fallback_rounds == 0                   # a limit, not a failure


def test_a_context_the_draft_cannot_hold_now_skips_drafting_for_that_round_only():
    verifier, draft = FakeVerifier(), FakeDraft()
    answer = draft.Propose

    async def propose(req, timeout):
        if len(draft.requests) == 1:                       # the second Propose: no room in the draft's KV
            draft.requests.append(req)
            raise rpc_error(Code.RESOURCE_EXHAUSTED, "needs 9 blocks, 2 free", KVCacheExhaustedError.reason)
        return await answer(req, timeout)
    draft.Propose = propose
    r = request(max_tokens=16, k=2)
    collect(runner(verifier, draft), r)
    assert r.output_ids == target_output(PROMPT, 16)
    assert drafts_per_round(verifier)[:3] == [2, 0, 2]    # the next round drafts again: no breaker pause
    assert r.stats.fallback_rounds == 1
