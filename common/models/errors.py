"""The error a model fetch step raises: its own module, so the fetcher and the GGUF converter need not import each
other."""
from __future__ import annotations


class ModelFetchError(RuntimeError):
    """A fetch step failed in a way the user can act on (network, corrupt wheel, wrong checksum)."""
