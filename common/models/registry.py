"""Architecture name (config.json `architectures`) -> model class."""
from __future__ import annotations

from common.config import SUPPORTED_ARCHITECTURES
from common.errors import UnsupportedModelError
from common.models.llama_family import LlamaFamilyForCausalLM


def model_class(architecture: str):
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"architecture {architecture!r} is not supported; "
                                    f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return LlamaFamilyForCausalLM
