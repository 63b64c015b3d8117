"""Tiny random Hugging Face checkpoints, saved as real safetensors folders, for tests that need no real model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

TINY_SHAPE = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def hf_config(arch: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config
    kw = {**TINY_SHAPE, **overrides}
    if arch == "qwen2":
        return Qwen2Config(**{"tie_word_embeddings": False, **kw})
    if arch == "qwen3":
        return Qwen3Config(**{"head_dim": 16, "tie_word_embeddings": False, **kw})
    if arch == "llama":
        return LlamaConfig(**{"tie_word_embeddings": True, "rope_scaling": {
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64}, "rope_theta": 500000.0, **kw})
    raise ValueError(arch)


def build_checkpoint(path: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """Save a random-weight model of `arch` ('qwen2' | 'qwen3' | 'llama') into `path`."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch, **overrides), dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():       # larger weights than the default init, so differences show
            p.normal_(0, 0.2)
    model.save_pretrained(path, safe_serialization=True)
    return path


# A chat template over the word vocabulary: each turn is <w1><role token> content <w5>; the generation prompt opens an
# assistant turn. Roles: system <w2>, user <w3>, assistant <w4>.
WORD_CHAT_TEMPLATE = ("{% for m in messages %}<w1><w{{ {'system': 2, 'user': 3, 'assistant': 4}[m['role']] }}>"
                      "{{ m['content'] }}<w5>{% endfor %}{% if add_generation_prompt %}<w1><w4>{% endif %}")


def build_tokenizer(path: Path, vocab_size: int, prefix: str = "w", chat_template: str | None = None) -> Path:
    """A word-level tokenizer over `vocab_size` tokens ("<eos>", "<w1>", "<w2>", …) saved beside a checkpoint
    (with `chat_template` in its config when given)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"<eos>": 0, **{f"<{prefix}{i}>": i for i in range(1, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern=">", behavior="merged_with_previous")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<eos>")
    fast.save_pretrained(path)
    # Name the class: otherwise AutoTokenizer follows config.json's model type (Qwen2's byte-level BPE), which
    # cannot encode this vocabulary.
    cfg_file = Path(path) / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    if chat_template is not None:
        cfg["chat_template"] = chat_template
    cfg_file.write_text(json.dumps(cfg))
    return path


def build_model_folder(path: Path, arch: str = "qwen2", seed: int = 0, vocab_size: int = 128,
                       tokenizer_prefix: str = "w", chat_template: str | None = None, **overrides) -> Path:
    """A checkpoint plus a matching tokenizer: what the LLM API and the services need."""
    build_checkpoint(path, arch, seed=seed, vocab_size=vocab_size, **overrides)
    return build_tokenizer(path, vocab_size, tokenizer_prefix, chat_template)


def perturbed_copy(src: Path, dst: Path, noise: float, seed: int = 0) -> Path:
    """A draft that mostly agrees with its target: the target's weights plus Gaussian noise."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(seed)
    tensors = {k: v + noise * torch.randn(v.shape, generator=g, dtype=v.dtype)
               for k, v in load_file(dst / "model.safetensors").items()}
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst
