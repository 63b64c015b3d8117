"""The verifier's admission list alone (block counts, no model): who is admitted, in which order, who is refused."""
from concurrent.futures import Future

import pytest

from common.engine.batch_worker import Job
from common.errors import KVCacheExhaustedError
from common.speculative.params import SamplingParams
from common.speculative.proposal import DraftProposal
from verifier_service.admission import AdmissionPolicy, AdmissionQueue
from verifier_service.engine import VerifyCall


def _job(sid, tokens, rnd=0):
    return Job(VerifyCall(sid, rnd, tokens, [1] * tokens, DraftProposal([]), SamplingParams()), Future())


def _queue(num_blocks=16, watermark=2, max_waiting=2):
    return AdmissionQueue(AdmissionPolicy(num_blocks, 4, watermark, max_waiting=max_waiting))


def test_watermark_is_one_percent_and_at_least_one_round_of_growth():
    assert AdmissionPolicy.for_cache(1000, 16, 8).watermark_blocks == 10
    assert AdmissionPolicy.for_cache(48, 4, 4).watermark_blocks == 2           # K_max + 1 = 5 tokens: 2 blocks
    assert AdmissionPolicy.for_cache(2, 16, 8).watermark_blocks == 1           # below the whole cache
    with pytest.raises(ValueError, match="watermark_blocks=4: must be in \\[0, 4\\)"):
        AdmissionPolicy(4, 16, 4)


def test_admitted_in_order_with_the_watermark_and_head_of_line():
    q = _queue()
    for sid, tokens in (("a", 8), ("b", 20), ("c", 4)):           # 2, 5 and 1 blocks
        q.offer(_job(sid, tokens), tokens)
    assert [w.session_id for w in q.admit(free_blocks=8, free_slots=8, idle=False)] == ["a"]   # b: 5 + 2 > 6
    assert [w.session_id for w in q] == ["b", "c"]               # c fits, but waits behind b: no starvation
    assert [w.session_id for w in q.admit(free_blocks=7, free_slots=8, idle=False)] == ["b"]   # c: 1 + 2 > 2
    assert [w.session_id for w in q.admit(free_blocks=8, free_slots=0, idle=False)] == []      # no session slot


def test_an_idle_cache_admits_its_first_session_without_the_watermark():
    q = _queue()
    q.offer(_job("whole", 64), 64)                               # all 16 blocks
    assert q.admit(free_blocks=16, free_slots=8, idle=False) == []
    assert [w.session_id for w in q.admit(free_blocks=16, free_slots=8, idle=True)] == ["whole"]


def test_resumed_sessions_go_first_and_are_never_refused_for_the_bound():
    q = _queue(max_waiting=1)
    for sid in ("n1", "n2", "n3"):
        q.offer(_job(sid, 8), 8)
    q.offer(_job("r", 8, rnd=5), 8)                              # a re-prefill: its request already ran
    assert [w.session_id for w in q.overflow()] == ["n3", "n2"]   # the latest new arrivals are refused
    assert [w.session_id for w in q] == ["r", "n1"] and q.refused == 2
    assert [w.session_id for w in q.admit(free_blocks=16, free_slots=8, idle=False)] == ["r", "n1"]


def test_a_session_larger_than_the_whole_cache_is_refused_naming_the_limit():
    q = _queue()
    with pytest.raises(KVCacheExhaustedError, match="committed_len=65 \\+ K=0 tokens need 17 KV blocks of 4 "
                                                    "tokens, the whole cache holds 16"):
        q.offer(_job("huge", 65), 65)
    assert len(q) == 0 and q.refused == 1


def test_a_retried_first_call_waits_for_the_next_pass():
    q = _queue()
    q.offer(_job("same", 4), 4)
    q.offer(_job("same", 4), 4)
    assert len(q.admit(free_blocks=16, free_slots=8, idle=False)) == 1 and len(q) == 1
    assert [w.session_id for w in q.take(lambda w: w.session_id == "same")] == ["same"] and len(q) == 0
