"""`specd demo`'s services stage: the TP choice, the side-by-side table, and the whole stage on tiny checkpoints
(three real processes, the gRPC comparison, then the `openai` package through the HTTP door)."""
import pytest

from scripts.dev.demo_services import Timed, choose_tp, run_services_demo, speed_table
from tests.checkpoints import WORD_CHAT_TEMPLATE, build_model_folder, perturbed_copy


@pytest.mark.parametrize("cores,kv_heads,tp", [
    (1, 2, 1), (2, 2, 1), (4, 2, 1),     # below 2 ranks x 2 cores + 1 for the draft
    (5, 2, 2), (8, 2, 2),                # the 1.5B target has 2 KV heads: TP stops at 2
    (9, 8, 4), (16, 8, 4), (17, 8, 8),
    (9, 1, 1),                           # TP must divide the KV heads
])
def test_choose_tp_leaves_a_core_for_the_draft_and_two_per_rank(cores, kv_heads, tp):
    chosen, why = choose_tp(cores, kv_heads)
    assert chosen == tp and why.startswith(f"TP={tp}:")


def test_speed_table_has_a_row_per_prompt_and_an_overall_ratio():
    rows = [("a", Timed(10, 2.0, "x"), Timed(10, 1.0, "x", acceptance=0.5)),
            ("b", Timed(30, 3.0, "y"), Timed(30, 2.0, "z", acceptance=0.25))]
    lines = speed_table(rows).splitlines()
    assert len(lines) == 6                                      # head, rule, a, b, rule, all
    assert lines[2].split() == ["a", "5.0", "10.0", "2.00x", "50%", "yes"]
    assert lines[3].split() == ["b", "10.0", "15.0", "1.50x", "25%", "no"]
    assert lines[5].split() == ["all", "8.0", "13.3", "1.67x"]  # 40 tokens in 5 s vs 40 in 3 s


def test_services_stage_end_to_end_on_tiny_checkpoints(tmp_path, capsys):
    target = build_model_folder(tmp_path / "target", seed=21, chat_template=WORD_CHAT_TEMPLATE)
    # The draft is the target itself: every draft is accepted. K is fixed: on models this small a draft costs as
    # much as the target, and K=auto rightly stops drafting.
    draft = perturbed_copy(target, tmp_path / "draft", noise=0.0)
    prompts = [("completion", "<w5><w9><w2>", False), ("chat", "<w10><w11>", True)]
    messages = [{"role": "system", "content": "<w9>"}, {"role": "user", "content": "<w12><w13>"}]
    rows = run_services_demo(str(target), str(draft), dtype="float32", tp=1, max_tokens=12, prompts=prompts,
                             messages=messages, k=3)
    out = capsys.readouterr().out
    assert [name for name, _, _ in rows] == ["completion", "chat"]
    for _, base, spec in rows:
        assert base.tokens == spec.tokens > 0
        assert base.text == spec.text                           # fp32 greedy: speculation changes nothing
        assert base.acceptance == 0.0 and spec.acceptance == 1.0 and spec.mean_acceptance_length > 1.0
    table = out.split("target-only vs speculative\n", 1)[1]
    assert [line.split()[-1] for line in table.splitlines()[2:4]] == ["yes", "yes"]
    assert "OpenAI-compatible API (openai package, model 'target')" in out
    assert "drafts accepted, mean acceptance length" in out     # the HTTP reply's spec_decode stats
    assert out.rstrip().endswith("topology stopped")
