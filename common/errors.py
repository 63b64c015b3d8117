"""Engine errors a user can act on; the services map them to gRPC status codes."""


class SpecdError(Exception):
    """Base of every error specd raises on purpose."""


class CheckpointError(SpecdError):
    """A model folder is missing, incomplete or corrupt."""


class UnsupportedModelError(SpecdError):
    """The checkpoint's architecture is not one the engine implements."""


class ConfigError(SpecdError, ValueError):
    """A setting is out of range or inconsistent with the model."""


class SequenceTooLongError(SpecdError, ValueError):
    """A sequence would grow past the model's maximum length."""


class KVCacheExhaustedError(SpecdError):
    """The paged KV cache has no free block left for a request."""
