"""Bad checkpoints and settings fail early with a message that names the problem."""
import json
import shutil

import pytest

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner
from common.errors import CheckpointError, ConfigError, UnsupportedModelError


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ModelRunner(EngineConfig(model=str(tmp_path / "nope")))


def test_folder_without_config(tmp_path):
    with pytest.raises(CheckpointError, match="no config.json"):
        ModelRunner(EngineConfig(model=str(tmp_path)))


def test_folder_without_weights(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2"], tmp_path / "m")
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        ModelRunner(EngineConfig(model=str(d), num_kv_blocks=4))


def test_corrupt_safetensors(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2"], tmp_path / "m")
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated download
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ModelRunner(EngineConfig(model=str(d), num_kv_blocks=4))


def test_incomplete_checkpoint_names_missing_tensor(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file
    d = _copy(tiny_checkpoints["qwen2"], tmp_path / "m")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="layers.1.mlp.down_proj.weight"):
        ModelRunner(EngineConfig(model=str(d), num_kv_blocks=4))


def test_wrong_shape_names_tensor(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] = 96                                  # weights say 128
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="mlp"):
        ModelRunner(EngineConfig(model=str(d), num_kv_blocks=4))


def test_unsupported_architecture(tiny_checkpoints, tmp_path):
    d = _copy(tiny_checkpoints["qwen2"], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*supported: Qwen2ForCausalLM"):
        ModelRunner(EngineConfig(model=str(d), num_kv_blocks=4))


def test_tp_size_must_divide_heads(tiny_checkpoints):
    # tiny models: 4 query heads, 2 KV heads
    with pytest.raises(ConfigError, match="tp_size=3 must divide num_attention_heads=4 and num_key_value_heads=2"):
        ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), tp_size=3, num_kv_blocks=4))


@pytest.mark.parametrize("kwargs,match", [
    ({"dtype": "int8"}, "dtype='int8'"),
    ({"tp_size": 0}, "tp_size=0"),
    ({"block_size": 3}, "block_size=3"),
    ({"num_kv_blocks": 0}, "num_kv_blocks=0"),
    ({"device": "tpu"}, "device='tpu'"),
])
def test_engine_config_validates_itself(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        EngineConfig(model="x", **kwargs)


def test_max_model_len_above_the_model_limit(tiny_checkpoints):
    with pytest.raises(ConfigError, match="max_model_len=1000.*max_position_embeddings=256"):
        ModelRunner(EngineConfig(model=str(tiny_checkpoints["qwen2"]), max_model_len=1000, num_kv_blocks=4))
