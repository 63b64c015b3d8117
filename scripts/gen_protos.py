"""Generate the Python gRPC stubs from protos/ into common/rpc/generated/ (`make protos`).

protoc writes `from specd.v1 import x_pb2`; the imports are rewritten to the package's real location so the
stubs live inside `common` and need no sys.path tricks. `--check` regenerates into a temporary folder and
fails when the checked-in stubs differ (stale stubs). The generator's own version stamps (`GRPC_GENERATED_VERSION`,
the protobuf gencode version) are left out of that comparison: a newer grpcio-tools than the one that wrote the
stubs is not staleness, and pyproject's lower bounds keep the runtime at or above the stamped versions.
"""
from __future__ import annotations

import argparse
import re
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTOS = ROOT / "protos"
OUT = ROOT / "common" / "rpc" / "generated"
PACKAGE = "common.rpc.generated"


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc
    import grpc_tools
    sources = sorted(str(p.relative_to(PROTOS)) for p in PROTOS.rglob("*.proto"))
    out.mkdir(parents=True, exist_ok=True)
    include = Path(grpc_tools.__file__).parent / "_proto"
    rc = protoc.main(["protoc", f"-I{PROTOS}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                      f"--grpc_python_out={out}", *sources])
    if rc != 0:
        raise SystemExit(f"protoc failed (exit {rc})")
    files = sorted(out.rglob("*.py")) + sorted(out.rglob("*.pyi"))
    for f in files:
        text = re.sub(r"^from specd\.v1 import", f"from {PACKAGE}.specd.v1 import", f.read_text(), flags=re.M)
        f.write_text(text)
    for d in [out, *[p for p in out.rglob("*") if p.is_dir()]]:
        (d / "__init__.py").touch()
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--check", action="store_true", help="fail if the checked-in stubs are stale")
    args = ap.parse_args(argv)
    if not args.check:
        shutil.rmtree(OUT, ignore_errors=True)
        files = generate(OUT)
        print(f"generated {len(files)} files in {OUT.relative_to(ROOT)}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh)
        stale = _differences(fresh, OUT)
    if stale:
        print("stale generated stubs (run `make protos`): " + ", ".join(stale), file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


# Lines that name the generator's version, not the content: `GRPC_GENERATED_VERSION = '1.85.1'`,
# `# Protobuf Python Version: 7.35.1` and the major/minor/patch arguments of ValidateProtobufRuntimeVersion.
_VERSION_STAMPS = [
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.M),
    re.compile(r"^# Protobuf Python Version: .*$", re.M),
    re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.\w+,)\s*\d+,\s*\d+,\s*\d+,", re.M),
]


def _content(path: Path) -> str:
    text = path.read_text()
    for stamp in _VERSION_STAMPS:
        text = stamp.sub(lambda m: (m.group(1) if m.groups() else "") + "<version>", text)
    return text


def _differences(fresh: Path, checked_in: Path) -> list[str]:
    def listing(root: Path) -> set[str]:
        return {str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and "__pycache__" not in p.parts}
    new, old = listing(fresh), listing(checked_in)
    return sorted((new ^ old) | {n for n in new & old if _content(fresh / n) != _content(checked_in / n)})


if __name__ == "__main__":
    sys.exit(main())
