"""bench/scale.py's goals from its rows: the replica ratio and session share per K, the hop's cost ratio."""
from bench.scale import goals_of


def _rep(k, n, tps, share_b):
    return {"part": "replicas", "k": k, "replicas": n, "tokens_per_s": tps, "share_b": share_b}


def _hop(layout, k, ms):
    return {"part": "tp-hop", "layout": layout, "k": k, "verify_ms_per_round": ms}


def test_goals_compare_the_matching_cells():
    rows = [_rep("0", 1, 10.0, 0.0), _rep("0", 2, 17.0, 0.5), _rep("auto", 1, 12.0, 0.0), _rep("auto", 2, 15.0, 0.25),
            _hop("one node", "4", 100.0), _hop("two nodes", "4", 140.0)]
    goals = {g["name"]: g for g in goals_of(rows)}
    assert goals["two_replicas_vs_one_K0"]["value"] == 1.7 and goals["two_replicas_vs_one_K0"]["met"]
    assert goals["two_replicas_vs_one_Kauto"]["value"] == 1.25 and not goals["two_replicas_vs_one_Kauto"]["met"]
    assert not goals["session_share_of_replica_b_Kauto"]["met"] and goals["session_share_of_replica_b_K0"]["met"]
    hop = goals["two_nodes_vs_one_node_verify_ms_per_round_K4"]
    assert hop["value"] == 1.4 and not hop["met"]          # lower is better: 1.4x the one-node cost misses 1.25x


def test_a_cell_missing_its_pair_sets_no_goal():
    assert goals_of([_rep("0", 1, 10.0, 0.0), _hop("one node", "4", 100.0)]) == []
