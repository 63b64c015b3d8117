"""Load a Hugging Face safetensors folder into a (tensor-parallel) model: each rank reads only its slices."""
from __future__ import annotations

from pathlib import Path

from safetensors import safe_open
from safetensors import SafetensorError
from torch import nn

from common.errors import CheckpointError
from common.layers.weight_utils import default_weight_loader

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
# The file is memory-mapped; every page read stays resident (and counted in RSS) until it is unmapped, so the
# mapping is renewed after this many bytes: peak memory stays near the model's size, not twice it.
_REMAP_BYTES = 256 << 20


def safetensors_files(path: str | Path) -> list[Path]:
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{str(path)!r} holds no *.safetensors file (a Hugging Face folder is expected; "
                              "run `make models` for the shipped pair)")
    return files


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Fill every parameter of `model` from the checkpoint; raise CheckpointError naming what is missing."""
    params = dict(model.named_parameters())          # tied parameters appear once
    packed = getattr(model, "packed_modules_mapping", {})
    loaded: set[tuple[str, object]] = set()
    for file in safetensors_files(path):
        try:
            for tensor, hf_name in _tensor_slices(file):
                if hf_name.endswith(_IGNORED_SUFFIXES):
                    continue
                target, shard_id = _map_name(hf_name, packed)
                param = params.get(target)
                if param is None:
                    if target == "lm_head.weight" and "lm_head.weight" not in params:
                        continue                           # tied head: the embedding serves as the head
                    raise CheckpointError(f"{file.name}: tensor {hf_name!r} has no place in "
                                          f"{type(model).__name__} (wrong architecture in config.json?)")
                weight_loader = getattr(param, "weight_loader", default_weight_loader)
                param.hf_name = hf_name
                try:
                    weight_loader(param, tensor, shard_id)
                except CheckpointError as e:
                    raise CheckpointError(f"{file.name}: {hf_name}: {e}") from None
                loaded.add((target, shard_id))
        except SafetensorError as e:
            raise CheckpointError(f"{file} is not a readable safetensors file: {e}") from e
    missing = [f"{name}[{shard}]" if shard is not None else name
               for name, param in params.items()
               for shard in getattr(param, "shard_ids", (None,))
               if (name, shard) not in loaded]
    if missing:
        shown = ", ".join(missing[:8]) + (f" … (+{len(missing) - 8} more)" if len(missing) > 8 else "")
        raise CheckpointError(f"{path}: checkpoint is incomplete, missing {len(missing)} tensor(s): {shown}")


_DTYPE_BYTES = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1, "BOOL": 1}


def _tensor_slices(file: Path):
    """Yield (lazy slice, name) for every tensor of `file`, renewing the mapping every _REMAP_BYTES."""
    with safe_open(str(file), framework="pt", device="cpu") as f:
        names = list(f.keys())
    handle, mapped = None, 0
    for name in names:
        if handle is None or mapped > _REMAP_BYTES:
            handle, mapped = safe_open(str(file), framework="pt", device="cpu"), 0   # the old one unmaps
        tensor = handle.get_slice(name)
        numel = 1
        for d in tensor.get_shape():
            numel *= d
        mapped += numel * _DTYPE_BYTES.get(tensor.get_dtype(), 4)
        yield tensor, name


def _map_name(hf_name: str, packed: dict[str, tuple[str, object]]) -> tuple[str, object]:
    for fragment, (fused, shard_id) in packed.items():
        if f".{fragment}." in hf_name:
            return hf_name.replace(f".{fragment}.", f".{fused}."), shard_id
    return hf_name, None
