"""Engine exceptions map to gRPC status codes by type: one table, specific types before their bases."""
import grpc
import pytest

from common.errors import (CheckpointError, ConfigError, EngineStoppedError, KVCacheExhaustedError, QueueFullError,
                           RoundMismatchError, SequenceTooLongError, SpecdError, TokenizerMismatchError,
                           UnknownSessionError)
from common.rpc.errors import status_for

S = grpc.StatusCode


@pytest.mark.parametrize("exc,code", [
    (RoundMismatchError("round=5 but the session expects round 1", 1), S.FAILED_PRECONDITION),
    (TokenizerMismatchError("fingerprints differ"), S.FAILED_PRECONDITION),
    (UnknownSessionError("gone"), S.NOT_FOUND),
    (QueueFullError("verify queue full"), S.RESOURCE_EXHAUSTED),
    (KVCacheExhaustedError("no block left"), S.RESOURCE_EXHAUSTED),
    (EngineStoppedError("shutting down"), S.UNAVAILABLE),
    (SequenceTooLongError("too long"), S.INVALID_ARGUMENT),
    (ConfigError("k_max=99"), S.INVALID_ARGUMENT),
    (ValueError("new_tokens: empty"), S.INVALID_ARGUMENT),
    (TimeoutError(), S.DEADLINE_EXCEEDED),
    (CheckpointError("missing shard"), S.FAILED_PRECONDITION),
    (SpecdError("anything else on purpose"), S.FAILED_PRECONDITION),
    (KeyError("a bug"), S.INTERNAL),
])
def test_status_for_maps_by_type(exc, code):
    assert status_for(exc) is code


def test_a_subclass_keeps_its_base_code_whatever_its_name():
    class PoolQueueFullError(ValueError):          # the name alone no longer decides anything
        pass

    class ReplicaQueueFull(QueueFullError):
        pass
    assert status_for(PoolQueueFullError()) is S.INVALID_ARGUMENT
    assert status_for(ReplicaQueueFull()) is S.RESOURCE_EXHAUSTED
    assert isinstance(RoundMismatchError("x", 3), SpecdError) and RoundMismatchError("x", 3).expected_round == 3
