"""The shared tokenizer: loading, chat templating, and the vocab fingerprint services compare at start-up."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.errors import CheckpointError


def load_tokenizer(path: str | Path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast
    try:
        declared = json.loads((Path(path) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        declared = None
    try:
        if declared == "PreTrainedTokenizerFast":
            # transformers 5 would pick the model type's class over a folder's own generic tokenizer.json
            return PreTrainedTokenizerFast.from_pretrained(str(path))
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"no usable tokenizer in {str(path)!r}: {e}") from e


def vocab_fingerprint(tokenizer) -> str:
    """sha256 over the token -> id map (and added tokens): equal fingerprints mean interchangeable token ids."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def encode_prompt(tokenizer, prompt: str, chat: bool) -> list[int]:
    """Token ids of a plain prompt, or of a single user turn rendered through the chat template."""
    if chat and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer.encode(prompt, add_special_tokens=False) or tokenizer.encode(prompt)


def stop_token_ids(tokenizer, model_eos: tuple[int, ...] = ()) -> tuple[int, ...]:
    """End-of-sequence ids: the model config's, the tokenizer's, and the chat end-of-turn marker if present."""
    ids = set(model_eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    for marker in ("<|im_end|>", "<|endoftext|>", "<|eot_id|>"):
        tid = tokenizer.convert_tokens_to_ids(marker)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and tid >= 0:
            ids.add(tid)
    return tuple(sorted(ids))


def stop_string_checker(tokenizer):
    """A StopCheck: True once the request's recent output text contains one of its stop strings."""
    def hit(r) -> bool:
        tail = tokenizer.decode(r.output_ids[-64:], skip_special_tokens=True)
        return any(s in tail for s in r.params.stop)
    return hit


def cut_at_stop(text: str, stops) -> str:
    """`text` up to (not including) the earliest occurrence of any stop string; all of it if none occurs."""
    cut = [text.find(s) for s in stops if s in text]
    return text[:min(cut)] if cut else text
