"""The verifier service under bad input, random input and load (a real process on loopback, TP=1, tiny checkpoint):
every bad request gets INVALID_ARGUMENT / FAILED_PRECONDITION / NOT_FOUND naming the field and the limit, a full
queue is RESOURCE_EXHAUSTED at once, and afterwards no session and no KV block is left. (The engine thread when
callers give up or a batch fails: test_engine.py.)"""
import collections
import concurrent.futures as cf
import math
import random
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.llm import LLM
from common.rpc.generated.specd.v1 import common_pb2, verifier_pb2, verifier_pb2_grpc
from common.speculative.params import SamplingParams
from tests.checkpoints import build_model_folder
from tests.reliability import (EXPECTED_CODES, PLAUSIBLE_SAMPLING, TOKENS, ServiceProcess, idle_state,
                               latency_figures, messages, record, wait_for_state)

MAX_LEN = 1024
MAX_QUEUE = 4
INVALID, PRECONDITION = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION
NOT_FOUND = grpc.StatusCode.NOT_FOUND


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("verifier-reliability") / "target", seed=13,
                                  max_position_embeddings=MAX_LEN))


@pytest.fixture(scope="module")
def verifier(folder, tmp_path_factory):
    svc = ServiceProcess("verifier", folder, tmp_path_factory.mktemp("verifier-logs"), "--tp", "1",
                         "--max-queue", str(MAX_QUEUE)).wait_serving()
    svc.channel = grpc.insecure_channel(svc.address, options=[("grpc.max_send_message_length", 64 << 20)])
    svc.stub = verifier_pb2_grpc.VerifierServiceStub(svc.channel)
    svc.idle = idle_state(svc.scrape())
    assert svc.idle["specd_verifier_sessions"] == 0 and svc.idle["specd_verifier_queue_depth"] == 0
    yield svc
    svc.channel.close()
    svc.stop()


def prefill(session_id, tokens, **kw):
    """A new session's first round: every committed token, no drafts (the verifier has no separate Prefill)."""
    return verifier_pb2.VerifyRequest(session_id=session_id, round=0, committed_len=len(tokens), new_tokens=tokens,
                                      **kw)


def assert_serving(verifier):
    reply = verifier.stub.Verify(prefill("valid", [4, 5, 6]), timeout=30)
    assert 0 <= reply.next_token_id < 128 and reply.rollback.truncate_to == 3
    assert verifier.stub.Release(verifier_pb2.ReleaseRequest(session_id="valid"), timeout=30).released
    assert verifier.proc.poll() is None


def assert_idle(verifier, timeout_s: float = 5.0) -> float:
    return wait_for_state(lambda: idle_state(verifier.scrape()), verifier.idle, timeout_s, "verifier back to idle")


# ---- bad input ---------------------------------------------------------------------------------------------------
def dist(ids, probs):
    return common_pb2.SparseDistribution(token_ids=ids, probs=probs)


SAMPLED = common_pb2.SamplingParams(temperature=1.0)


def verify(**kw):
    base = dict(session_id="bad", round=0, committed_len=3, new_tokens=[4, 5, 6], draft_token_ids=[7, 8])
    return "Verify", verifier_pb2.VerifyRequest(**{**base, **kw})


def sampled(dists, **kw):
    return verify(sampling=SAMPLED, draft_dists=dists, **kw)


def session_at_round_2(stub, sid):
    """A session that has run rounds 0 and 1 (committed 3 + 1 + 1 tokens)."""
    r0 = stub.Verify(verifier_pb2.VerifyRequest(session_id=sid, round=0, committed_len=3, new_tokens=[4, 5, 6]))
    r1 = stub.Verify(verifier_pb2.VerifyRequest(session_id=sid, round=1, committed_len=4,
                                                new_tokens=[r0.next_token_id]))
    return r1.next_token_id


# (name, stub -> (rpc, request), code, words the message must hold)
BAD_CALLS = [
    ("empty session id", lambda s: verify(session_id=""), INVALID, ["session_id", "1..128"]),
    ("session id too long", lambda s: verify(session_id="s" * 129), INVALID, ["session_id", "1..128"]),
    ("no new tokens", lambda s: verify(committed_len=0, new_tokens=[]), INVALID, ["new_tokens"]),
    ("token id = vocab size", lambda s: verify(new_tokens=[4, 128, 6]), INVALID, ["new_tokens", "[0, 128)"]),
    ("negative token id", lambda s: verify(new_tokens=[-5, 1, 2]), INVALID, ["new_tokens", "[0, 128)"]),
    ("K above k_max", lambda s: verify(draft_token_ids=list(range(1, 10))), INVALID, ["K=9", "[0, 8]"]),
    ("draft id outside vocab", lambda s: verify(draft_token_ids=[7, 200]), INVALID,
     ["draft_token_ids[1]=200", "[0, 128)"]),
    ("past the context limit", lambda s: verify(committed_len=1020, new_tokens=[1] * 1020, draft_token_ids=[1] * 8),
     INVALID, ["committed_len: 1020 tokens + K=8", "max_model_len=1024"]),
    ("huge committed_len", lambda s: verify(committed_len=2**32 - 1), INVALID,
     ["committed_len: 4294967295 tokens", "max_model_len=1024"]),
    ("sampled without q'", lambda s: sampled([]), INVALID, ["one draft distribution per drafted token", "K=2"]),
    ("q' not summing to 1", lambda s: sampled([dist([7], [0.5]), dist([8], [1.0])]), INVALID,
     ["position 0", "sum to 0.500000", "1 ± 0.001"]),
    ("negative q'", lambda s: sampled([dist([7, 9], [1.5, -0.5]), dist([8], [1.0])]), INVALID,
     ["position 0", ">= 0"]),
    ("NaN q'", lambda s: sampled([dist([7], [1.0]), dist([8, 9], [math.nan, 1.0])]), INVALID, ["position 1", ">= 0"]),
    ("q' ids and probs differ", lambda s: sampled([dist([7, 9], [1.0]), dist([8], [1.0])]), INVALID,
     ["as many probabilities", "2 ids and 1 probs"]),
    ("q' repeats a token", lambda s: sampled([dist([7, 7], [0.5, 0.5]), dist([8], [1.0])]), INVALID, ["repeats"]),
    ("q' id outside vocab", lambda s: sampled([dist([7, 130], [0.5, 0.5]), dist([8], [1.0])]), INVALID,
     ["position 0", "[0, 128)"]),
    ("drafted token outside q'", lambda s: sampled([dist([9], [1.0]), dist([8], [1.0])]), INVALID,
     ["drafted token 7 has zero draft probability"]),
    ("NaN temperature", lambda s: verify(sampling=common_pb2.SamplingParams(temperature=math.nan)), INVALID,
     ["temperature=nan"]),
    ("negative temperature", lambda s: verify(sampling=common_pb2.SamplingParams(temperature=-0.5)), INVALID,
     ["temperature=-0.5", "[1e-05, 100]"]),
    ("temperature that overflows logits", lambda s: verify(sampling=common_pb2.SamplingParams(temperature=1e-38)),
     INVALID, ["temperature=", "1e-05"]),
    ("top_p above 1", lambda s: verify(sampling=common_pb2.SamplingParams(temperature=1, top_p=1.5)), INVALID,
     ["top_p=1.5", "(0, 1]"]),
    ("negative top_p", lambda s: verify(sampling=common_pb2.SamplingParams(temperature=1, top_p=-0.25)), INVALID,
     ["top_p=-0.25", "(0, 1]"]),
    ("unknown session", lambda s: verify(session_id="ghost", round=4, committed_len=9, new_tokens=[1]), NOT_FOUND,
     ["'ghost' is unknown", "re-prefill"]),
    ("round ahead", lambda s: verify(session_id="ahead", round=5, committed_len=6,
                                     new_tokens=[session_at_round_2(s, "ahead")]), PRECONDITION,
     ["round=5", "expects round 2"]),
    ("round behind (not a retry)", lambda s: verify(session_id="behind", round=0, committed_len=6,
                                                    new_tokens=[session_at_round_2(s, "behind")]), PRECONDITION,
     ["round=0", "expects round 2"]),
    ("committed_len out of step", lambda s: verify(session_id="step", round=2, committed_len=9,
                                                   new_tokens=[session_at_round_2(s, "step")]), PRECONDITION,
     ["committed_len=9", "holds 4 tokens + 1 new"]),
    ("prefill without tokens", lambda s: ("Verify", prefill("p", [])), INVALID, ["new_tokens: empty"]),
    ("prefill past the context limit", lambda s: ("Verify", prefill("p", [1] * 1100)), INVALID,
     ["committed_len: 1100 tokens + K=0", "max_model_len=1024"]),
    ("prefill token outside vocab", lambda s: ("Verify", prefill("p", [1, 128])), INVALID,
     ["new_tokens", "[0, 128)"]),
    ("prefill with empty session id", lambda s: ("Verify", prefill("", [1])), INVALID, ["session_id", "1..128"]),
    ("oversized message", lambda s: ("Verify", verifier_pb2.VerifyRequest(session_id="x" * (17 << 20))),
     grpc.StatusCode.RESOURCE_EXHAUSTED, ["larger than max"]),
]


@pytest.mark.parametrize("build,code,words", [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS])
def test_bad_call_gets_a_status_naming_the_field_and_limit(verifier, build, code, words):
    rpc, request = build(verifier.stub)
    try:
        with pytest.raises(grpc.RpcError) as e:
            getattr(verifier.stub, rpc)(request, timeout=30)
        assert e.value.code() == code, e.value.details()
        assert all(w in e.value.details() for w in words), e.value.details()
    finally:
        for sid in ("ahead", "behind", "step"):
            verifier.stub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=30)
    assert_serving(verifier)


def test_undecodable_release_and_info_then_nothing_is_left(verifier):
    raw = verifier.channel.unary_unary("/specd.v1.VerifierService/Verify", request_serializer=None,
                                       response_deserializer=None)
    for body in (b"\x0a\x02\xc3\x28\x18\x03", b"\x22\x05\x01"):   # session_id in bad UTF-8; a truncated field
        with pytest.raises(grpc.RpcError) as e:
            raw(body, timeout=30)
        assert e.value.code() == INVALID and "not a valid message" in e.value.details(), e.value.details()
    for sid in ("", "never-opened", "z" * 10_000):                  # releasing what is not there is no error
        assert not verifier.stub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=30).released
    assert verifier.stub.Info(common_pb2.InfoRequest(), timeout=30).max_model_len == MAX_LEN
    assert_serving(verifier)
    assert_idle(verifier)
    record("verifier_bad_input", {"cases": len(BAD_CALLS) + 5, "leaked_sessions": 0, "leaked_kv_blocks": 0})


# ---- random messages ---------------------------------------------------------------------------------------------
SESSION_IDS = st.one_of(st.sampled_from(["fz-0", "fz-1", "fz-2", "", "s" * 129]), st.text(min_size=1, max_size=12))


def test_random_messages_never_crash_the_verifier_nor_leak(verifier):
    codes, opened = collections.Counter(), set()
    t = time.perf_counter()

    def call(rpc, req):
        if rpc != "Release":
            opened.add(req.session_id)
        try:
            getattr(verifier.stub, rpc)(req, timeout=10)
            codes[f"{rpc}:OK"] += 1
        except grpc.RpcError as e:
            codes[f"{rpc}:{e.code().name}"] += 1
            assert e.code().name in EXPECTED_CODES, f"{rpc} {e.code().name}: {e.details()} for {req}"

    def plausible_half_the_time(req_and_flags):
        req, new_session, point_masses = req_and_flags
        if new_session:                             # new_tokens == committed_len creates a session
            req.committed_len = len(req.new_tokens)
        if point_masses:                            # a q' that passes validation: the sampler runs
            del req.draft_dists[:]
            req.draft_dists.extend(common_pb2.SparseDistribution(token_ids=[t], probs=[1.0])
                                   for t in req.draft_token_ids)
        return req

    hints = {**PLAUSIBLE_SAMPLING, "session_id": SESSION_IDS, "new_tokens": TOKENS, "token_ids": TOKENS,
             "round": st.integers(0, 3), "draft_token_ids": st.lists(st.integers(0, 127), max_size=8)}
    fuzz = dict(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))

    @settings(max_examples=600, **fuzz)
    @given(st.tuples(messages(verifier_pb2.VerifyRequest, hints=hints), st.booleans(), st.booleans())
           .map(plausible_half_the_time))
    def verify_(req):
        call("Verify", req)

    def as_prefill(req):                        # what Prefill was: round 0, every committed token, no drafts
        req.round, req.committed_len = 0, len(req.new_tokens)
        del req.draft_token_ids[:], req.draft_dists[:]
        return req

    @settings(max_examples=200, **fuzz)
    @given(messages(verifier_pb2.VerifyRequest, hints=hints).map(as_prefill))
    def prefill_(req):
        call("Verify", req)

    @settings(max_examples=100, **fuzz)
    @given(messages(verifier_pb2.ReleaseRequest, hints=hints))
    def release(req):
        call("Release", req)

    verify_(), prefill_(), release()
    assert verifier.proc.poll() is None
    for sid in opened:                      # the client's part of the protocol: release what it opened
        verifier.stub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=30)
    assert_serving(verifier)
    assert_idle(verifier)
    record("verifier_fuzz", {"examples": sum(codes.values()), "codes": dict(codes), "sessions_opened": len(opened),
                             "seconds": round(time.perf_counter() - t, 1), "leaked_kv_blocks": 0})


# ---- load: a bounded queue refuses at once -----------------------------------------------------------------------
def test_64_clients_against_a_bounded_queue_are_admitted_or_refused_at_once(verifier, folder):
    prompts = [[(31 * i + 7 * j) % 127 + 1 for j in range(600)] for i in range(8)]
    with LLM(folder, dtype="float32", kv_cache_memory_gib=0.05) as llm:
        first = [o.token_ids[0] for o in llm.generate(prompts, SamplingParams(max_tokens=1, ignore_eos=True))]
    admitted, refused, wrong, errors = [], [], [], []
    stop_at = time.monotonic() + 4.0

    def client(i):
        rng = random.Random(i)
        n = 0
        while time.monotonic() < stop_at:
            p = (i + n) % len(prompts)
            sid, n = f"load-{i}-{n}", n + 1
            t = time.perf_counter()
            try:
                reply = verifier.stub.Verify(prefill(sid, prompts[p]), timeout=60)
            except grpc.RpcError as e:
                if e.code() is grpc.StatusCode.RESOURCE_EXHAUSTED and "queue full" in e.details():
                    refused.append(time.perf_counter() - t)
                    time.sleep(rng.uniform(0.05, 0.15))             # a polite client backs off
                else:
                    errors.append(f"{e.code().name}: {e.details()}")
                continue
            admitted.append(time.perf_counter() - t)
            if reply.next_token_id != first[p]:
                wrong.append((p, reply.next_token_id, first[p]))
            verifier.stub.Release(verifier_pb2.ReleaseRequest(session_id=sid), timeout=60)

    with cf.ThreadPoolExecutor(64) as pool:
        list(pool.map(client, range(64)))
    assert not errors and not wrong, (errors[:5], wrong[:5])
    assert admitted and refused, (len(admitted), len(refused))
    assert max(refused) < 1.0                                           # refused at once, never queued
    settle_s = assert_idle(verifier)
    record("verifier_load", {"clients": 64, "max_queue": MAX_QUEUE, "admitted": len(admitted),
                             "rejected": len(refused), "admitted_latency": latency_figures(admitted),
                             "rejection_latency": latency_figures(refused), "idle_after_s": round(settle_s, 3),
                             "leaked_sessions": 0, "leaked_kv_blocks": 0})
