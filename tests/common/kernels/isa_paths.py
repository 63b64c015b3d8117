"""The instruction paths a kernel runs on this processor, for tests that run each: its own ("native"), plus "avx2"
(pinned with the kernel's `force_avx2`) where the processor runs a wider AVX-512 path too."""
from __future__ import annotations

import contextlib


def isa_paths(kernel) -> list[str]:
    return ["native", "avx2"] if kernel.available() and kernel.isa() != "avx2" else ["native"]


@contextlib.contextmanager
def on_path(kernel, path: str):
    kernel.force_avx2(path == "avx2")
    try:
        yield path
    finally:
        kernel.force_avx2(False)
