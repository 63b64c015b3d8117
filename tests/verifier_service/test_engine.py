"""The verifier engine without gRPC: sessions, idempotent rounds, continuous batching, release; its engine thread
when callers give up or a batch fails."""
import threading

import pytest

from common.llm import LLM
from common.speculative.proposal import DraftProposal
from common.speculative.params import SamplingParams
from common.errors import RoundMismatchError, UnknownSessionError
from tests.checkpoints import build_model_folder
from tests.common.speculative.reference import assert_same_logprobs
from verifier_service.engine import VerifyCall

GREEDY = SamplingParams()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("verifier") / "target", seed=5))


def _verify(engine, sid, rnd, committed, new, drafts=(), params=GREEDY, prompt_len=0):
    return engine.submit(VerifyCall(sid, rnd, committed, list(new), DraftProposal(list(drafts)), params,
                                    prompt_len=prompt_len)).result(30)


def test_rounds_follow_target_only_greedy(engine, folder):
    prompt = [4, 8, 15, 16, 23, 42]
    with LLM(folder, dtype="float32", kv_cache_memory_gib=0.02) as llm:
        expected = llm.generate([prompt], SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    out = []
    r = _verify(engine, "s", 0, len(prompt), prompt)
    out.append(r.next_token)
    rnd = 1
    while len(out) < 12:
        # propose the right continuation for two tokens, then a wrong one: acceptance must stop there
        drafts = expected[len(out):len(out) + 2] + [(expected[len(out) + 2] + 1) % 128] \
            if len(out) + 3 <= 12 else []
        committed = len(prompt) + len(out)
        r = _verify(engine, "s", rnd, committed, [out[-1]], drafts)
        assert r.truncate_to == committed + len(r.accepted)
        out += r.accepted + [r.next_token]
        rnd += 1
    assert out[:12] == expected


def test_penalised_rounds_and_their_logprobs_follow_target_only_across_a_re_prefill(engine, folder):
    """The session's own token history (kept across rounds, restarted by a re-prefill) feeds the penalties; the
    logprobs come one per emitted token, and a retried round replays them."""
    prompt, n = [4, 8, 15, 16, 23, 42, 8, 8], 14
    params = SamplingParams(max_tokens=n, ignore_eos=True, logprobs=3, presence_penalty=0.7, frequency_penalty=0.4,
                            repetition_penalty=1.4)
    with LLM(folder, dtype="float32", kv_cache_memory_gib=0.02) as llm:
        expected = llm.generate([prompt], params)[0]
    sent = []                                                        # every call, to retry one exactly

    def run(rnd, new, drafts=()):
        sent.append((rnd, len(prompt) + len(out), list(new), list(drafts)))
        return _verify(engine, "lp", *sent[-1], params, len(prompt))
    out, logprobs = [], []
    r = run(0, prompt)
    rnd = 1
    while True:
        assert len(r.logprobs) == len(r.accepted) + 1
        assert [t.token_id for t in r.logprobs] == r.accepted + [r.next_token]
        out += r.accepted + [r.next_token]
        logprobs += r.logprobs
        if len(out) >= n - 3:
            break
        if rnd == 3:
            assert _verify(engine, "lp", *sent[-1], params, len(prompt)) == r    # a retry: same reply and logprobs
            assert engine.release("lp")                              # lost: re-prefilled with every committed token
            r = run(rnd, prompt + out)
        else:
            right = expected.token_ids[len(out):len(out) + 2]
            r = run(rnd, [out[-1]], right + [(expected.token_ids[len(out) + 2] + 1) % 128])
            assert r.accepted == right
        rnd += 1
    assert out == expected.token_ids[:len(out)]
    assert_same_logprobs(logprobs, expected.logprobs[:len(out)])


def test_retried_round_replays_the_reply_and_keeps_the_kv(engine):
    first = _verify(engine, "r", 0, 3, [1, 2, 3])
    kv_before = engine.executor.num_tokens(engine.sessions.get("r").seq_id)
    again = _verify(engine, "r", 0, 3, [1, 2, 3])
    assert again == first
    assert engine.executor.num_tokens(engine.sessions.get("r").seq_id) == kv_before == 3


def test_round_out_of_order_names_the_expected_round(engine):
    _verify(engine, "o", 0, 2, [1, 2])
    with pytest.raises(RoundMismatchError, match="round=5 but the session expects round 1") as e:
        _verify(engine, "o", 5, 3, [9])
    assert e.value.expected_round == 1


def test_unknown_session_needs_a_full_re_prefill(engine):
    with pytest.raises(UnknownSessionError, match="re-prefill"):
        _verify(engine, "nope", 3, 10, [1])
    r = _verify(engine, "nope", 3, 3, [7, 8, 9])                   # every committed token: recreated at round 3
    assert r.round == 3 and engine.sessions.get("nope").next_round == 4


def test_concurrent_sessions_share_forward_passes_and_release_frees_blocks(engine):
    free0 = engine.executor.allocator.num_free
    results = {}

    def worker(i):
        sid = f"c{i}"
        r = _verify(engine, sid, 0, 4, [i + 1, 2, 3, 4])
        committed = 5
        for rnd in range(1, 6):
            r = _verify(engine, sid, rnd, committed, [r.next_token])
            committed += 1
        results[i] = r

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8 and max(engine.batch_sizes) > 1          # batching really happened
    for i in range(8):
        assert engine.release(f"c{i}") is True
    assert engine.release("c0") is False
    assert engine.executor.allocator.num_free == free0


@pytest.mark.parametrize("call,match", [
    (VerifyCall("", 0, 1, [1], DraftProposal([]), GREEDY), "session_id"),
    (VerifyCall("b", 0, 1, [], DraftProposal([]), GREEDY), "new_tokens"),
    (VerifyCall("b", 0, 1, [1], DraftProposal([1] * 9), GREEDY), "K=9 must be in \\[0, 8\\]"),
    (VerifyCall("b", 0, 1, [1000], DraftProposal([]), GREEDY), "outside the vocabulary"),
    (VerifyCall("b", 0, 1, [1], DraftProposal([3]), SamplingParams(temperature=1.0)), "one draft distribution"),
    (VerifyCall("b", 0, 1, [1], DraftProposal([]), GREEDY, prompt_len=2),
     "prompt_len=2: must be in \\[0, committed_len=1\\]"),
])
def test_bad_calls_are_refused_before_queueing(engine, call, match):
    with pytest.raises(ValueError, match=match):
        engine.submit(call)


# ---- the engine thread survives callers that give up and batches that fail ---------------------------------------
def _call(sid, tokens, drafts=(), params=SamplingParams()):
    return VerifyCall(sid, 0, len(tokens), list(tokens), DraftProposal(list(drafts)), params)


def test_a_call_whose_caller_gave_up_is_skipped_and_the_engine_goes_on(engine):
    entered, gate, forward = threading.Event(), threading.Event(), engine.executor.forward

    def held_forward(chunks):
        entered.set()
        gate.wait(30)
        return forward(chunks)
    engine.executor.forward = held_forward
    try:
        busy = engine.submit(_call("busy", [1, 2, 3]))
        assert entered.wait(30)
        abandoned = engine.submit(_call("gone", [4, 5, 6]))
        assert abandoned.cancel()                             # what grpc does when the RPC is cancelled
        gate.set()
        busy.result(30)
        assert engine.submit(_call("next", [7, 8, 9])).result(30).truncate_to == 3
    finally:
        gate.set()
    assert engine.sessions.get("gone") is None                # skipped: no session, no KV
    for sid in ("busy", "next"):
        engine.release(sid)
    assert engine.executor.allocator.num_used == 0


def test_a_batch_that_fails_drops_its_sessions_and_the_engine_goes_on(engine):
    engine.submit(_call("kept", [1, 2, 3])).result(30)
    sampler = engine.sampler

    def broken(inputs):
        raise RuntimeError("sampler blew up")
    engine.sampler = broken
    failed = engine.submit(VerifyCall("kept", 1, 4, [5], DraftProposal([6, 7]), SamplingParams()))
    with pytest.raises(RuntimeError, match="sampler blew up"):
        failed.result(30)
    engine.sampler = sampler
    assert engine.sessions.get("kept") is None                 # its KV held unverified drafts: dropped
    assert engine.executor.allocator.num_used == 0
    assert engine.submit(_call("after", [1, 2, 3], [4])).result(30).truncate_to >= 3
    engine.release("after")
