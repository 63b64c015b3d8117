"""Build and load one of specd's C++ kernels (torch.utils.cpp_extension, cached per machine), or say why not."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path


@lru_cache(maxsize=None)
def load_extension(name: str, source: Path, cpu_flag: str):
    """(module, None) once `source` builds and the processor has `cpu_flag` (a /proc/cpuinfo flag) and the
    module's own `supported()` agrees; else (None, reason)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and cpu_flag not in cpuinfo.read_text().split():      # don't compile for nothing
        return None, f"the processor lacks {cpu_flag}"
    try:
        from torch.utils.cpp_extension import load
        module = load(name, [str(source)], extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                      verbose=False)
    except Exception as e:                              # no compiler, no ninja, a failed build: say so
        text = str(e).strip()
        return None, f"building {source.name} failed: {text.splitlines()[-1] if text else repr(e)}"
    if not module.supported():
        return None, f"the processor lacks {cpu_flag}"
    return module, None
