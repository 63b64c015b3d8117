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


def test_stubs_import_and_round_trip():
    from common.rpc.generated.specd.v1 import common_pb2, verifier_pb2
    req = verifier_pb2.VerifyRequest(session_id="s", round=3, draft_token_ids=[5, 6],
                                     draft_dists=[common_pb2.SparseDistribution(token_ids=[5], probs=[1.0])])
    assert verifier_pb2.VerifyRequest.FromString(req.SerializeToString()) == req
