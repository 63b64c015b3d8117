"""`FastTokenizer`: the subset of a transformers tokenizer specd uses, on a `tokenizers.Tokenizer` backend."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from common.fast_tokenizer.chat_template import normalize_messages, render_chat
from common.fast_tokenizer.folder import read_chat_templates
from common.fast_tokenizer.special_tokens import add_missing_tokens, gather_added_tokens, resolve_special_tokens

def _to_list(ids: Any) -> Any:
    if hasattr(ids, "tolist") and not isinstance(ids, (list, tuple)):
        ids = ids.tolist()
    if isinstance(ids, Mapping) and "input_ids" in ids:
        ids = ids["input_ids"]
    return ids


def clean_up_tokenization(text: str) -> str:
    """transformers' WordPiece-era space clean-up (only where clean_up_tokenization_spaces asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class FastTokenizer:
    """The subset of a transformers tokenizer specd uses, on a `tokenizers.Tokenizer` backend (see the package doc)."""

    def __init__(self, backend: Tokenizer, config: Mapping, folder: Path, flavour: str = "generic",
                 spec: Mapping | None = None):
        self._tokenizer = backend
        self.name_or_path = str(folder)
        self.flavour = flavour
        cfg = dict(config)
        self.model_max_length = cfg.get("model_max_length", int(1e30))
        self.truncation_side = cfg.get("truncation_side", "right")
        self.padding_side = cfg.get("padding_side", "right")
        self.clean_up_tokenization_spaces = bool(cfg.get("clean_up_tokenization_spaces", False))
        self._force_cleanup = bool(cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output",
                                           False))
        self.split_special_tokens = bool(cfg.get("split_special_tokens", False))
        self.chat_template = read_chat_templates(folder, cfg)
        self.model_input_names = ["input_ids", "attention_mask"]

        added, by_content = gather_added_tokens(cfg, folder, spec)
        self._special_names, self._specials, self._extra_specials = resolve_special_tokens(
            cfg, flavour, self._tokenizer, by_content)
        add_missing_tokens(self._tokenizer, added, self._specials, self._extra_specials)
        self._tokenizer.encode_special_tokens = self.split_special_tokens
        if flavour == "qwen2":  # Qwen2Tokenizer.__init__ ends by (re-)adding its special tokens as special
            self._tokenizer.add_tokens([AddedToken(t, special=True) for t in self.all_special_tokens])
        # encode() never pads or truncates (padding=False / truncation=None in transformers)
        self._tokenizer.no_truncation()
        self._tokenizer.no_padding()

    # ---- vocabulary and special tokens

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    @property
    def vocab(self) -> dict[str, int]:
        return self.get_vocab()

    @property
    def vocab_size(self) -> int:
        """The base vocabulary, without added tokens."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def __bool__(self) -> bool:
        return True

    @property
    def backend_tokenizer(self) -> Tokenizer:
        return self._tokenizer

    @property
    def is_fast(self) -> bool:
        return True

    @property
    def added_tokens_decoder(self) -> dict[int, AddedToken]:
        return self._tokenizer.get_added_tokens_decoder()

    @property
    def added_tokens_encoder(self) -> dict[str, int]:
        return {t.content: i for i, t in sorted(self.added_tokens_decoder.items())}

    def get_added_vocab(self) -> dict[str, int]:
        return self.added_tokens_encoder

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """Named special tokens (standard and model-specific) as strings: what chat templates see."""
        return {k: str(self._specials[k]) for k in self._special_names if self._specials.get(k) is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        out: list[str] = []
        for tok in [*(self._specials.get(k) for k in self._special_names), *self._extra_specials]:
            if tok is not None and str(tok) not in out:
                out.append(str(tok))
        return out

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def extra_special_tokens(self) -> list[str]:
        return [str(t) for t in self._extra_specials]

    def _special(self, name: str) -> str | None:
        tok = self._specials.get(name)
        return None if tok is None else str(tok)

    def _special_id(self, name: str) -> int | None:
        tok = self._special(name)
        return None if tok is None else self._tokenizer.token_to_id(tok)

    bos_token = property(lambda self: self._special("bos_token"))
    eos_token = property(lambda self: self._special("eos_token"))
    unk_token = property(lambda self: self._special("unk_token"))
    sep_token = property(lambda self: self._special("sep_token"))
    pad_token = property(lambda self: self._special("pad_token"))
    cls_token = property(lambda self: self._special("cls_token"))
    mask_token = property(lambda self: self._special("mask_token"))
    bos_token_id = property(lambda self: self.convert_tokens_to_ids(self.bos_token) if self.bos_token else None)
    eos_token_id = property(lambda self: self.convert_tokens_to_ids(self.eos_token) if self.eos_token else None)
    unk_token_id = property(lambda self: self._special_id("unk_token"))
    sep_token_id = property(lambda self: self.convert_tokens_to_ids(self.sep_token) if self.sep_token else None)
    pad_token_id = property(lambda self: self.convert_tokens_to_ids(self.pad_token) if self.pad_token else None)
    cls_token_id = property(lambda self: self.convert_tokens_to_ids(self.cls_token) if self.cls_token else None)
    mask_token_id = property(lambda self: self.convert_tokens_to_ids(self.mask_token) if self.mask_token else None)

    def __getattr__(self, name: str):
        # model-specific special tokens (e.g. image_token / image_token_id), as transformers exposes them
        specials = self.__dict__.get("_specials", {})
        base = name.removesuffix("_id")
        if base in specials and base in self.__dict__.get("_special_names", ()):
            return self.convert_tokens_to_ids(str(specials[base])) if name != base else str(specials[base])
        raise AttributeError(f"{type(self).__name__} has no attribute {name}")

    def convert_tokens_to_ids(self, tokens: str | list[str] | None):
        """The id of a token (or ids of tokens); a token outside the vocabulary gives unk_token_id (None if none)."""
        if tokens is None:
            return None
        if isinstance(tokens, str):
            idx = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if idx is None else idx
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: int | list[int], skip_special_tokens: bool = False):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    # ---- encoding

    def _sync_split(self, split_special_tokens: bool | None) -> None:
        split = self.split_special_tokens if split_special_tokens is None else split_special_tokens
        if self._tokenizer.encode_special_tokens != split:
            self._tokenizer.encode_special_tokens = split

    def encode(self, text: str, text_pair: str | None = None, add_special_tokens: bool = True,
               split_special_tokens: bool | None = None) -> list[int]:
        """Token ids of `text` (no padding, no truncation), like transformers' `encode`."""
        if not isinstance(text, str) or (text_pair is not None and not isinstance(text_pair, str)):
            raise ValueError("text input must be of type `str`")
        self._sync_split(split_special_tokens)
        return self._tokenizer.encode(text, text_pair, add_special_tokens=add_special_tokens).ids

    def tokenize(self, text: str, pair: str | None = None, add_special_tokens: bool = False) -> list[str]:
        self._sync_split(None)
        return self._tokenizer.encode(text, pair, add_special_tokens=add_special_tokens).tokens

    def __call__(self, text: str | list[str], text_pair: str | list[str] | None = None, add_special_tokens: bool = True,
                 split_special_tokens: bool | None = None) -> dict[str, list]:
        """{"input_ids", "attention_mask"} for one text (lists of ints) or a batch of texts (lists of lists)."""
        if isinstance(text, (list, tuple)):
            pairs = list(zip(text, text_pair)) if text_pair is not None else list(text)
            self._sync_split(split_special_tokens)
            encs = self._tokenizer.encode_batch(pairs, add_special_tokens=add_special_tokens)
            return {"input_ids": [e.ids for e in encs], "attention_mask": [e.attention_mask for e in encs]}
        if not isinstance(text, str):
            raise ValueError("text input must be of type `str` or a list of `str`")
        self._sync_split(split_special_tokens)
        enc = self._tokenizer.encode(text, text_pair, add_special_tokens=add_special_tokens)
        return {"input_ids": enc.ids, "attention_mask": enc.attention_mask}

    # ---- decoding

    def decode(self, token_ids, skip_special_tokens: bool = False, clean_up_tokenization_spaces: bool | None = None):
        """Text of a sequence of ids (or a list of texts for a batch of sequences), like transformers' `decode`."""
        token_ids = _to_list(token_ids)
        if isinstance(token_ids, (list, tuple)) and token_ids and isinstance(token_ids[0], (list, tuple)):
            return [self._decode(seq, skip_special_tokens, clean_up_tokenization_spaces) for seq in token_ids]
        return self._decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)

    def batch_decode(self, sequences, skip_special_tokens: bool = False,
                     clean_up_tokenization_spaces: bool | None = None) -> list[str]:
        return [self._decode(_to_list(seq), skip_special_tokens, clean_up_tokenization_spaces)
                for seq in _to_list(sequences)]

    def _decode(self, token_ids, skip_special_tokens: bool, clean_up: bool | None) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        text = self._tokenizer.decode([int(i) for i in token_ids], skip_special_tokens=skip_special_tokens)
        clean_up = self.clean_up_tokenization_spaces if clean_up is None else clean_up
        if clean_up and (type(self._tokenizer.model).__name__ != "BPE" or self._force_cleanup):
            text = clean_up_tokenization(text)
        return text

    # ---- chat templates

    def get_chat_template(self, chat_template: str | None = None, tools: list | None = None) -> str:
        """The template to render: a named one from a folder's several, the default one, or `chat_template` itself."""
        if isinstance(self.chat_template, dict):
            templates = self.chat_template
            if chat_template is not None and chat_template in templates:
                return templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in templates:
                    return templates["tool_use"]
                if "default" in templates:
                    return templates["default"]
                raise ValueError("This model has multiple chat templates with no default specified! Available "
                                 f"template names are {sorted(templates)}.")
            return chat_template
        if chat_template is None:
            if self.chat_template is None:
                raise ValueError("Cannot use chat template functions because tokenizer.chat_template is not set and "
                                 "no template argument was passed!")
            return self.chat_template
        return chat_template

    def apply_chat_template(self, conversation, tools: list[dict] | None = None, documents: list[dict] | None = None,
                            chat_template: str | None = None, add_generation_prompt: bool = False,
                            continue_final_message: bool | str = False, tokenize: bool = True,
                            sanitize_control_tokens: bool = False, padding: bool | str = False,
                            truncation: bool = False, max_length: int | None = None, return_tensors: str | None = None,
                            return_dict: bool = True, return_assistant_tokens_mask: bool = False,
                            tokenizer_kwargs: dict | None = None, **kwargs):
        """Render (and by default tokenize) a conversation, or a batch of them, like transformers.

        Returns the rendered text (tokenize=False), the ids (return_dict=False), or {"input_ids", "attention_mask"}.
        Not supported here (they raise NotImplementedError): sanitize_control_tokens, padding, truncation,
        return_tensors, return_assistant_tokens_mask, tokenizer_kwargs.
        """
        if sanitize_control_tokens or padding or truncation or return_tensors is not None \
                or return_assistant_tokens_mask or tokenizer_kwargs:
            raise NotImplementedError("FastTokenizer.apply_chat_template does not implement sanitize_control_tokens, "
                                      "padding, truncation, return_tensors, return_assistant_tokens_mask or "
                                      "tokenizer_kwargs")
        if not tokenize:
            return_dict = False
        template = self.get_chat_template(chat_template, tools)
        if isinstance(conversation, (list, tuple)) and len(conversation) == 0:
            raise ValueError("Cannot apply chat template to an empty conversation. Provide at least one message.")
        batched = isinstance(conversation, (list, tuple)) and (
            isinstance(conversation[0], (list, tuple)) or hasattr(conversation[0], "messages"))
        conversations = [normalize_messages(c) for c in (conversation if batched else [conversation])]
        if continue_final_message and add_generation_prompt:
            raise ValueError("continue_final_message and add_generation_prompt are not compatible.")
        template_kwargs = {**self.special_tokens_map, **kwargs}
        rendered = [render_chat(template, chat, tools=tools, documents=documents,
                                add_generation_prompt=add_generation_prompt,
                                continue_final_message=continue_final_message, **template_kwargs)
                    for chat in conversations]
        if not tokenize:
            return rendered if batched else rendered[0]
        out = self(rendered if batched else rendered[0], add_special_tokens=False)
        return out if return_dict else out["input_ids"]

    def __repr__(self) -> str:
        return (f"FastTokenizer(name_or_path={self.name_or_path!r}, flavour={self.flavour!r}, "
                f"vocab_size={self.vocab_size}, special_tokens={self.special_tokens_map})")
