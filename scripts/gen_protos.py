"""Generate the Python gRPC stubs from protos/ into common/rpc/generated/ (`make protos`).

protoc writes `from specd.v1 import x_pb2`; the imports are rewritten to the package's real location so the
stubs live inside `common` and need no sys.path tricks. `--check` regenerates into a temporary folder and
fails when the checked-in stubs differ (stale stubs).
"""
from __future__ import annotations

import argparse
import filecmp
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
        generate(Path(tmp))
        cmp = filecmp.dircmp(tmp, OUT)
        stale = _differences(cmp)
    if stale:
        print("stale generated stubs (run `make protos`): " + ", ".join(stale), file=sys.stderr)
        return 1
    print("generated stubs are up to date")
    return 0


def _differences(cmp: filecmp.dircmp, prefix: str = "") -> list[str]:
    out = [prefix + n for n in cmp.left_only + cmp.right_only + cmp.diff_files if not n.startswith("__pycache__")]
    for name, sub in cmp.subdirs.items():
        if name != "__pycache__":
            out += _differences(sub, f"{prefix}{name}/")
    return out


if __name__ == "__main__":
    sys.exit(main())
