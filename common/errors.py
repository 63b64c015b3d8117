"""Errors a user can act on, by type: the services map each type to a gRPC status code (common/rpc/errors.py).

Each type also names itself on the wire with a stable `reason` (sent as the `specd-reason` trailing metadata of a
failed call, like google.rpc.ErrorInfo.reason), so a caller can tell errors that share a status code apart: the
gateway re-prefills a session on ROUND_MISMATCH, not on every FAILED_PRECONDITION.
"""


class SpecdError(Exception):
    """Base of every error specd raises on purpose."""
    reason = "SPECD_ERROR"


class CheckpointError(SpecdError):
    """A model folder is missing, incomplete or corrupt."""
    reason = "CHECKPOINT"


class UnsupportedModelError(SpecdError):
    """The checkpoint's architecture is not one the engine implements."""
    reason = "UNSUPPORTED_MODEL"


class ConfigError(SpecdError, ValueError):
    """A setting is out of range or inconsistent with the model."""
    reason = "INVALID_CONFIG"


class SequenceTooLongError(SpecdError, ValueError):
    """A sequence would grow past the model's maximum length."""
    reason = "SEQUENCE_TOO_LONG"


class KVCacheExhaustedError(SpecdError):
    """The paged KV cache has no free block left for a request."""
    reason = "KV_CACHE_EXHAUSTED"


# ---- service errors: each carries its gRPC status by type (common/rpc/errors.py::status_for) ----------------
class QueueFullError(SpecdError):
    """A service's work queue is at its bound: the caller should back off (RESOURCE_EXHAUSTED)."""
    reason = "QUEUE_FULL"


class EngineStoppedError(SpecdError):
    """The engine thread is shutting down: the call never ran; retry on another replica (UNAVAILABLE)."""
    reason = "ENGINE_STOPPED"


class UnknownSessionError(SpecdError):
    """The session does not exist here (never created, released, expired, or the verifier restarted): NOT_FOUND."""
    reason = "SESSION_NOT_FOUND"


class RoundMismatchError(SpecdError):
    """A Verify whose round or committed length does not follow the session's state (FAILED_PRECONDITION)."""
    reason = "ROUND_MISMATCH"

    def __init__(self, message: str, expected_round: int):
        super().__init__(message)
        self.expected_round = expected_round


class TokenizerMismatchError(SpecdError, RuntimeError):
    """Draft, verifier and gateway must share one tokenizer, or token ids mean different things."""
    reason = "TOKENIZER_MISMATCH"
