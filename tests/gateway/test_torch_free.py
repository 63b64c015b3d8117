"""The gateway process does no tensor math: serving a request must not load torch (nor transformers, which loads it).

A real topology on loopback (tiny checkpoints); the gateway's memory map is read while it serves.
"""
from pathlib import Path

import openai
import pytest

from common.distributed import free_port
from gateway.client import SpecdClient
from scripts.dev.topology import LocalTopology
from tests.checkpoints import build_model_folder, perturbed_copy


def _mapped_libraries(pid: int) -> set[str]:
    return {Path(line.split()[-1]).name for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if line.split()[-1].endswith(".so") or ".so." in line.split()[-1]}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_gateway_serves_without_loading_torch(tmp_path):
    target = build_model_folder(tmp_path / "target", seed=3)
    draft = perturbed_copy(target, tmp_path / "draft", noise=0.05)
    ports = (free_port(), free_port(), free_port())
    with LocalTopology(str(target), str(draft), tp=1, dtype="float32", ports=ports, k="3",
                       log_dir=tmp_path, http_port=free_port()) as topo:    # starts all three, waits for SERVING
        with SpecdClient(f"127.0.0.1:{topo.gateway_port}", timeout_s=60) as client:
            reply = client.generate([5, 9, 2, 77], max_tokens=12, ignore_eos=True)
            stream = list(client.stream([5, 9, 2, 77], max_tokens=12, ignore_eos=True, temperature=0.8, seed=1))
        with openai.OpenAI(base_url=f"http://127.0.0.1:{topo.http_port}/v1", api_key="x", max_retries=0) as http:
            for chunk in http.completions.create(model="target", prompt=[5, 9, 2], max_tokens=6, stream=True,
                                                 logprobs=2):       # the HTTP door, logprobs rendered, too
                pass
        assert len(reply.token_ids) == 12 and reply.stats.drafted > 0
        assert sum(len(c.token_ids) for c in stream) == 12
        gateway, verifier = topo.procs["gateway"].pid, topo.procs["verifier"].pid
        libs = _mapped_libraries(gateway)
        print(f"gateway RSS {_rss_mib(gateway):.0f} MiB, verifier RSS {_rss_mib(verifier):.0f} MiB")
        assert not {lib for lib in libs if lib.startswith(("libtorch", "libc10"))}, sorted(libs)
        assert any(lib.startswith("libtorch") for lib in _mapped_libraries(verifier))   # the check can see torch
