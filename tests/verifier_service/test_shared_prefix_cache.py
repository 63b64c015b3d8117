"""Two verifier replicas (real processes) sharing one real redis-server: the second replica's prefill of a
shared 512-token system prompt is loaded from the cache, values forged without the HMAC key are refused, and a
dead Redis changes nothing but speed."""
import subprocess
import sys
import time

import grpc
import pytest

from common.distributed import free_port
from common.llm import LLM
from common.kv.block_auth import BlockSigner
from common.kv.prefix_cache import KEY_PREFIX
from common.rpc.generated.specd.v1 import verifier_pb2, verifier_pb2_grpc
from common.rpc.health_check import check
from common.speculative.params import SamplingParams
from scripts.dev.redis_server import write_hmac_key_file
from tests.checkpoints import build_model_folder

SYSTEM = [(31 * i + 7) % 120 + 1 for i in range(512)]      # 32 full blocks of 16
TURNS = [[3, 4, 5], [9, 9, 1, 2], [17, 1]]


@pytest.fixture(scope="module")
def target(tmp_path_factory):
    return str(build_model_folder(tmp_path_factory.mktemp("shared") / "t", seed=13, max_position_embeddings=1024))


@pytest.fixture(scope="module")
def expected(target):
    with LLM(target, dtype="float32", kv_cache_memory_gib=0.05) as llm:
        outs = llm.generate([SYSTEM + t for t in TURNS], SamplingParams(max_tokens=1, ignore_eos=True))
    return [o.token_ids[0] for o in outs]


class Replica:
    def __init__(self, target, redis_url, tmp_path, name, key_file):
        self.port = free_port()
        self.log = open(tmp_path / f"{name}.log", "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "scripts.cli", "verifier", "--model", target, "--dtype", "float32",
             "--port", str(self.port), "--kv-cache-gib", "0.05", "--redis-url", redis_url,
             "--prefix-cache-mib", "0", "--prefix-cache-hmac-key-file", str(key_file),
             "--insecure"], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while not check(f"127.0.0.1:{self.port}", timeout_s=1)[0]:
            assert self.proc.poll() is None, (tmp_path / f"{name}.log").read_text()
            assert time.monotonic() < deadline, "verifier replica not serving"
            time.sleep(0.2)
        self.channel = grpc.insecure_channel(f"127.0.0.1:{self.port}")
        self.stub = verifier_pb2_grpc.VerifierServiceStub(self.channel)

    def prefill(self, session, tokens):
        request = verifier_pb2.VerifyRequest(session_id=session, round=0, committed_len=len(tokens), new_tokens=tokens)
        return self.stub.Verify(request, timeout=60)               # every committed token, no drafts: a prefill

    def stop(self):
        self.channel.close()
        self.proc.terminate()
        self.proc.wait(30)
        self.log.close()


def _wait_keys(redis_server, n, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while len(redis_server.client().keys(KEY_PREFIX + "*")) < n:
        assert time.monotonic() < deadline, "blocks were not published"
        time.sleep(0.05)


def test_second_replica_prefill_is_served_from_redis(target, expected, redis_server, tmp_path):
    key_file = write_hmac_key_file(tmp_path)            # one secret for both replicas
    a = Replica(target, redis_server.url, tmp_path, "a", key_file)
    b = Replica(target, redis_server.url, tmp_path, "b", key_file)
    try:
        first = a.prefill("s0", SYSTEM + TURNS[0])
        assert first.cached_tokens == 0 and first.next_token_id == expected[0]
        _wait_keys(redis_server, 32)                    # published off the round's critical path
        for i, turn in enumerate(TURNS[1:], 1):
            reply = b.prefill(f"s{i}", SYSTEM + turn)
            assert reply.cached_tokens == 512           # computed: only the user turn
            assert reply.next_token_id == expected[i]
        # Someone who can write to Redis but holds no key replaces every block: refused, recomputed, same output.
        client = redis_server.client()
        for key in client.keys(KEY_PREFIX + "*"):
            value = bytearray(client.get(key))
            value[100:-32] = bytes(len(value) - 132)                 # zeroed K/V, header and token ids kept
            client.set(key, BlockSigner(b"not the replicas' key").seal(key.decode(), bytes(value[:-32])))
        reply = b.prefill("forged", SYSTEM + TURNS[1])
        assert reply.cached_tokens == 0 and reply.next_token_id == expected[1]
        # Redis killed mid-run: the next prefill computes everything and still succeeds, same output.
        redis_server.kill()
        t = time.perf_counter()
        reply = a.prefill("after-kill", SYSTEM + TURNS[2])
        assert reply.cached_tokens == 0 and reply.next_token_id == expected[2]
        assert time.perf_counter() - t < 10
    finally:
        a.stop(), b.stop()
