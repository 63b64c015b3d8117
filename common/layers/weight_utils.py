"""Copying checkpoint tensors (or lazy safetensors slices) into parameter shards, with shape checks."""
from __future__ import annotations

import torch

from common.errors import CheckpointError


def shape_of(loaded) -> tuple[int, ...]:
    """Shape of a torch tensor or of a lazy safetensors slice (which reads nothing until indexed)."""
    return tuple(loaded.shape) if isinstance(loaded, torch.Tensor) else tuple(loaded.get_shape())


def copy_into(dst: torch.Tensor, src: torch.Tensor, what: str) -> None:
    if tuple(dst.shape) != tuple(src.shape):
        raise CheckpointError(f"{what}: checkpoint shard has shape {tuple(src.shape)}, "
                              f"the model expects {tuple(dst.shape)}")
    dst.copy_(src.to(dtype=dst.dtype))


def default_weight_loader(param: torch.nn.Parameter, loaded, shard_id=None) -> None:
    """A replicated parameter: every rank holds the whole tensor."""
    copy_into(param.data, loaded[...] if not isinstance(loaded, torch.Tensor) else loaded,
              getattr(param, "hf_name", "parameter"))


def narrow_rows(loaded, start: int, size: int) -> torch.Tensor:
    """Rows [start, start+size) of a tensor/slice; only those bytes are read from disk."""
    return loaded[start:start + size]


def narrow_cols(loaded, start: int, size: int) -> torch.Tensor:
    return loaded[:, start:start + size]
