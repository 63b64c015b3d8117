"""The verifier pool's routing decisions, over fake replicas: least loaded first, pins counted until the next report,
unhealthy / draining / mismatched replicas skipped, membership following name resolution."""
import asyncio

import grpc
import pytest

from common.rpc.generated.specd.v1 import common_pb2, verifier_pb2
from gateway.verifier_pool import NoReplicaError, VerifierPool, split_targets


class FakeReplica:
    """Info / Load of one verifier replica, with switches for failures."""

    def __init__(self, sessions=0, waiting=0, queue=0, free=100, total=100, draining=False, fingerprint="fp",
                 v1_2=False):
        self.load = verifier_pb2.LoadReply(sessions=sessions, waiting_sessions=waiting, queue_depth=queue,
                                           free_kv_blocks=free, total_kv_blocks=total, draining=draining)
        self.fingerprint, self.v1_2, self.down = fingerprint, v1_2, False
        self.closed = False

    def _check(self):
        if self.down:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "connection refused")

    async def Info(self, request, timeout=None):
        self._check()
        return common_pb2.ModelInfo(vocab_fingerprint=self.fingerprint)

    async def Load(self, request, timeout=None):
        self._check()
        if self.v1_2:
            raise grpc.aio.AioRpcError(grpc.StatusCode.UNIMPLEMENTED, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                       "Method not found!")
        return self.load

    async def close(self):
        self.closed = True


def _pool(replicas: dict[str, FakeReplica], names: dict[str, list[str]] | None = None) -> VerifierPool:
    names = names if names is not None else {"verifier:1": list(replicas)}

    async def resolve(target):
        if target not in names:
            raise OSError("name not known")
        return list(names[target])
    return VerifierPool(targets=list(names), connect=lambda a, h: (replicas[a], replicas[a]), fingerprint="fp",
                        _resolve=resolve)


def _run(coro):
    return asyncio.run(coro)


def test_a_new_session_goes_to_the_least_loaded_replica_and_pins_count_until_the_next_report():
    reps = {"a:1": FakeReplica(sessions=3), "b:1": FakeReplica(sessions=1), "c:1": FakeReplica(sessions=2)}
    pool = _pool(reps)

    async def main():
        await pool.refresh()
        order = [pool.pick().address for _ in range(6)]
        return order
    order = _run(main())
    # b (1) first; then b (2, counting our pin) ties c (2): either; all three used once the pins add up
    assert order[0] == "b:1"
    assert set(order) == {"a:1", "b:1", "c:1"}
    assert sum(a == "a:1" for a in order) == 1                  # a started 2 above b: it got the fewest


def test_free_kv_blocks_break_a_tie():
    reps = {"a:1": FakeReplica(sessions=1, free=10), "b:1": FakeReplica(sessions=1, free=90)}
    pool = _pool(reps)
    _run(pool.refresh())
    assert pool.pick().address == "b:1"


def test_unhealthy_draining_and_mismatched_replicas_get_no_new_sessions():
    reps = {"a:1": FakeReplica(), "b:1": FakeReplica(draining=True), "c:1": FakeReplica(fingerprint="other"),
            "d:1": FakeReplica()}
    reps["d:1"].down = True
    pool = _pool(reps)
    _run(pool.refresh())
    assert {pool.pick().address for _ in range(5)} == {"a:1"}
    assert pool.healthy_count() == 1
    reps["d:1"].down = False                                    # it comes back: the next refresh sees it
    reps["a:1"].load.sessions = 5                               # a reports the 5 sessions routed to it
    _run(pool.refresh())
    assert pool.healthy_count() == 2 and pool.pick().address == "d:1"


def test_a_failed_replica_takes_no_sessions_until_a_refresh_answers():
    reps = {"a:1": FakeReplica(), "b:1": FakeReplica(sessions=5)}
    pool = _pool(reps)
    _run(pool.refresh())
    a = pool.pick()
    assert a.address == "a:1"
    err = grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(), grpc.aio.Metadata(), "gone")
    pool.failed(a, err)
    assert pool.can_move(a)
    moved = pool.pick(exclude=a)
    assert moved.address == "b:1"
    pool.unpin(a)
    assert pool.pick().address == "b:1"
    _run(pool.refresh())                                        # it answers again
    assert pool.replicas["a:1"].healthy


def test_with_none_healthy_a_replica_known_good_before_is_tried():
    reps = {"a:1": FakeReplica()}
    pool = _pool(reps)
    _run(pool.refresh())
    reps["a:1"].down = True                                     # restarting: its channel reconnects by itself
    _run(pool.refresh())
    assert pool.healthy_count() == 0 and pool.pick().address == "a:1"


def test_no_healthy_replica_is_an_error_naming_the_replicas():
    reps = {"a:1": FakeReplica()}
    reps["a:1"].down = True
    pool = _pool(reps)
    _run(pool.refresh())
    with pytest.raises(NoReplicaError, match="a:1"):
        pool.pick()


def test_a_pre_v1_3_replica_is_routed_by_our_own_session_count():
    reps = {"a:1": FakeReplica(v1_2=True), "b:1": FakeReplica(v1_2=True)}
    pool = _pool(reps)
    _run(pool.refresh())
    picks = [pool.pick().address for _ in range(4)]
    assert sorted(picks) == ["a:1", "a:1", "b:1", "b:1"]


def test_membership_follows_resolution_and_a_vanished_replica_closes_once_empty():
    reps = {"a:1": FakeReplica(), "b:1": FakeReplica(), "c:1": FakeReplica()}
    names = {"verifier:1": ["a:1", "b:1"]}
    pool = _pool(reps, names)
    _run(pool.refresh())
    assert sorted(pool.replicas) == ["a:1", "b:1"]
    held = pool.pick()                                          # a session stays on its replica
    names["verifier:1"] = [a for a in ("a:1", "b:1") if a != held.address] + ["c:1"]
    _run(pool.refresh())
    assert "c:1" in pool.replicas and held.gone and held.address in pool.replicas
    assert all(pool.pick().address != held.address for _ in range(4))
    pool.unpin(held)
    _run(pool.refresh())
    assert held.address not in pool.replicas and reps[held.address].closed


def test_a_name_that_stops_resolving_keeps_its_known_replicas():
    reps = {"a:1": FakeReplica()}
    names = {"verifier:1": ["a:1"]}
    pool = _pool(reps, names)
    _run(pool.refresh())
    del names["verifier:1"]
    _run(pool.refresh())
    assert pool.pick().address == "a:1"


def test_split_targets_names_the_bad_entry():
    assert split_targets("a:1, b:2") == ["a:1", "b:2"]
    with pytest.raises(ValueError, match="'nohost'"):
        split_targets("a:1,nohost")
