"""Q4_K tensors of a GGUF load into the int4 layout with their own codes: the decode agrees with the gguf package's
reference dequantizer, a model built from the file computes with exactly the GGUF's weights (where requantizing
the same weights would not), other types are requantized and reported, a file of another model is refused."""
import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from common.config import EngineConfig
from common.engine.model_runner import ModelRunner, SequenceChunk
from common.errors import CheckpointError, ConfigError
from common.layers.quantization import dequantize, quantize_vnni
from common.models.gguf_weights import Q4_K_BLOCK_BYTES, Int4Rows, q4_k_rows
from tests.checkpoints import build_checkpoint
from tests.common.kernels.test_vnni_gemm import HAS_AVX2

SHAPE = dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2)
PARTS = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
         "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def random_q4_k(rows: int, cols: int, seed: int) -> np.ndarray:
    """Valid Q4_K bytes [rows, cols / 256 · 144]: random nibbles and 6-bit scales, small positive fp16 d and dmin."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(rows, cols // 256, Q4_K_BLOCK_BYTES), dtype=np.uint8)
    blocks[..., 0:2] = rng.uniform(0.001, 0.004, size=(rows, cols // 256, 1)).astype(np.float16).view(np.uint8)
    blocks[..., 2:4] = rng.uniform(0.001, 0.01, size=(rows, cols // 256, 1)).astype(np.float16).view(np.uint8)
    return blocks.reshape(rows, -1)


def reference_dequantize(raw: np.ndarray) -> torch.Tensor:
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize as gguf_dequantize
    return torch.from_numpy(gguf_dequantize(raw, GGMLQuantizationType.Q4_K).astype(np.float32))


def test_q4_k_rows_decode_as_the_gguf_reference_does():
    raw = random_q4_k(8, 512, seed=0)
    gc = q4_k_rows(raw)
    assert gc.codes.shape == (8, 512) and gc.sc.shape == gc.mn.shape == gc.d.shape == (8, 16)
    assert gc.codes.max() <= 15 and gc.sc.max() <= 63 and gc.mn.max() <= 63 and gc.d.dtype == torch.float16
    torch.testing.assert_close(gc.dequantized(), reference_dequantize(raw), rtol=1e-6, atol=1e-7)
    rows = Int4Rows(0, gc)                      # the PyTorch kernel's form: scale and offset per group
    ours = rows.codes.float() * rows.scale.repeat_interleave(32, 1) + rows.offset.repeat_interleave(32, 1)
    torch.testing.assert_close(ours, reference_dequantize(raw), rtol=1e-6, atol=1e-7)


def test_q4_k_loads_into_the_vnni_layout_exactly():
    """Codes, 6-bit sub-scales and fp16 scales all land as they are: the kernel computes with the GGUF's weights."""
    raw = random_q4_k(16, 512, seed=1)
    gc = q4_k_rows(raw)
    qw = quantize_vnni(torch.zeros(16, 512), 4, [Int4Rows(0, gc)])
    assert torch.equal(dequantize(qw), reference_dequantize(raw))


@pytest.fixture(scope="module")
def model_and_gguf(tmp_path_factory):
    """A tiny qwen2 folder whose matmul weights are a GGUF's dequantized Q4_K (v_proj stored as F32 instead, to be
    requantized), and that GGUF."""
    import gguf
    root = tmp_path_factory.mktemp("gguf")
    folder = build_checkpoint(root / "m", "qwen2", seed=5, **SHAPE)
    tensors = load_file(folder / "model.safetensors")
    writer = gguf.GGUFWriter(str(root / "m.gguf"), "qwen2")
    for i, (name, w) in enumerate(sorted(tensors.items())):
        part = next((p for p in PARTS if f".{p}." in name), None)
        if part is None or not name.endswith(".weight"):
            continue
        layer = name.split(".")[2]
        gguf_name = f"blk.{layer}.{PARTS[part]}.weight"
        if part == "v_proj":
            writer.add_tensor(gguf_name, w.numpy())
            continue
        raw = random_q4_k(w.shape[0], w.shape[1], seed=i)
        writer.add_tensor(gguf_name, raw, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
        tensors[name] = reference_dequantize(raw)
    save_file(tensors, folder / "model.safetensors")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return str(folder), str(root / "m.gguf"), tensors


def _runner(folder, **kw):
    return ModelRunner(EngineConfig(model=folder, num_kv_blocks=16, block_size=4, quantization="int4", **kw))


@pytest.mark.parametrize("kernel", [pytest.param("vnni", marks=pytest.mark.skipif(not HAS_AVX2, reason="no AVX2")),
                                    "torch"])             # fp32 model: the torch kernel's scales stay exact too
def test_a_model_from_the_gguf_computes_with_the_gguf_weights_themselves(model_and_gguf, kernel, monkeypatch):
    monkeypatch.setenv("SPECD_QUANT_KERNEL", kernel)
    folder, path, tensors = model_and_gguf
    exact, requantized = _runner(folder, gguf=path), _runner(folder)
    for name in ("model.layers.0.mlp.gate_up_proj", "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"):
        layer = dict(exact.model.named_modules())[name]
        hf = name.replace("gate_up_proj", "gate_proj")
        want = tensors[f"{hf}.weight"]
        got = dequantize(layer.qweight)[:want.shape[0]]
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)              # the GGUF's weights, exactly
        again = dequantize(dict(requantized.model.named_modules())[name].qweight)[:want.shape[0]]
        assert (again - want).abs().max() > 1e-4                                  # requantizing would not be
    ids = [3, 1, 4, 1, 5, 9, 2, 6]
    [a], [b] = exact.forward([SequenceChunk(0, ids)]).logits, requantized.forward([SequenceChunk(0, ids)]).logits
    assert not torch.equal(a, b)


def test_each_rank_takes_its_own_rows_or_columns_of_whole_sub_blocks(model_and_gguf):
    from types import SimpleNamespace
    from common.models.gguf_weights import GgufCodes
    _, path, tensors = model_and_gguf
    codes = GgufCodes.open(path)
    gate, up = tensors["model.layers.0.mlp.gate_proj.weight"], tensors["model.layers.0.mlp.up_proj.weight"]
    column = SimpleNamespace(sizes_per_rank=[256, 256], out_features=512, in_features=256)
    rows = codes.rows_for("model.layers.0.mlp.gate_up_proj", column, tp_rank=1)
    assert [r.row_start for r in rows] == [0, 256]
    torch.testing.assert_close(rows[0].dequantized(), gate[256:], rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(rows[1].dequantized(), up[256:], rtol=1e-6, atol=1e-7)
    down = tensors["model.layers.0.mlp.down_proj.weight"]                         # [256, 512]
    row_parallel = SimpleNamespace(input_size_per_rank=256, in_features=256, out_features=256)
    [r] = codes.rows_for("model.layers.0.mlp.down_proj", row_parallel, tp_rank=1)
    torch.testing.assert_close(r.dequantized(), down[:, 256:], rtol=1e-6, atol=1e-7)


def test_what_is_not_q4_k_is_requantized_and_reported(model_and_gguf, caplog):
    import logging
    folder, path, _ = model_and_gguf
    with caplog.at_level(logging.INFO, logger="common.engine.model_runner"):
        _runner(folder, gguf=path)
    assert "12 Q4_K tensors loaded with their own 4-bit codes; requantized from the dequantized folder: 2 F32" \
        in caplog.text


def test_a_gguf_of_another_model_is_refused(model_and_gguf, tmp_path):
    _, path, _ = model_and_gguf
    other = build_checkpoint(tmp_path / "other", "qwen2", seed=6, **SHAPE)
    with pytest.raises(CheckpointError, match="differ from the model folder's.*not the same model"):
        _runner(str(other), gguf=path)


def test_gguf_needs_int4_and_an_existing_file(model_and_gguf, tmp_path):
    folder, path, _ = model_and_gguf
    with pytest.raises(ConfigError, match="only under quantization='int4'"):
        EngineConfig(model=folder, quantization="int8", gguf=path)
    with pytest.raises(ConfigError, match="no such file"):
        _runner(folder, gguf=str(tmp_path / "missing.gguf"))
