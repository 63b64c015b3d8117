"""Build and load one of specd's C++ kernels (torch.utils.cpp_extension, cached per machine), or say why not."""
from __future__ import annotations

import hashlib
import os
import shutil
from functools import lru_cache
from pathlib import Path


def _ninja_on_path() -> None:
    """torch's extension builder runs `ninja` from PATH; a venv's pip-installed ninja is not on it unless the venv
    is activated (`.venv/bin/python -m pytest`), so put that one there."""
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def _cflags(source: Path) -> list[str]:
    # -ffp-contract=off: `a * b - c * d` written as separate multiplies stays separate roundings (torch's numbers,
    # common/kernels/layer_ops.cpp), not an FMA. torch rebuilds an extension when its source or flags change, not
    # its headers: the headers' digest is one of the flags.
    headers = hashlib.sha256(b"".join(h.read_bytes() for h in sorted(source.parent.glob("*.h")))).hexdigest()[:16]
    return ["-O3", "-fopenmp", "-ffp-contract=off", f"-DSPECD_KERNEL_HEADERS={headers}"]


@lru_cache(maxsize=None)
def load_extension(name: str, source: Path, cpu_flag: str):
    """(module, None) once `source` builds and the processor has `cpu_flag` (a /proc/cpuinfo flag) and the
    module's own `supported()` agrees; else (None, reason)."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and cpu_flag not in cpuinfo.read_text().split():      # don't compile for nothing
        return None, f"the processor lacks {cpu_flag}"
    _ninja_on_path()
    try:
        from torch.utils.cpp_extension import load
        module = load(name, [str(source)], extra_cflags=_cflags(source), extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:                              # no compiler, no ninja, a failed build: say so
        text = str(e).strip()
        return None, f"building {source.name} failed: {text.splitlines()[-1] if text else repr(e)}"
    if not module.supported():
        return None, f"the processor lacks {cpu_flag}"
    return module, None


def status_line(source: Path, loaded) -> str:
    """What `python -m common.kernels.<kernel>` prints: whether `source` built and runs here, or why not."""
    module, reason = loaded
    return f"{source.name}: " + ("built and runs on this processor" if module is not None else f"unavailable: {reason}")
