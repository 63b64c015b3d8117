"""The gRPC API definition: versioned, documented, and its generated stubs never stale."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROTO_FILES = sorted((ROOT / "protos").rglob("*.proto"))
DECLARATION = re.compile(r"^\s*(message|service|rpc|oneof|enum)\s+\w+|^\s*(optional\s+|repeated\s+)?[\w.]+\s+\w+\s*=\s*\d+;")


def test_protos_live_in_a_versioned_package():
    assert PROTO_FILES, "no .proto files"
    for f in PROTO_FILES:
        assert "package specd.v1;" in f.read_text(), f"{f.name}: not in package specd.v1"
        assert f.parent.name == "v1"


@pytest.mark.parametrize("proto", PROTO_FILES, ids=lambda p: p.name)
def test_every_message_field_and_rpc_is_commented(proto):
    lines = proto.read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if DECLARATION.match(line):
            before = next((l.strip() for l in reversed(lines[:i]) if l.strip()), "")
            if not before.startswith("//"):
                undocumented.append(f"line {i + 1}: {line.strip()}")
    assert not undocumented, f"{proto.name}: declarations without a comment:\n" + "\n".join(undocumented)


def test_checked_in_stubs_are_up_to_date():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "gen_protos.py"), "--check"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _gen_protos():
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_newer_generator_version_is_not_staleness_but_a_changed_stub_is(tmp_path):
    # CI installs the newest grpcio-tools, which stamps its own version into every stub; only content counts.
    gen = _gen_protos()
    checked_in, fresh = tmp_path / "old", tmp_path / "new"
    for name in ["x_pb2_grpc.py", "x_pb2.py"]:
        text = (gen.OUT / "specd" / "v1" / name.replace("x_", "draft_")).read_text()
        (checked_in / name).parent.mkdir(exist_ok=True)
        (checked_in / name).write_text(text)
        newer = re.sub(r"GRPC_GENERATED_VERSION = '[^']+'", "GRPC_GENERATED_VERSION = '9.99.0'", text)
        newer = re.sub(r"# Protobuf Python Version: \S+", "# Protobuf Python Version: 9.98.7", newer)
        newer = re.sub(r"(Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,", r"\1\n    9,\n    98,\n    7,", newer)
        assert newer != text, f"{name}: no version stamp found to vary"
        (fresh / name).parent.mkdir(exist_ok=True)
        (fresh / name).write_text(newer)
    assert gen._differences(fresh, checked_in) == []
    (fresh / "x_pb2_grpc.py").write_text((fresh / "x_pb2_grpc.py").read_text().replace("def Propose", "def Propos"))
    (fresh / "extra_pb2.py").write_text("")
    assert gen._differences(fresh, checked_in) == ["extra_pb2.py", "x_pb2_grpc.py"]


def test_stubs_import_and_round_trip():
    from common.rpc.generated.specd.v1 import common_pb2, verifier_pb2
    req = verifier_pb2.VerifyRequest(session_id="s", round=3, draft_token_ids=[5, 6],
                                     draft_dists=[common_pb2.SparseDistribution(token_ids=[5], probs=[1.0])])
    assert verifier_pb2.VerifyRequest.FromString(req.SerializeToString()) == req
