"""The round loop over several verifier replicas (fakes): a session stays on its replica; when that replica fails,
the session moves to another, re-prefilled from the gateway's history, and the output is what one healthy verifier
gives; with nowhere to move, the failure is the caller's, as with one verifier."""
import grpc
import pytest
from prometheus_client import REGISTRY

from gateway.verifier_pool import Replica, VerifierPool
from tests.gateway.fake_stubs import FakeDraft, FakeVerifier
from tests.gateway.round_harness import collect, request, runner

Code = grpc.StatusCode


def pool_of(*stubs) -> VerifierPool:
    pool = VerifierPool(targets=[], connect=lambda a, h: (None, None))
    for i, stub in enumerate(stubs):
        pool.replicas[f"v{i}:1"] = Replica(f"v{i}:1", stub, checked=True)
    return pool


def _moves() -> float:
    return sum(REGISTRY.get_sample_value("specd_verifier_session_moves_total", {"reason": c}) or 0.0
               for c in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "CANCELLED"))


def _expected(max_tokens=16) -> list[int]:
    r = request(max_tokens=max_tokens)
    collect(runner(FakeVerifier(), FakeDraft()), r)
    return r.output_ids


@pytest.mark.parametrize("code", [Code.UNAVAILABLE, Code.DEADLINE_EXCEEDED])
def test_a_session_whose_replica_fails_moves_and_the_output_is_unchanged(code):
    first, second = FakeVerifier(faults={2: code}), FakeVerifier()
    pool = pool_of(first, second)
    moves = _moves()
    r = request(max_tokens=16)
    collect(runner(pool, FakeDraft()), r)
    assert r.output_ids == _expected()
    assert len(first.answered) == 2                               # rounds 0 and 1 there, round 2 failed
    moved = second.requests[0]
    assert moved.round == 2 and len(moved.new_tokens) == moved.committed_len    # re-prefilled from history
    assert moved.session_id != first.requests[0].session_id
    assert _moves() - moves == 1
    assert not pool.replicas["v0:1"].healthy and pool.replicas["v0:1"].pinned == 0
    assert pool.replicas["v1:1"].pinned == 0                      # unpinned when the request ended
    assert second.released == [moved.session_id]
    if code is Code.DEADLINE_EXCEEDED:                            # maybe alive: its copy is released in passing
        assert first.released == [first.requests[0].session_id]


def test_new_sessions_avoid_a_failed_replica_and_pins_spread_them():
    first, second = FakeVerifier(faults={0: Code.UNAVAILABLE}), FakeVerifier()
    pool = pool_of(first, second)
    run = runner(pool, FakeDraft())
    collect(run, request(max_tokens=4))                          # moves to the second at once
    assert len(first.answered) == 0 and len(second.answered) > 0
    before = len(second.answered)
    collect(run, request(max_tokens=4))
    assert len(first.requests) == 1 and len(second.answered) > before


def test_with_one_replica_a_failure_is_the_callers():
    lone = FakeVerifier(faults={1: Code.UNAVAILABLE})
    with pytest.raises(grpc.aio.AioRpcError) as e:
        collect(runner(pool_of(lone), FakeDraft()), request(max_tokens=16))
    assert e.value.code() is Code.UNAVAILABLE


def test_no_replica_ever_checked_is_unavailable_naming_them():
    pool = pool_of(FakeVerifier())
    pool.replicas["v0:1"].checked = False                       # never answered Info (or serves another model)
    with pytest.raises(grpc.aio.AioRpcError) as e:
        collect(runner(pool, FakeDraft()), request(max_tokens=4))
    assert e.value.code() is Code.UNAVAILABLE and "v0:1" in e.value.details()
