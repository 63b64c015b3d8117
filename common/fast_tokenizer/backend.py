"""The `tokenizers.Tokenizer` backend of a folder: tokenizer.json as is, or rebuilt the way Qwen2Tokenizer does."""
from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from common.errors import CheckpointError

# transformers' Qwen2Tokenizer pre-tokenizer split (models/qwen2/tokenization_qwen2.py)
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")


def tokenizer_flavour(folder: Path, config: Mapping) -> str:
    """"qwen2" where AutoTokenizer (as load_tokenizer calls it) builds a Qwen2Tokenizer, else "generic"."""
    declared = config.get("tokenizer_class")
    if declared == "PreTrainedTokenizerFast":
        return "generic"
    if isinstance(declared, str) and declared.removesuffix("Fast") == "Qwen2Tokenizer":
        return "qwen2"
    try:
        model_type = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        model_type = None
    # qwen2 is one of transformers' MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS: its own class wins over the declared one
    return "qwen2" if model_type == "qwen2" else "generic"


def qwen2_backend(spec: dict, add_prefix_space: bool, source: Path) -> Tokenizer:
    """The backend transformers' Qwen2Tokenizer builds from tokenizer.json's vocab and merges (no added tokens yet)."""
    model = spec.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges") or []
    if not isinstance(vocab, dict):
        raise CheckpointError(f"tokenizer.json in {str(source)!r} has no BPE vocabulary for a Qwen2 tokenizer")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                        end_of_word_suffix="", fuse_unk=False, byte_fallback=False))
    tok.decoder = decoders.ByteLevel()
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space, use_regex=False),
    ])
    # The post-processor (and padding / truncation) stay tokenizer.json's: read them off a vocabulary-less copy.
    bare = dict(spec, added_tokens=[], model=dict(model, vocab={}, merges=[]))
    shell = Tokenizer.from_str(json.dumps(bare))
    if shell.post_processor is not None:
        tok.post_processor = shell.post_processor
    if shell.truncation is not None:
        tok.enable_truncation(**shell.truncation)
    if shell.padding is not None:
        tok.enable_padding(**shell.padding)
    return tok


def build_backend(folder: Path, config: Mapping, spec: dict, flavour: str) -> Tokenizer:
    """The backend for `flavour`; a tokenizer.json the Rust side rejects raises CheckpointError naming the folder."""
    try:
        if flavour == "qwen2":
            add_prefix_space = config.get("add_prefix_space")
            return qwen2_backend(spec, bool(add_prefix_space) if add_prefix_space is not None else False, folder)
        return Tokenizer.from_str(json.dumps(spec))
    except CheckpointError:
        raise
    except Exception as e:  # the Rust deserializer raises plain Exceptions
        raise CheckpointError(f"no usable tokenizer in {str(folder)!r}: {e}") from e
