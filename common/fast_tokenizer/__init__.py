"""A torch-free tokenizer for the gateway: the `tokenizers` library plus jinja2 chat templates.

`load_fast_tokenizer(folder)` gives a `FastTokenizer` that behaves like the transformers tokenizer
`common.tokenizer.load_tokenizer(folder)` returns (transformers 5.x) for everything specd asks of a tokenizer:
`get_vocab()` (so `vocab_fingerprint` agrees), `encode` / `__call__`, `apply_chat_template`, `decode`,
`convert_tokens_to_ids` and the special-token attributes (`eos_token_id`, `unk_token_id`, ...).

What is mirrored from transformers' loading (`TokenizersBackend` and its `from_pretrained`):
- the backend: tokenizer.json as is, except for the Qwen2 tokenizer class (declared in tokenizer_config.json or
  implied by config.json's `model_type: qwen2`), which transformers rebuilds from the vocab and merges with its own
  pipeline (NFC normalizer, Qwen's split regex + byte-level pre-tokenizer, byte-level decoder); a folder that declares
  `PreTrainedTokenizerFast` always keeps its tokenizer.json (`load_tokenizer` loads that class directly);
- added tokens from tokenizer_config.json's `added_tokens_decoder` (legacy folders: special_tokens_map.json,
  added_tokens.json), and named / extra / model-specific special tokens missing from the added vocabulary are added
  as special tokens, in transformers' order (this can grow the vocabulary, and so changes the fingerprint alike);
- `add_bos_token` / `add_eos_token` in tokenizer_config.json are ignored when tokenizer.json exists (transformers 5
  drops them: tokenizer.json's post-processor decides), `split_special_tokens`, `clean_up_tokenization_spaces`
  (never on a BPE model), padding and truncation in tokenizer.json off unless asked (never asked here);
- chat templates: `chat_template.jinja` and `additional_chat_templates/*.jinja` take priority over
  tokenizer_config.json's `chat_template` (a string, or a list of named templates); a legacy processor
  `chat_template.json` is ignored, as the transformers tokenizer ignores it.

Not mirrored (a transformers tokenizer class with its own `__init__` other than Qwen2's, e.g. a SentencePiece-style
`LlamaTokenizer` folder, the Mistral regex patch, tools given as Python callables, padding / truncation / tensors /
assistant masks / control-token sanitizing in `apply_chat_template`): those raise or fall back to tokenizer.json as is,
as documented on each method.

This package imports neither torch nor transformers (tests/common/test_fast_tokenizer.py checks it).

Modules: `folder` reads the files, `backend` builds the `tokenizers` backend (the Qwen2 rebuild), `special_tokens`
gathers and adds the added / special tokens, `chat_template` renders chat templates, `tokenizer` is `FastTokenizer`
and `loader` is `load_fast_tokenizer`. The names below are imported on first use (PEP 562), so that this `__init__`
imports no submodule at load time and the submodules, which import each other, form no import cycle with it.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from common.fast_tokenizer.backend import QWEN2_SPLIT_REGEX
    from common.fast_tokenizer.chat_template import compile_chat_template, render_chat
    from common.fast_tokenizer.loader import load_fast_tokenizer
    from common.fast_tokenizer.special_tokens import QWEN2_DEFAULT_SPECIALS, SPECIAL_TOKEN_NAMES
    from common.fast_tokenizer.tokenizer import FastTokenizer, clean_up_tokenization

_EXPORTS = {
    "load_fast_tokenizer": "loader",
    "FastTokenizer": "tokenizer",
    "clean_up_tokenization": "tokenizer",
    "render_chat": "chat_template",
    "compile_chat_template": "chat_template",
    "SPECIAL_TOKEN_NAMES": "special_tokens",
    "QWEN2_DEFAULT_SPECIALS": "special_tokens",
    "QWEN2_SPLIT_REGEX": "backend",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
