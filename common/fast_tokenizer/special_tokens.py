"""Added and special tokens as transformers' from_pretrained / TokenizersBackend.__init__ gather and add them."""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from common.fast_tokenizer.folder import read_json

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Qwen2Tokenizer.__init__'s defaults, used when tokenizer_config.json does not name the token at all
QWEN2_DEFAULT_SPECIALS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}


def as_added_token(value: Any, special: bool | None = None) -> AddedToken | str | None:
    """A tokenizer_config.json special-token value (a string or a serialized AddedToken) as str / AddedToken."""
    if isinstance(value, Mapping) and "content" in value:
        fields = {k: v for k, v in value.items() if k != "__type"}
        if special is not None:
            fields["special"] = special
        return AddedToken(**fields)
    if isinstance(value, (str, AddedToken)):
        return value
    return None


def gather_added_tokens(cfg: dict, folder: Path,
                        spec: Mapping | None) -> tuple[dict[int, AddedToken], dict[str, AddedToken]]:
    """The added tokens (index -> AddedToken, content -> AddedToken) as from_pretrained gathers them.

    Legacy folders (no `added_tokens_decoder`): special_tokens_map.json's entries are merged into `cfg` on the way.
    """
    added: dict[int, AddedToken] = {}
    by_content: dict[str, AddedToken] = {}
    if "added_tokens_decoder" in cfg:
        for idx, tok in (cfg.get("added_tokens_decoder") or {}).items():
            tok = as_added_token(tok)
            if not isinstance(tok, AddedToken):
                raise TypeError(f"added_tokens_decoder[{idx!r}] should be a serialized AddedToken")
            added[int(idx)] = tok
            by_content[str(tok)] = tok
        return added, by_content
    special_map_file = folder / "special_tokens_map.json"
    if special_map_file.is_file():
        for key, value in (read_json(special_map_file, "special tokens map") or {}).items():
            if isinstance(value, dict) and key not in ("extra_special_tokens", "additional_special_tokens"):
                value = as_added_token(value, special=True)
            elif key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                existing = list(cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or [])
                for tok in value:
                    tok = as_added_token(tok, special=True) if isinstance(tok, dict) else tok
                    if tok not in existing:
                        existing.append(tok)
                value, key = existing, "extra_special_tokens"
            cfg[key] = value
    added_file = folder / "added_tokens.json"
    if added_file.is_file():
        named = {str(as_added_token(cfg[k])) for k in SPECIAL_TOKEN_NAMES if cfg.get(k)}
        named |= {str(as_added_token(t)) for t in (cfg.get("extra_special_tokens")
                                                   or cfg.get("additional_special_tokens") or [])}
        for content, idx in (read_json(added_file, "added tokens") or {}).items():
            special = content in named
            added[idx] = AddedToken(content, rstrip=False, lstrip=False, normalized=not special, special=special)
            by_content[content] = added[idx]
    for entry in (spec or {}).get("added_tokens") or []:
        entry = dict(entry)
        idx = entry.pop("id")
        added[idx] = AddedToken(**entry)
        by_content[str(added[idx])] = added[idx]
    return added, by_content


def resolve_special_tokens(cfg: dict, flavour: str, backend: Tokenizer, by_content: Mapping[str, AddedToken]
                           ) -> tuple[tuple[str, ...], dict[str, AddedToken | str], list[AddedToken | str]]:
    """(names, name -> token, extras): the named special tokens, then model-specific ones (*_token keys, a dict of
    extras), then the extra special tokens; an added token of the same content stands for a named one."""
    if "additional_special_tokens" in cfg and not cfg.get("extra_special_tokens"):
        cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")
    names = list(SPECIAL_TOKEN_NAMES)
    specials: dict[str, Any] = {}
    if flavour == "qwen2":
        specials.update({k: v for k, v in QWEN2_DEFAULT_SPECIALS.items() if k not in cfg})
    for key in SPECIAL_TOKEN_NAMES:
        if key in cfg:
            specials[key] = cfg[key]
    if backend.padding is not None and "pad_token" not in specials:
        specials["pad_token"] = backend.padding["pad_token"]  # tokenizer.json's padding names one
    model_specific = {k: v for k, v in cfg.items()
                      if k not in SPECIAL_TOKEN_NAMES and k.endswith("_token") and isinstance(v, str)}
    extras = cfg.get("extra_special_tokens")
    if isinstance(extras, dict):
        model_specific.update(extras)
        extras = None
    explicit = cfg.get("model_specific_special_tokens")
    if isinstance(explicit, dict):
        model_specific.update(explicit)
    for key, value in model_specific.items():
        if key not in names:
            names.append(key)
        specials[key] = value
    resolved: dict[str, AddedToken | str] = {}
    for key in names:
        value = as_added_token(specials.get(key))
        if value is None:
            continue
        resolved[key] = by_content.get(str(value), value) if by_content else value
    extra_tokens = [as_added_token(t) for t in (extras or []) if as_added_token(t) is not None]
    return tuple(names), resolved, extra_tokens


def add_missing_tokens(backend: Tokenizer, added: Mapping[int, AddedToken], specials: Mapping[str, AddedToken | str],
                       extras: list[AddedToken | str]) -> None:
    """What TokenizersBackend.__init__ adds to the backend: the gathered added tokens it lacks, then the special
    tokens outside its added vocabulary (as special tokens; this can grow the vocabulary)."""
    present = {repr(t) for t in backend.get_added_tokens_decoder().values()}
    to_add: list[AddedToken | str] = [t for _, t in sorted(added.items()) if repr(t) not in present]
    encoder = {t.content for t in backend.get_added_tokens_decoder().values()} | {str(t) for t in to_add}
    for value in [*specials.values(), *extras]:
        if str(value) not in encoder and all(str(value) != str(t) for t in to_add):
            to_add.append(value)
    if to_add:
        named = {str(t) for t in specials.values()}
        tokens = []
        for tok in to_add:
            if isinstance(tok, str):
                tok = AddedToken(tok, special=True)
            elif not tok.special and str(tok) in named:
                tok.special = True
            tokens.append(tok)
        backend.add_tokens(tokens)
