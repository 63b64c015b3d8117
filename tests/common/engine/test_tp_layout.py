"""TPLayout: ranks over nodes, validated at the edge with the field and the limit named; the launcher
environments torchrun and LeaderWorkerSet give a process are read when the flags are absent."""
import pytest

from common.engine.tp_layout import DEFAULT_RDZV_PORT, TPLayout, term_differences
from common.errors import ConfigError


def test_ranks_are_numbered_node_by_node():
    layout = TPLayout(world_size=8, nnodes=2, node_rank=1, rdzv_endpoint="verifier-0.verifier-tp:29400")
    assert layout.nproc_per_node == 4 and list(layout.local_ranks) == [4, 5, 6, 7]
    assert list(layout.ranks_of(0)) == [0, 1, 2, 3] and not layout.is_driver_node
    assert layout.host_port == ("verifier-0.verifier-tp", 29400)
    assert layout.init_method == "tcp://verifier-0.verifier-tp:29400"
    one = TPLayout(world_size=2)
    assert not one.multi_node and list(one.local_ranks) == [0, 1] and one.is_driver_node


@pytest.mark.parametrize("kwargs,message", [
    ({"world_size": 3, "nnodes": 2, "rdzv_endpoint": "h:1"}, "tp=3 ranks do not split evenly over nnodes=2"),
    ({"world_size": 2, "nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"},
     r"node_rank=2: must be in \[0, nnodes=2\)"),
    ({"world_size": 2, "nnodes": 2}, "nnodes=2: rdzv_endpoint .* is required"),
    ({"world_size": 2, "nnodes": 2, "rdzv_endpoint": "h"}, "rdzv_endpoint='h': must be host:port"),
    ({"world_size": 2, "nnodes": 2, "rdzv_endpoint": "h:70000"}, r"port in \[1, 65535\]"),
    ({"world_size": 0}, "tp=0: must be >= 1"),
])
def test_bad_layouts_are_refused_naming_the_field(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        TPLayout(**kwargs)


def test_flags_win_over_the_environment():
    env = {"NNODES": "4", "NODE_RANK": "3", "MASTER_ADDR": "other", "MASTER_PORT": "1"}
    layout = TPLayout.build(4, nnodes=2, node_rank=1, rdzv_endpoint="node0:29500", env=env)
    assert (layout.nnodes, layout.node_rank, layout.rdzv_endpoint) == (2, 1, "node0:29500")


def test_torchrun_style_environment():
    layout = TPLayout.build(4, env={"NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "10.0.0.7", "MASTER_PORT": "29501"})
    assert (layout.nnodes, layout.node_rank, layout.rdzv_endpoint, layout.nproc_per_node) == (2, 1, "10.0.0.7:29501", 2)


def test_leaderworkerset_environment():
    env = {"LWS_GROUP_SIZE": "2", "LWS_WORKER_INDEX": "0", "LWS_LEADER_ADDRESS": "verifier-0.verifier.specd"}
    layout = TPLayout.build(2, env=env)
    assert layout.rdzv_endpoint == f"verifier-0.verifier.specd:{DEFAULT_RDZV_PORT}" and layout.is_driver_node


def test_no_environment_is_one_node():
    layout = TPLayout.build(2, env={"MASTER_ADDR": "ignored-on-one-node"})
    assert not layout.multi_node and layout.rdzv_endpoint is None


def test_nproc_per_node_must_agree_with_tp():
    with pytest.raises(ConfigError, match=r"tp=4 but nnodes=2 x nproc_per_node=1 = 2 ranks"):
        TPLayout.build(4, nnodes=2, nproc_per_node=1, rdzv_endpoint="h:1", env={})


def test_a_non_integer_environment_value_is_named():
    with pytest.raises(ConfigError, match="NODE_RANK='one'"):
        TPLayout.build(2, env={"NNODES": "2", "NODE_RANK": "one", "MASTER_ADDR": "h"})


def test_term_differences_name_each_setting():
    assert term_differences({"dtype": "float32", "tp": 2}, {"dtype": "bfloat16", "tp": 2}) == [
        "dtype: this node 'float32', the driver 'bfloat16'"]
    assert term_differences({"a": 1}, {"a": 1}) == []

