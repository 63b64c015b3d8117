"""Checks of values as they enter specd (a servicer, the `LLM` API): one helper per check, errors that name the field.

Code behind these edges trusts the typed values it is handed and does not check them again.
"""
from __future__ import annotations

from collections.abc import Sequence


def check_token_ids(field: str, ids: Sequence[int], vocab_size: int, *, allow_empty: bool = False) -> None:
    """Every id in [0, vocab_size); at least one unless `allow_empty`."""
    if not ids and not allow_empty:
        raise ValueError(f"{field}: empty (at least one token id is required)")
    for i, t in enumerate(ids):
        if not 0 <= t < vocab_size:
            raise ValueError(f"{field}[{i}]={t}: token id outside the vocabulary [0, {vocab_size})")


def check_fits_context(field: str, num_tokens: int, extra: int, max_model_len: int, extra_name: str = "k") -> None:
    """`num_tokens` committed tokens plus `extra` more (drafts) must fit the model's context."""
    if num_tokens + extra > max_model_len:
        raise ValueError(f"{field}: {num_tokens} tokens + {extra_name}={extra} exceeds max_model_len={max_model_len}")


MAX_CACHE_NAMESPACE_CHARS = 64


def check_cache_namespace(field: str, value: str) -> None:
    """A prefix-cache tenant id: empty (the shared namespace) or up to 64 printable ASCII characters."""
    if len(value) > MAX_CACHE_NAMESPACE_CHARS:
        raise ValueError(f"{field}: {len(value)} characters, must be <= {MAX_CACHE_NAMESPACE_CHARS}")
    bad = [c for c in value if not 32 < ord(c) < 127]
    if bad:
        raise ValueError(f"{field}: character {bad[0]!r} is not printable ASCII (without spaces)")


def check_id(field: str, value: str, max_chars: int = 128) -> None:
    """A client-chosen identifier (request id, session id): 1..max_chars characters."""
    if not value or len(value) > max_chars:
        raise ValueError(f"{field}: {len(value)} characters, must be 1..{max_chars}")


def check_prompt_len(field: str, prompt_len: int, num_tokens: int, limit_name: str) -> None:
    """How many of `num_tokens` committed tokens are the prompt: an integer in [0, num_tokens]."""
    if not (isinstance(prompt_len, int) and 0 <= prompt_len <= num_tokens):
        raise ValueError(f"{field}={prompt_len}: must be in [0, {limit_name}={num_tokens}]")
