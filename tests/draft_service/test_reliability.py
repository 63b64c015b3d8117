"""The draft service under bad and random input (a real process on loopback, tiny checkpoint), and its drafting
thread when callers give up: every bad request gets INVALID_ARGUMENT naming the field and the limit, no input
makes it answer INTERNAL or fall over, and it keeps serving the next valid request."""
import collections
import math
import time

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.rpc.generated.specd.v1 import common_pb2, draft_pb2, draft_pb2_grpc
from common.speculative.params import SamplingParams
from draft_service.drafter import Drafter
from tests.checkpoints import build_model_folder
from tests.reliability import EXPECTED_CODES, PLAUSIBLE_SAMPLING, TOKENS, ServiceProcess, messages, record
from tests.draft_service.propose_gate import ProposeGate

MAX_LEN = 1024
VALID = draft_pb2.ProposeRequest(request_id="valid", context_token_ids=[5, 9, 2], k=3)
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("draft-reliability") / "draft", seed=31,
                                  max_position_embeddings=MAX_LEN))


@pytest.fixture(scope="module")
def draft(folder, tmp_path_factory):
    svc = ServiceProcess("draft", folder, tmp_path_factory.mktemp("draft-logs")).wait_serving()
    svc.channel = grpc.insecure_channel(svc.address, options=[("grpc.max_send_message_length", 64 << 20)])
    svc.stub = draft_pb2_grpc.DraftServiceStub(svc.channel)
    yield svc
    svc.channel.close()
    svc.stop()


def assert_serving(draft):
    assert len(draft.stub.Propose(VALID, timeout=30).token_ids) == VALID.k
    assert draft.proc.poll() is None


def sampling(**kw):
    return common_pb2.SamplingParams(**kw)


# (name, fields replacing VALID's, words the message must hold)
BAD_PROPOSALS = [
    ("empty context", dict(context_token_ids=[]), ["context_token_ids: empty"]),
    ("k=0", dict(k=0), ["k=0", "[1, 8]"]),
    ("k above k_max", dict(k=9), ["k=9", "[1, 8]"]),
    ("negative k", dict(k=-1), ["k=-1", "[1, 8]"]),
    ("token id = vocab size", dict(context_token_ids=[5, 128]), ["context_token_ids", "[0, 128)"]),
    ("negative token id", dict(context_token_ids=[-1, 5]), ["context_token_ids", "[0, 128)"]),
    ("past the context limit", dict(context_token_ids=[1] * 1020, k=8), ["1020 tokens", "max_model_len=1024"]),
    ("NaN temperature", dict(sampling=sampling(temperature=math.nan)), ["temperature=nan"]),
    ("negative temperature", dict(sampling=sampling(temperature=-1.0)), ["temperature=-1.0", "[1e-05, 100]"]),
    ("temperature that overflows logits", dict(sampling=sampling(temperature=1e-38)), ["temperature=", "1e-05"]),
    ("huge temperature", dict(sampling=sampling(temperature=1e9)), ["temperature=1000000000.0", "100]"]),
    ("top_p above 1", dict(sampling=sampling(temperature=1.0, top_p=1.5)), ["top_p=1.5", "(0, 1]"]),
    ("negative top_p", dict(sampling=sampling(temperature=1.0, top_p=-0.5)), ["top_p=-0.5", "(0, 1]"]),
    ("NaN top_p", dict(sampling=sampling(temperature=1.0, top_p=math.nan)), ["top_p=nan"]),
    ("min_p = 1", dict(sampling=sampling(temperature=1.0, min_p=1.0)), ["min_p=1.0", "[0, 1)"]),
    ("negative top_k", dict(sampling=sampling(temperature=1.0, top_k=-3)), ["top_k=-3", ">= 0"]),
    ("seed past 2^63", dict(sampling=sampling(temperature=1.0, seed=2**63)), ["seed=", "2^63"]),
    ("request id too long", dict(request_id="r" * 200), ["request_id: 200 characters", "128"]),
]


@pytest.mark.parametrize("fields,words", [c[1:] for c in BAD_PROPOSALS], ids=[c[0] for c in BAD_PROPOSALS])
def test_bad_proposal_is_invalid_argument_naming_the_field_and_limit(draft, fields, words):
    req = draft_pb2.ProposeRequest()
    req.CopyFrom(VALID)
    for name, value in fields.items():
        if isinstance(value, list):
            del getattr(req, name)[:]
            getattr(req, name).extend(value)
        elif name == "sampling":
            req.sampling.CopyFrom(value)
        else:
            setattr(req, name, value)
    with pytest.raises(grpc.RpcError) as e:
        draft.stub.Propose(req, timeout=30)
    assert e.value.code() == INVALID, e.value.details()
    assert all(w in e.value.details() for w in words), e.value.details()
    assert_serving(draft)


def test_oversized_and_undecodable_messages_are_refused_by_name(draft):
    with pytest.raises(grpc.RpcError) as e:                       # past the 16 MiB message limit
        draft.stub.Propose(draft_pb2.ProposeRequest(request_id="x" * (17 << 20), context_token_ids=[1], k=1),
                           timeout=30)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in e.value.details()
    raw = draft.channel.unary_unary("/specd.v1.DraftService/Propose", request_serializer=None,
                                    response_deserializer=None)
    for body in (b"\x0a\x02\xff\xfe\x18\x02", b"\xff\xff\xff\xff"):  # request_id in bad UTF-8; corrupt wire
        with pytest.raises(grpc.RpcError) as e:
            raw(body, timeout=30)
        assert e.value.code() == INVALID and "not a valid message" in e.value.details(), e.value.details()
    assert_serving(draft)
    record("draft_bad_input", {"cases": len(BAD_PROPOSALS) + 3, "service_alive": draft.proc.poll() is None})


def test_random_messages_never_crash_the_draft_service(draft):
    codes = collections.Counter()
    t = time.perf_counter()

    hints = {**PLAUSIBLE_SAMPLING, "context_token_ids": TOKENS, "k": st.integers(1, 8),
             "request_id": st.sampled_from(["fz-0", "fz-1", "fz-2"])}

    @settings(max_examples=500, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(messages(draft_pb2.ProposeRequest, hints=hints))
    def propose(req):
        try:
            draft.stub.Propose(req, timeout=10)
            codes["OK"] += 1
        except grpc.RpcError as e:
            codes[e.code().name] += 1
            assert e.code().name in EXPECTED_CODES, f"{e.code().name}: {e.details()} for {req}"

    propose()
    draft.stub.Info(common_pb2.InfoRequest(), timeout=10)
    assert_serving(draft)
    assert draft.scrape()["specd_draft_queue_depth"] == 0
    record("draft_fuzz", {"examples": sum(codes.values()), "codes": dict(codes),
                          "seconds": round(time.perf_counter() - t, 1), "service_alive": True})


def test_a_proposal_whose_caller_gave_up_does_not_stop_the_drafter(folder):
    """A caller past its deadline cancels its future while the call waits in the queue; the drafting thread must
    skip it (setting a result on a cancelled future raised InvalidStateError and ended the thread)."""
    runner = ModelRunner(EngineConfig(model=folder, dtype="float32", num_kv_blocks=128, max_num_seqs=16))
    d = Drafter(runner, k_max=8)
    gate = ProposeGate(d)
    try:
        busy = d.submit("busy", [1, 2, 3], 2, SamplingParams(), 0)
        gate.wait_entered()
        abandoned = d.submit("gone", [4, 5, 6], 2, SamplingParams(), 0)
        assert abandoned.cancel()                              # what grpc does when the RPC is cancelled
        gate.release()
        busy.result(30)
        after = d.propose("next", [7, 8, 9], 3, SamplingParams(), 0, timeout=30)
        assert len(after.proposal.token_ids) == 3
    finally:
        gate.release()
        d.shutdown()


def test_a_batch_of_new_requests_fits_beside_a_full_soft_cache(folder):
    """Under load the cache is full (max_cached_sequences) when a batch brings several new requests: room is made
    before drafting (the runner, sized max_cached_sequences + 1, refused 'too many sequences')."""
    runner = ModelRunner(EngineConfig(model=folder, dtype="float32", num_kv_blocks=128, max_num_seqs=5))
    d = Drafter(runner, k_max=8, max_cached_sequences=4)
    for i in range(4):
        d.propose(f"cached-{i}", [i + 1, 2, 3], 2, SamplingParams(), 0, timeout=30)
    gate = ProposeGate(d)
    try:
        first = d.submit("new-0", [9, 9, 9], 2, SamplingParams(), 0)
        gate.wait_entered()
        batch = [d.submit(f"new-{i}", [i, 5, 7], 3, SamplingParams(), 0) for i in range(1, 4)]
        gate.release()
        assert len(first.result(30).proposal.token_ids) == 2
        assert [len(f.result(30).proposal.token_ids) for f in batch] == [3, 3, 3]
        assert max(d.batch_sizes) == 3 and d.cached_sequences <= 4
    finally:
        gate.release()
        d.shutdown()
