"""What the prefix-cache tests share: a tiny checkpoint, the prompts, runners with and without a cache, and the
logits of a runner without any cache to compare hits with."""
import pytest

from common.config import EngineConfig, PrefixCacheConfig
from common.engine.model_runner import ModelRunner, SequenceChunk
from common.engine.tp_executor import TPExecutor
from tests.checkpoints import build_checkpoint

SYSTEM = [(7 * i + 3) % 128 for i in range(40)]       # 2 full blocks of 16 + 8 tokens
BS = 16
HMAC_KEY = b"test-prefix-cache-hmac-key-0123456789"


def _shared(redis_server, **kw) -> PrefixCacheConfig:
    """A cache config on the test's Redis, values sealed with HMAC_KEY."""
    return PrefixCacheConfig(redis_url=redis_server.url, hmac_key=HMAC_KEY, **{"local_mib": 16, **kw})


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return str(build_checkpoint(tmp_path_factory.mktemp("prefix") / "m", "qwen2", seed=9))


def _runner(ckpt, cache: PrefixCacheConfig | None, tp=1):
    cfg = EngineConfig(model=ckpt, dtype="float32", num_kv_blocks=64, tp_size=tp, prefix_cache=cache)
    return TPExecutor(cfg) if tp > 1 else ModelRunner(cfg)


def _prefill_and_commit(runner, seq, tokens):
    [logits] = runner.forward([SequenceChunk(seq, tokens)]).logits
    runner.truncate(seq, len(tokens))                   # the round's rollback publishes the full blocks
    return logits


def _flush(runner):
    r = getattr(runner, "runner", runner)
    assert r.prefix_cache.flush(10)


@pytest.fixture(scope="module")
def reference(ckpt):
    """Logits of SYSTEM + a user turn without any cache."""
    r = _runner(ckpt, None)
    out = {}
    for turn in ([1, 2, 3], [9, 8, 7, 6]):
        out[tuple(turn)] = r.forward([SequenceChunk(1, SYSTEM + turn)]).logits[0]
        r.free(1)
    return out
