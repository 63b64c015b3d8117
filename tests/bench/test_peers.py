"""bench-peers' accounting: the bytes a pass reads, per model and per GGUF, and the machine's read bandwidth."""
import pytest

from bench.peers import measure_read_bandwidth, model_bytes_per_token
from common.config import EngineConfig
from common.engine.model_runner import ModelRunner


def test_a_quantized_model_reads_fewer_bytes_per_pass(tiny_checkpoints):
    path = str(tiny_checkpoints["qwen2"])
    sizes = {q: model_bytes_per_token(ModelRunner(EngineConfig(model=path, num_kv_blocks=8, dtype="bfloat16",
                                                               quantization=q)).model)
             for q in ("none", "int8", "int4")}
    # tiny qwen2: 2 layers of 64x(128 qkv + 64 o + 256 gate_up) + 128x64 down, and a 128x64 head, bf16
    matmul_weights = 2 * (64 * 128 + 64 * 64 + 64 * 256 + 128 * 64) + 128 * 64
    assert sizes["none"] >= 2 * matmul_weights
    assert sizes["int8"] < sizes["none"] * 0.6
    assert sizes["int4"] < sizes["int8"]


def test_read_bandwidth_is_a_plausible_number():
    gbs = measure_read_bandwidth(threads=1, gib=0.05, reps=2)
    assert 0.1 < gbs < 2000


def test_a_loaded_set_that_leaves_too_little_memory_is_refused_before_it_runs(monkeypatch):
    from bench import peers
    assert 0 < peers.available_gib() < float("inf")
    monkeypatch.setattr(peers, "available_gib", lambda: 2.0)
    peers.check_memory_left(["llama.cpp", "specd int4"], workers=1)           # 1.5 GiB needed: goes on
    with pytest.raises(SystemExit, match=r"only 2.0 GiB .* 3.0 GiB needed to run 4 specd workers"):
        peers.check_memory_left(["llama.cpp", "a", "b", "c", "d"], workers=4)


def test_a_dead_worker_is_named_with_its_exit_code():
    import multiprocessing as mp

    from bench.peers import SpecdWorker
    w = SpecdWorker.__new__(SpecdWorker)
    w.name = "specd int4"
    w.conn, child = mp.Pipe()
    w.proc = mp.get_context("spawn").Process(target=int)
    w.proc.start()
    w.proc.join()
    child.close()                                              # nobody reads the pipe any more
    with pytest.raises(RuntimeError, match="specd int4: its worker process died, exit code 0"):
        w.generate("text", False, 4)
    w.close()                                                  # closing a dead worker raises nothing


def test_k_auto_is_compared_with_k0_pair_by_pair_and_its_tokens_are_checked():
    from bench.peers import paired_with_k0
    run = lambda tps, tokens: {"tokens_per_s": tps, "tokens": tokens}           # noqa: E731
    pairs = [[(run(10.0, [1, 2]), run(8.0, [1, 2])), (run(9.0, [1, 2]), run(10.0, [1, 2])),
              (run(30.0, [1, 2]), run(20.0, [1, 2]))],                       # ratios 1.25, 0.9, 1.5
             [(run(2.0, [3]), run(4.0, [4]))]]                               # 0.5, and other tokens
    got = paired_with_k0(pairs, ["a", "b"])
    assert got["vs_k0_per_prompt"] == {"a": 1.25, "b": 0.5}     # the median of the pairs' ratios, not of speeds
    assert (got["runs_beside_k0"], got["runs_same_tokens_as_k0"]) == (4, 3)
    assert got["k0_median_tokens_per_s"] == 7.0                 # median over prompts of their medians (10, 4)


def test_a_speculative_worker_runs_its_target_alone_on_request(tmp_path, monkeypatch):
    import multiprocessing as mp
    import threading

    from bench.peers import _specd_worker
    from common.llm import LLM
    from tests.checkpoints import build_model_folder, perturbed_copy
    target = build_model_folder(tmp_path / "target", seed=3)
    draft = perturbed_copy(target, tmp_path / "draft", noise=0.01)
    calls, generate = [], LLM.generate
    monkeypatch.setattr(LLM, "generate", lambda self, *a, **kw: calls.append(kw) or generate(self, *a, **kw))
    conn, child = mp.Pipe()                          # the worker's loop, in a thread of this process
    worker = threading.Thread(target=_specd_worker, args=(("none", "none"), {"target": str(target),
                                                                            "draft": str(draft)}, 1, child))
    worker.start()
    assert conn.recv()[0] == "ready"
    answers = []
    for target_only in (True, False):
        conn.send(("generate", ("<w3><w9><w17>", False, 12, target_only)))
        answers.append(conn.recv()[1])
    conn.send(None)
    worker.join(30)
    alone, spec = answers
    # each generation is a 1-token run (the prefill's time) and the timed one, both in the asked mode
    assert calls == [{"num_speculative_tokens": 0, "proposer": None}] * 2 + [{}] * 2
    assert alone["drafted"] == 0 and alone["rounds"] == 12      # one target step per token, no draft
    assert spec["tokens"] == alone["tokens"] and len(alone["tokens"]) == 12
