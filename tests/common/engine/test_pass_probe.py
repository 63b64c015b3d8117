"""The load-time probe of a pass of n tokens against a 1-token pass: one ratio per n, nothing left allocated."""
import pytest

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.engine.pass_probe import PROBE_SEQ, describe, measure_pass_costs
from common.rpc.model_info import model_info


@pytest.mark.parametrize("quantization", ["none", "int4"])
def test_the_probe_measures_each_pass_length_and_frees_its_sequence(tiny_checkpoints, quantization):
    runner = ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), num_kv_blocks=32, block_size=4,
                                      quantization=quantization))
    free = runner.allocator.num_free
    ratios = measure_pass_costs(runner, max_tokens=5, reps=2)
    assert len(ratios) == 5 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    assert runner.allocator.num_free == free and PROBE_SEQ not in runner.sequences
    assert describe(ratios).startswith("1: 1.00x, 2: ")
    info = model_info(str(tiny_checkpoints["qwen2"]), runner, "float32", "cpu", 1, 4, ratios)
    assert info.quantization == {"none": "none", "int4": "int4/vnni"}[quantization] and list(info.pass_cost_ratio) == pytest.approx(ratios)
