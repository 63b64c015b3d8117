"""common/fast_tokenizer/ against transformers' tokenizer of the same folder (common.tokenizer.load_tokenizer).

Each folder's pair of tokenizers is loaded once per module (hence one file of ~340 lines, not several). The real
Qwen2.5-Coder / SmolLM2 folders are `real_model` tests, skipped when not fetched; the tiny word-level folders
(tests/checkpoints.py::build_tokenizer, plus variants with chat templates and extra special tokens) need no real
model.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jinja2
import pytest

from common.errors import CheckpointError
from common.fast_tokenizer import FastTokenizer, load_fast_tokenizer
from common.models.fetch import DRAFT_MODEL, LLAMA_MODEL, TARGET_MODEL, model_path
from common.tokenizer import encode_prompt, load_tokenizer, stop_string_checker, stop_token_ids, vocab_fingerprint
from tests.checkpoints import build_tokenizer

REPO = Path(__file__).resolve().parents[2]
REAL = {"qwen-target": TARGET_MODEL, "qwen-draft": DRAFT_MODEL, "smollm2": LLAMA_MODEL}

# A template exercising what transformers' environment offers: namespace, loop controls, raise_exception, tojson with
# options, the {% generation %} tag, special tokens (a model-specific one too) and trim_blocks / lstrip_blocks.
TINY_TEMPLATE = """{%- set ns = namespace(turns=0) -%}
{{- bos_token -}}
{%- for message in messages -%}
    {%- if message.role not in ['system', 'user', 'assistant'] -%}
        {{- raise_exception('unknown role ' + message.role) -}}
    {%- endif -%}
    {%- if message.role == 'system' and not loop.first -%}{%- continue -%}{%- endif -%}
    {%- set ns.turns = ns.turns + 1 -%}
    {%- if message.role == 'assistant' -%}
        {% generation %}{{ '<w1>' + message.content + eos_token }}{% endgeneration %}
    {%- else -%}
        {{- '<w2>' + message.content + '<w3>' -}}
    {%- endif -%}
    {%- if ns.turns >= 6 -%}{%- break -%}{%- endif -%}
{%- endfor -%}
{%- if tools -%}{{ tools | tojson(indent=2) }}{{ tools | tojson }}{%- endif -%}
{%- if add_generation_prompt -%}{{ '<w1>' + image_token }}{%- endif -%}
"""
# Whitespace-sensitive: block tags on their own lines, indented (trim_blocks + lstrip_blocks decide the output).
FILE_TEMPLATE = """{% for message in messages %}
    {% if message.role == 'user' %}
<w4>{{ message.content }}{{ eos_token }}
    {% else %}
  <w5>{{ message['content'] | trim }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<w6>{{ dict(a=1) | tojson }}{{ strftime_now('%Y') }}
{% endif %}
"""
TOOL_TEMPLATE = "{{ bos_token }}{% for m in messages %}<w7>{{ m.content }}{% endfor %}{{ tools | tojson }}"

PROMPTS = [
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    "print('héllo wörld') # 🎉👍🏽 naïve café",
    "中文测试：你好，世界！日本語のテキスト",
    "a   b\t\t\n\n\n   c     \n",
    "text with <|im_end|> and <|im_start|>user\nand <|endoftext|> inside",
    "cafe\u0301 A\u030a \ufb01",  # not NFC: Qwen2's normalizer composes these
    "", " ", "\n", "x",
    "<w1><w2><w3>", "<eos><w4> <w5>", "<bos><w2><img>",
]
MESSAGES = [
    {"role": "system", "content": "You are a careful coder. Réponds en français 🙂"},
    {"role": "user", "content": "Write fib in Python.\n\n  Keep it short."},
    {"role": "assistant", "content": "def fib(n):\n    return n if n < 2 else fib(n-1) + fib(n-2)", "tool_calls": None},
    {"role": "user", "content": "Now in 中文 comments, please. <|im_end|>"},
]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Search — für Wörter, 中文 ok",
                                           "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]


def _write_config(folder: Path, **changes) -> None:
    cfg_file = folder / "tokenizer_config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.update(changes)
    cfg_file.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("fast_tokenizer")
    plain = build_tokenizer(root / "tiny", 16)
    # Chat template in tokenizer_config.json; a bos token outside the vocabulary (both tokenizers add it), an
    # add_bos_token request (transformers 5 ignores it beside a tokenizer.json), extra / model-specific specials.
    chat = build_tokenizer(root / "tiny-chat", 16)
    _write_config(chat, chat_template=TINY_TEMPLATE, bos_token="<bos>", add_bos_token=True,
                  extra_special_tokens=["<extra>"], image_token="<img>", clean_up_tokenization_spaces=True)
    # Templates in files win over tokenizer_config.json's; additional_chat_templates/ makes a named set.
    files = build_tokenizer(root / "tiny-files", 16)
    _write_config(files, chat_template="{{ 'ignored: the .jinja files win' }}", bos_token="<w9>")
    (files / "chat_template.jinja").write_text(FILE_TEMPLATE)
    (files / "additional_chat_templates").mkdir()
    (files / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_TEMPLATE)
    return {"tiny": plain, "tiny-chat": chat, "tiny-files": files}


def _real_folder(name: str) -> Path:
    folder = model_path(REAL[name])
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{folder} is not fetched (run `make models`)")
    return folder


def _derived_folder(name: str, root: Path) -> Path:
    """A real tokenizer re-dressed the way other folders come: a transformers-4-style config, legacy files."""
    src = _real_folder(DERIVED[name])
    folder = root / name
    shutil.copytree(src, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    if name == "qwen-v4-config":
        # added_tokens_decoder in the config (one flag differing from tokenizer.json's), no tokenizer_class (the
        # class follows config.json's model_type), the chat template in chat_template.jinja, extra special tokens
        added = json.loads((folder / "tokenizer.json").read_text())["added_tokens"]
        cfg["added_tokens_decoder"] = {str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added}
        cfg["added_tokens_decoder"][str(added[-1]["id"])]["special"] = not added[-1]["special"]
        cfg.pop("tokenizer_class")
        (folder / "chat_template.jinja").write_text(cfg.pop("chat_template"))
        cfg["additional_special_tokens"] = ["<|im_start|>", "<|im_end|>", "<|not_in_vocab|>"]
    else:  # a legacy special_tokens_map.json overriding the config's eos, adding extra special tokens
        (folder / "special_tokens_map.json").write_text(json.dumps({
            "eos_token": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False},
            "additional_special_tokens": ["<repo_name>", "<|not_in_vocab|>"]}))
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return folder


DERIVED = {"qwen-v4-config": "qwen-draft", "smollm2-legacy-map": "smollm2"}


@pytest.fixture(scope="module", params=[
    "tiny", "tiny-chat", "tiny-files",
    *(pytest.param(name, marks=pytest.mark.real_model) for name in (*REAL, *DERIVED)),
])
def pair(request, tiny_folders, tmp_path_factory):
    """(transformers tokenizer, FastTokenizer, folder name) of one folder, loaded once per module."""
    name = request.param
    if name in tiny_folders:
        folder = tiny_folders[name]
    elif name in DERIVED:
        folder = _derived_folder(name, tmp_path_factory.mktemp("derived"))
    else:
        folder = _real_folder(name)
    return load_tokenizer(folder), load_fast_tokenizer(folder), name


def _chat_capable(ref) -> bool:
    return bool(getattr(ref, "chat_template", None))


def test_loads_a_fast_tokenizer(pair):
    _, fast, _ = pair
    assert isinstance(fast, FastTokenizer)


def test_vocab_and_special_tokens_equal(pair):
    ref, fast, _ = pair
    assert vocab_fingerprint(fast) == vocab_fingerprint(ref)
    assert fast.get_vocab() == ref.get_vocab()
    assert (len(fast), fast.vocab_size) == (len(ref), ref.vocab_size)
    assert fast.added_tokens_encoder == ref.added_tokens_encoder
    assert {i: repr(t) for i, t in fast.added_tokens_decoder.items()} == \
           {i: repr(t) for i, t in ref.added_tokens_decoder.items()}
    assert fast.special_tokens_map == ref.special_tokens_map
    assert fast.all_special_tokens == ref.all_special_tokens
    assert fast.all_special_ids == ref.all_special_ids
    for name in ("bos", "eos", "unk", "pad", "sep", "cls", "mask"):
        assert getattr(fast, f"{name}_token") == getattr(ref, f"{name}_token"), name
        assert getattr(fast, f"{name}_token_id") == getattr(ref, f"{name}_token_id"), name
    standard = {f"{n}_token" for n in ("bos", "eos", "unk", "pad", "sep", "cls", "mask")}
    for name in set(ref.special_tokens_map) - standard:
        assert getattr(fast, name) == getattr(ref, name), name  # model-specific (tiny-chat: image_token)
        assert getattr(fast, f"{name}_id") == getattr(ref, f"{name}_id"), name
    assert fast.extra_special_tokens == ref.extra_special_tokens
    assert fast.chat_template == ref.chat_template
    markers = ["<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<eos>", "<bos>", "not-a-token-at-all"]
    assert fast.convert_tokens_to_ids(markers) == ref.convert_tokens_to_ids(markers)
    ids = list(range(min(len(ref), 40))) + [len(ref) - 1]
    assert fast.convert_ids_to_tokens(ids) == ref.convert_ids_to_tokens(ids)
    assert fast.convert_ids_to_tokens(ids, skip_special_tokens=True) == \
           ref.convert_ids_to_tokens(ids, skip_special_tokens=True)


def test_stop_token_ids_equal(pair):
    ref, fast, _ = pair
    assert stop_token_ids(fast) == stop_token_ids(ref)
    assert stop_token_ids(fast, (3, 7)) == stop_token_ids(ref, (3, 7))


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_encode_prompt_equal(pair, chat):
    ref, fast, _ = pair
    for prompt in PROMPTS:
        assert encode_prompt(fast, prompt, chat) == encode_prompt(ref, prompt, chat), prompt
        for add in (False, True):
            assert fast.encode(prompt, add_special_tokens=add) == ref.encode(prompt, add_special_tokens=add), prompt
            assert fast(prompt, add_special_tokens=add)["input_ids"] == ref(prompt, add_special_tokens=add)["input_ids"]
        assert fast.tokenize(prompt) == ref.tokenize(prompt)
    assert fast(PROMPTS)["input_ids"] == ref(PROMPTS)["input_ids"]


def test_multi_turn_chat_equal(pair):
    ref, fast, _ = pair
    if not _chat_capable(ref):
        with pytest.raises(ValueError):
            fast.apply_chat_template(MESSAGES)
        assert fast.chat_template is None
        return
    for gen in (False, True):
        text = ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False)
        assert fast.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=False) == text
        ids = ref.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True, return_dict=False)
        assert fast.apply_chat_template(MESSAGES, add_generation_prompt=gen, tokenize=True, return_dict=False) == ids
        assert fast.apply_chat_template(MESSAGES, add_generation_prompt=gen)["input_ids"] == ids
        assert list(ref.apply_chat_template(MESSAGES, add_generation_prompt=gen)["input_ids"]) == ids
    # the rendered text re-encodes to the same ids, and a batch of conversations renders each alike
    batch = [MESSAGES, MESSAGES[1:2], [{"role": "user", "content": "<|im_start|>?"}]]
    assert fast.apply_chat_template(batch, add_generation_prompt=True, tokenize=False) == \
           ref.apply_chat_template(batch, add_generation_prompt=True, tokenize=False)
    assert fast.apply_chat_template(batch, add_generation_prompt=True, return_dict=False) == \
           [list(x) for x in ref.apply_chat_template(batch, add_generation_prompt=True, return_dict=False)]


def test_continue_final_message_and_tools_equal(pair):
    ref, fast, _ = pair
    if not _chat_capable(ref):
        for tok in (ref, fast):
            with pytest.raises(ValueError, match="chat_template is not set"):
                tok.apply_chat_template(MESSAGES, tools=TOOLS, tokenize=False)
        return
    prefill = MESSAGES[:3]
    assert fast.apply_chat_template(prefill, continue_final_message=True, tokenize=False) == \
           ref.apply_chat_template(prefill, continue_final_message=True, tokenize=False)
    assert fast.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False) == \
           ref.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False)


def test_decode_equal(pair):
    ref, fast, name = pair
    texts = [*PROMPTS]
    if _chat_capable(ref):
        texts.append(ref.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False))
    for text in texts:
        ids = ref.encode(text, add_special_tokens=False)
        for skip in (True, False):
            assert fast.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), text
    # every prefix of a text of multi-byte characters: the byte-level ones end mid-character (U+FFFD) on the way
    ids = ref.encode("é🎉👍🏽中文 naïve 𝔘𝔫𝔦 🦜🪿 ꙮ", add_special_tokens=False)
    prefixes = [ids[:i] for i in range(len(ids) + 1)]
    assert [fast.decode(p, skip_special_tokens=True) for p in prefixes] == \
           [ref.decode(p, skip_special_tokens=True) for p in prefixes]
    if name in REAL or name in DERIVED:
        assert any(ref.decode(p).endswith("\ufffd") for p in prefixes)
    # specials mixed in, a batch, and a single id
    specials = [i for i in ref.all_special_ids if i is not None]
    mixed = specials + ids[:3] + specials[::-1] + ids[3:]
    assert fast.decode(mixed, skip_special_tokens=True) == ref.decode(mixed, skip_special_tokens=True)
    assert fast.decode([mixed, ids]) == ref.decode([mixed, ids])
    assert fast.decode(ids[0]) == ref.decode(ids[0])


def test_stop_string_checker_reads_the_same_text(pair):
    ref, fast, _ = pair

    class Request:
        def __init__(self, ids, stop):
            self.output_ids, self.params = ids, type("P", (), {"stop": stop})()

    ids = ref.encode("alpha beta <w3> gamma 中文", add_special_tokens=False)
    for stop in (["beta"], ["中"], ["zzz"], ["<w3>"]):
        r = Request(ids, stop)
        assert stop_string_checker(fast)(r) == stop_string_checker(ref)(r), stop


def test_template_errors_match(tiny_folders):
    ref, fast = load_tokenizer(tiny_folders["tiny-chat"]), load_fast_tokenizer(tiny_folders["tiny-chat"])
    bad = [{"role": "robot", "content": "beep"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role robot"):
        ref.apply_chat_template(bad, tokenize=False)
    with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role robot"):
        fast.apply_chat_template(bad, tokenize=False)
    for tok in (ref, fast):
        with pytest.raises(ValueError):
            tok.apply_chat_template([], tokenize=False)
        with pytest.raises(ValueError):
            tok.apply_chat_template(MESSAGES, add_generation_prompt=True, continue_final_message=True)
    # a named template from additional_chat_templates/, by name and picked for tools
    ref, fast = load_tokenizer(tiny_folders["tiny-files"]), load_fast_tokenizer(tiny_folders["tiny-files"])
    assert isinstance(fast.chat_template, dict) and set(fast.chat_template) == {"default", "tool_use"}
    for kwargs in ({"chat_template": "tool_use"}, {"tools": TOOLS}, {"chat_template": "{{ messages | length }}"}):
        assert fast.apply_chat_template(MESSAGES, tokenize=False, **kwargs) == \
               ref.apply_chat_template(MESSAGES, tokenize=False, **kwargs), kwargs


def test_load_errors_name_the_folder(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(CheckpointError, match="nowhere"):
        load_fast_tokenizer(missing)
    folder = build_tokenizer(tmp_path / "broken", 8)
    (folder / "tokenizer.json").write_text("{ not json")
    with pytest.raises(CheckpointError, match="broken"):
        load_fast_tokenizer(folder)
    (folder / "tokenizer.json").write_text(json.dumps({"model": {"type": "NoSuchModel"}}))
    with pytest.raises(CheckpointError, match="broken"):
        load_fast_tokenizer(folder)
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="broken"):
        load_fast_tokenizer(folder)


def test_imports_neither_torch_nor_transformers(tiny_folders):
    folders = [str(tiny_folders["tiny-chat"])]
    folders += [str(model_path(k)) for k in REAL.values() if (model_path(k) / "tokenizer.json").is_file()]
    script = textwrap.dedent("""
        import sys
        from common.fast_tokenizer import load_fast_tokenizer
        from common.tokenizer import encode_prompt, stop_token_ids, vocab_fingerprint
        for folder in sys.argv[1:]:
            tok = load_fast_tokenizer(folder)
            vocab_fingerprint(tok)
            ids = encode_prompt(tok, "hello <w1> 世界", chat=True) + encode_prompt(tok, "hello", chat=False)
            assert ids and isinstance(tok.decode(ids, skip_special_tokens=True), str)
            tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
            stop_token_ids(tok)
        heavy = sorted(m for m in ("torch", "transformers") if m in sys.modules)
        assert not heavy, heavy
        print("clean", len(sys.argv) - 1)
    """)
    out = subprocess.run([sys.executable, "-c", script, *folders], cwd=REPO, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == f"clean {len(folders)}"
