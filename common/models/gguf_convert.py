"""Convert one quantized GGUF checkpoint into a bfloat16 Hugging Face folder (config, tokenizer, model.safetensors)
with transformers' GGUF loader, then reload the folder to check it round-trips."""

from __future__ import annotations

import gc
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from common.models.errors import ModelFetchError

# Parameters compared after the reload: the ends of the network and one block, where a
# mis-mapped or re-tied tensor would show.
_CHECKED = ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.down_proj.weight", "model.norm.weight")


def read_gguf_header(gguf_path: Path) -> tuple[str, bool]:
    """(general.architecture, whether the file stores its own `output.weight`, i.e. an untied LM head)."""
    from gguf import GGUFReader

    reader = GGUFReader(str(gguf_path))
    field = reader.fields["general.architecture"]
    arch = bytes(field.parts[field.data[0]]).decode()
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    del reader  # drops the memmap
    return arch, has_output


def _drop_gguf_quantization(model) -> None:
    # save_pretrained refuses while `model.hf_quantizer` is set (GgufHfQuantizer.is_serializable() is
    # False), and a stale `config.quantization_config` would make every reload go through the GGUF
    # quantizer again. With dequantize=True transformers clears both itself; this covers versions that don't.
    if getattr(model, "hf_quantizer", None) is not None:
        del model.hf_quantizer
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    if hasattr(model, "quantization_method"):
        del model.quantization_method


def _is_tied(model) -> bool:
    return model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()


def convert_gguf(gguf_path: Path, out_dir: Path, *, expected_arch: str, label: str,
                 log: Callable[[str], None] = print) -> dict:
    """Write the HF folder for `gguf_path` into `out_dir`; returns the facts recorded in the marker."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    arch, untied = read_gguf_header(gguf_path)
    if arch != expected_arch:
        raise ModelFetchError(f"{label}: GGUF declares architecture {arch!r}, expected {expected_arch!r}")

    with tempfile.TemporaryDirectory(prefix="specd-gguf-") as stage:
        # A directory holding only the GGUF, so from_pretrained cannot pick up any stray config file.
        (Path(stage) / gguf_path.name).symlink_to(gguf_path.resolve())
        start = time.monotonic()
        # dequantize=True: we want plain dense bf16 tensors to save, never packed GGUF blocks
        # (which transformers would keep if the `kernels` package were installed).
        model = AutoModelForCausalLM.from_pretrained(
            stage, gguf_file=gguf_path.name, dtype=torch.bfloat16,
            quantization_config=GgufConfig(dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(stage, gguf_file=gguf_path.name)
    log(f"[{label}] loaded and dequantized the GGUF in {time.monotonic() - start:.0f} s")

    _drop_gguf_quantization(model)
    model.config.tie_word_embeddings = not untied
    if _is_tied(model) == untied:
        raise ModelFetchError(
            f"{label}: GGUF {'has' if untied else 'lacks'} output.weight but the loaded model's LM head is "
            f"{'tied' if _is_tied(model) else 'untied'}; refusing to save a wrong checkpoint"
        )
    bad = {str(p.dtype) for p in model.parameters() if p.dtype != torch.bfloat16}
    if bad:
        raise ModelFetchError(f"{label}: expected every parameter in bfloat16, found {sorted(bad)}")
    # The GGUF tokenizer carries no length limit; the context length is the useful one.
    tokenizer.model_max_length = model.config.max_position_embeddings

    start = time.monotonic()
    model.save_pretrained(out_dir)
    # Keep the chat template inside tokenizer_config.json, where every consumer looks for it.
    tokenizer.save_pretrained(out_dir, save_jinja_files=False)
    for path in out_dir.iterdir():
        path.chmod(0o644)  # safetensors comes out 0600; the services may run as another user
    config = json.loads((out_dir / "config.json").read_text())
    if "quantization_config" in config or config.get("dtype") != "bfloat16":
        raise ModelFetchError(f"{label}: saved config.json still quantized or not bfloat16: "
                              f"dtype={config.get('dtype')!r}, quantization_config={config.get('quantization_config')}")
    if not (out_dir / "model.safetensors").exists():
        raise ModelFetchError(f"{label}: save_pretrained wrote no single model.safetensors in {out_dir}")
    log(f"[{label}] saved in {time.monotonic() - start:.0f} s; verifying the reload ...")

    facts = {
        "architecture": config["architectures"][0],
        "gguf_architecture": arch,
        "model_type": config["model_type"],
        "vocab_size": config["vocab_size"],
        "tokenizer_size": len(tokenizer),
        "tie_word_embeddings": config["tie_word_embeddings"],
        "dtype": "bfloat16",
        "transformers_version": transformers.__version__,
    }
    expected = {name: t.detach().clone() for name, t in model.state_dict().items() if name in _CHECKED}
    del model, tokenizer
    gc.collect()

    reloaded = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.bfloat16)
    got = reloaded.state_dict()
    tied_again = _is_tied(reloaded)
    del reloaded
    for name, tensor in expected.items():
        if name not in got or not torch.equal(got[name], tensor):
            raise ModelFetchError(f"{label}: reloaded parameter {name} differs from the converted one")
    if tied_again != (not untied):
        raise ModelFetchError(f"{label}: reloaded model has tied={tied_again}, expected tied={not untied}")
    del got, expected
    gc.collect()
    return facts
