"""bench/wan.py's bookkeeping: the goals read the right cells, and a process's CPU seconds are read from /proc."""
import os
import time

from bench.wan import cpu_seconds, goals_of


def _row(system, rtt, tps, t=0.0, b=1):
    return {"system": system, "rtt_ms": rtt, "temperature": t, "batch": b, "tokens_per_s": tps}


def test_goals_compare_the_systems_the_issue_names_at_their_rtt():
    rows = [_row("target-only", 20.0, 1.0), _row("sequential, per-step K", 20.0, 2.0), _row("pre-drafting", 20.0, 2.8),
            _row("sequential, network K", 0.0, 3.0), _row("pre-drafting", 0.0, 2.85),
            _row("sequential, network K", 50.0, 2.0), _row("sequential, per-step K", 50.0, 2.5)]
    goals = {g["name"]: g for g in goals_of(rows)}
    assert goals["rtt20_pre_draft_vs_sequential_T0_batch1"]["value"] == 1.4
    assert goals["rtt20_pre_draft_vs_sequential_T0_batch1"]["met"]
    assert goals["rtt20_pre_draft_vs_target_only_T0_batch1"]["value"] == 2.8
    assert goals["rtt0_pre_draft_vs_sequential_T0_batch1"]["value"] == 0.95
    assert not goals["rtt0_pre_draft_vs_sequential_T0_batch1"]["met"]
    assert goals["rtt50_network_k_vs_per_step_k_T0_batch1"]["value"] == 0.8
    assert "rtt20_pre_draft_k3_vs_sequential_k3_T0_batch1" not in goals        # cells not measured: no goal


def test_cpu_seconds_grow_while_the_process_computes():
    before = cpu_seconds(os.getpid())
    t = time.process_time()
    while time.process_time() - t < 0.3:
        pass
    assert cpu_seconds(os.getpid()) - before >= 0.2
