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

This module imports neither torch nor transformers (tests/common/test_fast_tokenizer.py checks it).
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from common.errors import CheckpointError

SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# transformers' Qwen2Tokenizer pre-tokenizer split (models/qwen2/tokenization_qwen2.py)
QWEN2_SPLIT_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                     r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2Tokenizer.__init__'s defaults, used when tokenizer_config.json does not name the token at all
QWEN2_DEFAULT_SPECIALS = {"unk_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


# ------------------------------------------------------------------------------------------------- loading

def _read_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"unreadable {what} {str(path)!r}: {e}") from e


def _as_added_token(value: Any, special: bool | None = None) -> AddedToken | str | None:
    """A tokenizer_config.json special-token value (a string or a serialized AddedToken) as str / AddedToken."""
    if isinstance(value, Mapping) and "content" in value:
        fields = {k: v for k, v in value.items() if k != "__type"}
        if special is not None:
            fields["special"] = special
        return AddedToken(**fields)
    if isinstance(value, (str, AddedToken)):
        return value
    return None


def _tokenizer_flavour(folder: Path, config: Mapping) -> str:
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


def _qwen2_backend(spec: dict, add_prefix_space: bool, source: Path) -> Tokenizer:
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


def load_fast_tokenizer(path: str | Path) -> FastTokenizer:
    """The tokenizer of a model folder (tokenizer.json + tokenizer_config.json), without torch or transformers.

    Raises CheckpointError naming the folder when tokenizer.json is missing or unreadable, or a config file is corrupt.
    """
    folder = Path(path)
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise CheckpointError(f"no usable tokenizer in {str(folder)!r}: tokenizer.json is missing")
    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file, "tokenizer config") if config_file.is_file() else {}
    if not isinstance(config, dict):
        raise CheckpointError(f"unreadable tokenizer config {str(config_file)!r}: not a JSON object")
    spec = _read_json(tokenizer_file, "tokenizer")
    if not isinstance(spec, dict):
        raise CheckpointError(f"unreadable tokenizer {str(tokenizer_file)!r}: not a JSON object")
    flavour = _tokenizer_flavour(folder, config)
    try:
        if flavour == "qwen2":
            add_prefix_space = config.get("add_prefix_space")
            backend = _qwen2_backend(spec, bool(add_prefix_space) if add_prefix_space is not None else False, folder)
        else:
            backend = Tokenizer.from_str(json.dumps(spec))
    except CheckpointError:
        raise
    except Exception as e:  # the Rust deserializer raises plain Exceptions
        raise CheckpointError(f"no usable tokenizer in {str(folder)!r}: {e}") from e
    try:
        return FastTokenizer(backend, config, folder, flavour, spec)
    except CheckpointError:
        raise
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"no usable tokenizer in {str(folder)!r}: {e}") from e


def _chat_templates(folder: Path, config: Mapping) -> str | dict[str, str] | None:
    """The chat template(s) as transformers loads them: standalone .jinja files win over tokenizer_config.json."""
    templates: dict[str, str] = {}
    default_file = folder / "chat_template.jinja"
    try:
        if default_file.is_file():
            templates["default"] = default_file.read_text(encoding="utf-8")
        extra_dir = folder / "additional_chat_templates"
        if extra_dir.is_dir():
            for f in sorted(extra_dir.glob("*.jinja")):
                templates[f.name.removesuffix(".jinja")] = f.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"unreadable chat template in {str(folder)!r}: {e}") from e
    if len(templates) == 1 and "default" in templates:
        return templates["default"]
    if templates:
        return templates
    template = config.get("chat_template")
    if isinstance(template, (list, tuple)):
        return {t["name"]: t["template"] for t in template}
    return template


# ------------------------------------------------------------------------------------------------- chat templates

@lru_cache(maxsize=1)
def _environment():
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    if tuple(int(p) for p in jinja2.__version__.split(".")[:3] if p.isdigit()) < (3, 1, 6):
        raise ImportError(f"chat templates need jinja2>=3.1.6 (older ones have sandbox escapes), "
                          f"found {jinja2.__version__}")

    class GenerationTag(jinja2.ext.Extension):
        """`{% generation %}...{% endgeneration %}` (assistant-mask markers): renders its body unchanged."""
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # not jinja's own filter: that one escapes HTML characters and takes no options
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    class SafeDict:
        """`dict(...)` in templates, without handing them the type itself."""
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class SafeNamespace(jinja2.utils.Namespace):
        """`namespace(...)` refusing underscore-prefixed attribute names."""
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                SafeNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            SafeNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore-prefixed attributes on a namespace: {name!r}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = SafeDict()
    env.globals["namespace"] = SafeNamespace
    return env


@lru_cache(maxsize=32)
def compile_chat_template(template: str):
    """The compiled jinja2 template, rendered the way transformers renders chat templates."""
    return _environment().from_string(template)


def _objects_to_dicts(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _objects_to_dicts(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_objects_to_dicts(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_objects_to_dicts(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _objects_to_dicts(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):  # pydantic messages (e.g. the OpenAI SDK's)
        return _objects_to_dicts(value.model_dump())
    return value


def _normalize_messages(conversation: Any) -> list[dict]:
    out = []
    for message in _objects_to_dicts(getattr(conversation, "messages", conversation)):
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
        out.append({k: v for k, v in message.items() if v is not None})
    return out


def _plain(value: Any) -> Any:
    """Only plain JSON-like data reaches the sandbox; anything else becomes an inert "<TypeName>" string."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    if type(value).__module__ == "numpy" and callable(getattr(value, "item", None)) \
            and getattr(value, "shape", None) == ():
        return _plain(value.item())  # numpy scalars (np.bool_(False) must stay falsy)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if callable(getattr(value, "model_dump", None)):
        return _plain(value.model_dump())
    return f"<{type(value).__name__}>"


def _alias_reasoning(chat: list[dict]) -> list[dict]:
    out = []
    for message in chat:
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


def render_chat(template: str, chat: list[dict], tools: list | None = None, documents: list | None = None,
                add_generation_prompt: bool = False, continue_final_message: bool | str = False, **kwargs) -> str:
    """One conversation rendered through a chat template, as transformers' render_jinja_template renders it."""
    compiled = compile_chat_template(template)
    if tools is not None:
        for tool in tools:
            if not isinstance(tool, dict):
                raise ValueError("Tools should be JSON schemas (dicts); this tokenizer does not convert Python "
                                 "functions (transformers.utils.get_json_schema does).")
    if documents is not None:
        for document in documents:
            if not isinstance(document, dict):
                raise TypeError("Documents should be a list of dicts with 'title' and 'text' keys!")
    tools, documents, kwargs = _plain(tools), _plain(documents), _plain(kwargs)
    chat = _plain(chat)
    for message in chat:
        if not isinstance(message, dict):
            raise TypeError(f"Chat messages should be dicts, dataclasses or pydantic models, but got {message!r}.")
    chat = _alias_reasoning(chat)
    final_message = None
    if continue_final_message:
        if not chat:
            raise ValueError("continue_final_message is set but the conversation is empty!")
        key = continue_final_message if isinstance(continue_final_message, str) else "content"
        final_message = chat[-1].get(key)
        if final_message is None:
            raise ValueError(f'continue_final_message is set but the final message has no "{key}" to continue!')
        fields = [key]
        if key in _REASONING_FIELDS:
            fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final_message]
        if not any(f in template for f in fields):
            raise ValueError(f'continue_final_message is set to "{key}" but this is not an accepted field in the '
                             f'chat_template')
        if isinstance(final_message, (list, tuple)):
            for block in reversed(final_message):
                if "text" in block:
                    final_message = block["text"]
                    block["text"] = block["text"] + _CONTINUE_TAG
                    break
            else:
                raise ValueError("continue_final_message is set but we could not find any text to continue in the "
                                 "final message!")
        else:
            for f in fields:
                chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    rendered = compiled.render(messages=chat, tools=tools, documents=documents,
                               add_generation_prompt=add_generation_prompt, **kwargs)
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final_message.strip() not in rendered or tag not in rendered:
            raise ValueError("continue_final_message is set but the final message does not appear in the chat after "
                             f"applying the chat template! Final message to continue: {final_message.strip()}")
        at = rendered.rindex(tag)
        rendered = rendered[:at] if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG else rendered[:at].rstrip()
    return rendered


# ------------------------------------------------------------------------------------------------- the tokenizer

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
    """The subset of a transformers tokenizer specd uses, on a `tokenizers.Tokenizer` backend (see module doc)."""

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
        self.chat_template = _chat_templates(folder, cfg)
        self.model_input_names = ["input_ids", "attention_mask"]

        # ---- added tokens as from_pretrained gathers them (index -> AddedToken)
        added: dict[int, AddedToken] = {}
        by_content: dict[str, AddedToken] = {}
        if "added_tokens_decoder" in cfg:
            for idx, tok in (cfg.get("added_tokens_decoder") or {}).items():
                tok = _as_added_token(tok)
                if not isinstance(tok, AddedToken):
                    raise TypeError(f"added_tokens_decoder[{idx!r}] should be a serialized AddedToken")
                added[int(idx)] = tok
                by_content[str(tok)] = tok
        else:
            special_map_file = folder / "special_tokens_map.json"
            if special_map_file.is_file():
                for key, value in (_read_json(special_map_file, "special tokens map") or {}).items():
                    if isinstance(value, dict) and key not in ("extra_special_tokens", "additional_special_tokens"):
                        value = _as_added_token(value, special=True)
                    elif key in ("extra_special_tokens", "additional_special_tokens") and isinstance(value, list):
                        existing = list(cfg.get("extra_special_tokens") or cfg.get("additional_special_tokens") or [])
                        for tok in value:
                            tok = _as_added_token(tok, special=True) if isinstance(tok, dict) else tok
                            if tok not in existing:
                                existing.append(tok)
                        value, key = existing, "extra_special_tokens"
                    cfg[key] = value
            added_file = folder / "added_tokens.json"
            if added_file.is_file():
                named = {str(_as_added_token(cfg[k])) for k in SPECIAL_TOKEN_NAMES if cfg.get(k)}
                named |= {str(_as_added_token(t)) for t in (cfg.get("extra_special_tokens")
                                                            or cfg.get("additional_special_tokens") or [])}
                for content, idx in (_read_json(added_file, "added tokens") or {}).items():
                    special = content in named
                    added[idx] = AddedToken(content, rstrip=False, lstrip=False, normalized=not special,
                                            special=special)
                    by_content[content] = added[idx]
            for entry in (spec or {}).get("added_tokens") or []:
                entry = dict(entry)
                idx = entry.pop("id")
                added[idx] = AddedToken(**entry)
                by_content[str(added[idx])] = added[idx]

        # ---- special tokens: the named ones, then model-specific (*_token keys, a dict of extras), then extras
        if "additional_special_tokens" in cfg and not cfg.get("extra_special_tokens"):
            cfg["extra_special_tokens"] = cfg.pop("additional_special_tokens")
        names = list(SPECIAL_TOKEN_NAMES)
        specials: dict[str, Any] = {}
        if flavour == "qwen2":
            specials.update({k: v for k, v in QWEN2_DEFAULT_SPECIALS.items() if k not in cfg})
        for key in SPECIAL_TOKEN_NAMES:
            if key in cfg:
                specials[key] = cfg[key]
        if self._tokenizer.padding is not None and "pad_token" not in specials:
            specials["pad_token"] = self._tokenizer.padding["pad_token"]  # tokenizer.json's padding names one
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
        self._special_names = tuple(names)
        self._specials: dict[str, AddedToken | str] = {}
        for key in names:
            value = _as_added_token(specials.get(key))
            if value is None:
                continue
            self._specials[key] = by_content.get(str(value), value) if by_content else value
        self._extra_specials = [_as_added_token(t) for t in (extras or []) if _as_added_token(t) is not None]

        # ---- what TokenizersBackend.__init__ adds to the backend
        present = {repr(t) for t in self._tokenizer.get_added_tokens_decoder().values()}
        to_add: list[AddedToken | str] = [t for _, t in sorted(added.items()) if repr(t) not in present]
        encoder = set(self.added_tokens_encoder) | {str(t) for t in to_add}
        for value in [*self._specials.values(), *self._extra_specials]:
            if str(value) not in encoder and all(str(value) != str(t) for t in to_add):
                to_add.append(value)
        if to_add:
            named = {str(t) for t in self._specials.values()}
            tokens = []
            for tok in to_add:
                if isinstance(tok, str):
                    tok = AddedToken(tok, special=True)
                elif not tok.special and str(tok) in named:
                    tok.special = True
                tokens.append(tok)
            self._tokenizer.add_tokens(tokens)
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
        conversations = [_normalize_messages(c) for c in (conversation if batched else [conversation])]
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
