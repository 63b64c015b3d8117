"""A model checkpoint's identity for shared caches: equal fingerprints mean interchangeable K/V.

Content-based, so two hosts with copies of the same checkpoint agree, and cheap, so a 70B checkpoint does not
cost a full read at start-up: config.json, every safetensors header (names, shapes, dtypes, offsets) and a
sha256 of evenly spaced 64 KiB samples of each shard's data.
"""
from __future__ import annotations

import hashlib
import struct
from pathlib import Path

_SAMPLES = 16
_SAMPLE_BYTES = 64 * 1024


def model_fingerprint_of_file(path: str | Path) -> str:
    """One weights file's identity (a GGUF), the same way: its size and evenly spaced 64 KiB samples."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(b"specd-file-v1" + struct.pack("<Q", size))
    with open(path, "rb") as f:
        for i in range(_SAMPLES):
            f.seek(max(0, size - _SAMPLE_BYTES) * i // max(1, _SAMPLES - 1))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:32]


def model_fingerprint(folder: str | Path) -> str:
    folder = Path(folder)
    h = hashlib.sha256(b"specd-model-v1")
    config = folder / "config.json"
    if config.exists():
        h.update(config.read_bytes())
    for shard in sorted(folder.glob("*.safetensors")):
        size = shard.stat().st_size
        h.update(shard.name.encode() + struct.pack("<Q", size))
        with open(shard, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            h.update(f.read(min(header_len, size)))
            data_start = 8 + header_len
            span = max(0, size - data_start - _SAMPLE_BYTES)
            for i in range(_SAMPLES):
                f.seek(data_start + span * i // max(1, _SAMPLES - 1))
                h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()[:32]
