"""bench-draft-acceptance's measurement on tiny checkpoints: a draft identical to the target is always accepted,
another model's draft is not, and the counts add up."""
from bench.draft_acceptance import measure

PROMPTS = [("a", [5, 9, 17, 3, 44]), ("b", [100, 2, 71]), ("c", [8] * 12)]     # token ids of the tiny vocab


def test_a_draft_identical_to_the_target_is_always_accepted(tiny_checkpoints, monkeypatch):
    # an int4 draft runs an int4 head (common.config.draft_lm_head_quantization), the target an int8 one: keep the
    # target's head so that the draft really is the target
    monkeypatch.setattr("common.llm.draft_lm_head_quantization", lambda quantization: None)
    same = str(tiny_checkpoints["qwen2"])
    r = measure(same, same, "int4", None, k=3, max_tokens=6, threads=1, prompts=PROMPTS)   # same weights, kernel
    assert r["drafted"] > 0 and r["accepted"] == r["drafted"] and r["acceptance"] == 1.0
    assert set(r["per_prompt"]) == {"a", "b", "c"} and r["draft"] == "int4" and r["draft_gb"] > 0


def test_another_models_draft_is_measured_not_assumed(tiny_checkpoints):
    r = measure(str(tiny_checkpoints["qwen2"]), str(tiny_checkpoints["qwen3"]), "none", None, k=3, max_tokens=6,
                threads=1, prompts=PROMPTS)
    assert r["draft"] == "bf16" and 0 <= r["accepted"] < r["drafted"]
    assert 0 <= r["acceptance"] < 1 and all(0 <= a <= 1 for a in r["per_prompt"].values())
